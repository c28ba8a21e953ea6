"""training.activation_checkpointing under DDP/FSDP2 (2 gloo processes) and torch.compile: the gradients of
the plain run."""

import os
import subprocess

import pytest
import torch
import yaml

from imm.training.loop import train
from tests.helpers import image_cfg, npz_images, online_weights, torchrun_command


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_with_checkpointing_equal_one_process(tmp_path, parallel):
    npz = npz_images(tmp_path / "d.npz")
    common = ["training.batch_size=8", "training.batch_per_device=4", "training.total_steps=2",
              "training.activation_checkpointing=true", "training.xflip=false", "loss.group_size=2"]
    cfg = image_cfg(npz, *common)
    train(cfg, tmp_path / "one", device="cpu")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = torchrun_command("-m", "imm", "train", "--config", str(config), "--run-dir", str(tmp_path / "two"),
                           "--device", "cpu", f"training.parallel={parallel}")
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    a, _, _ = online_weights(tmp_path / "one")
    b, _, step = online_weights(tmp_path / "two")
    assert step == 2
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def test_compiled_checkpointed_training_matches_eager(tmp_path, monkeypatch):
    """training.compile=true with checkpointed blocks: Dynamo captures torch.utils.checkpoint and AOTAutograd
    partitions the recomputation. Inductor's code generation (minutes on 2 CPU cores) is the one part left out:
    the trainer's torch.compile calls run with the aot_eager backend here. No dropout: compiled random
    numbers differ from eager ones."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="aot_eager", **kw))
    npz = npz_images(tmp_path / "d.npz")
    for mode in ("false", "true"):
        train(image_cfg(npz, "training.total_steps=2", "training.activation_checkpointing=true", "network.dropout=0",
                         f"training.compile={mode}"), tmp_path / mode, device="cpu")
    a, _, _ = online_weights(tmp_path / "false")
    b, _, _ = online_weights(tmp_path / "true")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
