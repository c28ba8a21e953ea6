"""Post-hoc EMA under FSDP2 (2 gloo processes): the snapshots of one process."""

import os
import subprocess

import torch

from imm.io.checkpoint import read_checkpoint
from imm.training.loop import train
from imm.training.phema_files import phema_snapshots
from tests.helpers import TINY, tiny_cfg, torchrun_command, tracked


def test_fsdp_snapshots_equal_one_process(tmp_path):
    """2 gloo processes with FSDP2 (sharded profiles, gathered for the files) == 1 process with accumulation."""
    common = ["training.batch_size=32", "training.batch_per_device=16", "training.total_steps=4",
              "training.phema_snapshot_every=2"]
    train(tiny_cfg(*common), tmp_path / "one", device="cpu")
    cmd = torchrun_command("-m", "imm", "train", "--config", "toy2d", "--run-dir", str(tmp_path / "two"), "--device",
                           "cpu", *TINY, *common, "training.parallel=fsdp")
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = phema_snapshots(tmp_path / "one"), phema_snapshots(tmp_path / "two")
    assert [p.name for *_, p in one] == [p.name for *_, p in two] and len(one) == 4
    for (*_, a), (*_, b) in zip(one, two):
        ta, tb = read_checkpoint(a)[1], read_checkpoint(b)[1]
        assert all(torch.allclose(ta[k], tb[k], rtol=1e-5, atol=1e-6) for k in ta), a.name
    assert tracked(tmp_path / "two", 0.05).keys() == tracked(tmp_path / "one", 0.05).keys()
