"""`imm generate` under torchrun checks the settings of the folder it resumes."""

import os
import subprocess

import numpy as np

from tests.helpers import GENERATE, torchrun_command


def test_generate_under_torchrun_checks_and_resumes(generated, tmp_path):
    out, images = generated
    (out / "2_steps" / "000002.png").write_bytes(b"\x89PNG\r\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = torchrun_command("-m", "imm", *GENERATE, "--out", str(out))
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert np.array_equal(np.load(out / "2_steps.npz")["arr_0"], images)
    run = subprocess.run(cmd + ["--seed", "5"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0 and "seed: 0 there, 5 now" in run.stderr, run.stderr[-3000:]
    assert np.array_equal(np.load(out / "2_steps.npz")["arr_0"], images)
