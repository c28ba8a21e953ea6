"""`imm generate` under torchrun: the images of one process."""

import os
import subprocess

import numpy as np

from imm.cli import main
from tests.helpers import FIXTURES, torchrun_command

UNET = FIXTURES / "unet_cifar_like.pkl"


def test_generate_under_torchrun_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["generate", "--checkpoint", str(UNET), "--device", "cpu", "--entries", "2_steps", "--num-images", "6",
            "--batch-size", "2", "--no-progress"]
    assert main(args + ["--out", str(one)]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = torchrun_command("-m", "imm", *args, "--out", str(two))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert np.array_equal(np.load(one / "2_steps.npz")["arr_0"], np.load(two / "2_steps.npz")["arr_0"])
