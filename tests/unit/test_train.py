"""Training: resume, faults, bad input, the stop status (single process, small steps)."""


import numpy as np
import pytest
import torch

import imm
from imm.core.config import ConfigError
from imm.core.files import atomic_write
from imm.io.checkpoint import CheckpointError
from imm.training.checkpoints import checkpoint_paths, load_latest_state
from imm.training.config import load_train_config
from imm.training.loop import EXIT_STOPPED, TrainingError, train
from tests.helpers import image_cfg, npz_images, online_weights, toy_cfg


def test_resume_is_bit_exact(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(toy_cfg("training.total_steps=8", "logging.checkpoint_every=100"), full, device="cpu")
    train(toy_cfg("training.total_steps=3", "logging.checkpoint_every=100"), part, device="cpu")
    train(toy_cfg("training.total_steps=8", "logging.checkpoint_every=100"), part, device="cpu")  # resumes at 3
    a, ema_a, step_a = online_weights(full)
    b, ema_b, step_b = online_weights(part)
    assert step_a == step_b == 8
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(ema_a[d][k], ema_b[d][k]) for d in ema_a for k in ema_a[d])
    # and the run changed the weights at all
    c, _, _ = online_weights(part)
    torch.manual_seed(0)
    fresh = imm.IMMNetwork(**imm.read_checkpoint(checkpoint_paths(part)[-1])[0]).state_dict()
    assert not all(torch.equal(fresh[k], c[k]) for k in fresh)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(toy_cfg("training.total_steps=2", "logging.checkpoint_every=100"), run, device="cpu")
    (previous,) = checkpoint_paths(run)
    before = previous.read_bytes()

    def crash(state, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        atomic_write(previous, lambda tmp: torch.save({}, tmp))
    monkeypatch.undo()
    assert previous.read_bytes() == before
    assert [p.name for p in (run / "checkpoints").iterdir()] == [previous.name]  # no temp file left
    assert imm.load_network(previous).config["model_type"] == "MLP"
    # a torn newest checkpoint (crash of a non-atomic copy) is skipped in favour of the previous one
    torn = run / "checkpoints" / "training-state-00000009.pt"
    torn.write_bytes(before[: len(before) // 2])
    path, state = load_latest_state(run)
    assert path == previous and state["step"] == 2


def test_train_help_documents_the_stop_status(capsys):
    from imm import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert f"{EXIT_STOPPED} stopped by SIGTERM or" in capsys.readouterr().out


def test_fp16_resume_continues_the_grad_scaler(tmp_path):
    """The GradScaler's state is part of the training state (CPU autocast in float16 here)."""
    fp16 = ["training.precision=fp16", "logging.checkpoint_every=100"]
    train(toy_cfg("training.total_steps=6", *fp16), tmp_path / "full", device="cpu")
    train(toy_cfg("training.total_steps=3", *fp16), tmp_path / "part", device="cpu")
    train(toy_cfg("training.total_steps=6", *fp16), tmp_path / "part", device="cpu")
    _, a = load_latest_state(tmp_path / "full")
    _, b = load_latest_state(tmp_path / "part")
    assert a["scaler"] == b["scaler"] and b["scaler"]["_growth_tracker"] == 6  # 6 finite steps since the start
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_image_training_with_dropout_resumes_bit_exact(tmp_path):
    npz = npz_images(tmp_path / "d.npz")
    train(image_cfg(npz, "training.total_steps=4", "logging.sample_every=2", "logging.sample_steps=[1,2]",
                     "logging.sample_count=4", "logging.tensorboard=true"), tmp_path / "full", device="cpu")
    train(image_cfg(npz, "training.total_steps=2"), tmp_path / "part", device="cpu")
    train(image_cfg(npz, "training.total_steps=4"), tmp_path / "part", device="cpu")
    a, _, _ = online_weights(tmp_path / "full")
    b, _, _ = online_weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    full = tmp_path / "full"
    assert (full / "samples" / "step00000002_2step.png").exists()
    assert list((full / "tensorboard").iterdir())  # real event files
    assert imm.load_network(full / "network.safetensors").config["model_type"] == "SongUNet"


@pytest.mark.parametrize("overrides,message", [
    (["training.batch_size=10"], "divisible"),
    (["training.batch_size=16", "training.batch_per_device=6"], "multiple of loss.group_size"),
    (["network.img_resolution=16"], "resolution is 8"),
    (["encoder.channels=1", "network.img_channels=1"], "channels"),
    (["training.bacth_size=8"], "did you mean 'training.batch_size'"),
    (["+loss.kernal=rbf"], "did you mean 'loss.kernel'"),
    (["dataset.path=/nonexistent/data.npz"], "does not exist"),
])
def test_bad_input_fails_before_compute(tmp_path, overrides, message):
    npz = npz_images(tmp_path / "d.npz")
    with pytest.raises((ConfigError, ValueError), match=message):
        train(image_cfg(npz, *overrides), tmp_path / "run", device="cpu")
    assert not checkpoint_paths(tmp_path / "run")


def test_presets_resolve_and_need_a_dataset_path():
    for name in ("cifar10", "imagenet256-dit-s", "imagenet256-dit-b", "imagenet256-dit-l", "imagenet256-dit-xl"):
        cfg = load_train_config(name)
        with pytest.raises(ConfigError, match="dataset.path is not set"):
            train(cfg, "/nonexistent-run", device="cpu")
    xl = load_train_config("imagenet256-dit-xl")
    assert (xl["network"]["temb_type"], xl["loss"]["a"], xl["loss"]["min_gap"]) == ("stride", 2, 1e-4)
    assert load_train_config("cifar10")["loss"]["k"] == 15


def test_empty_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = image_cfg(npz_images(tmp_path / "d.npz"))
    cfg["dataset"] = {"kind": "folder", "path": str(tmp_path / "empty")}
    with pytest.raises(ValueError, match="no images"):
        train(cfg, tmp_path / "run", device="cpu")


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    data = np.full((16, 2, 1, 1), np.nan, dtype=np.float32)
    np.savez(tmp_path / "nan.npz", x=data)
    cfg = toy_cfg("training.total_steps=50", "training.max_nonfinite_steps=3", "training.batch_size=16")
    cfg["dataset"] = {"kind": "npz", "path": str(tmp_path / "nan.npz")}
    with pytest.raises(TrainingError, match="3 steps in a row had non-finite gradients"):
        train(cfg, tmp_path / "run", device="cpu")
    # the stop writes no checkpoint of the diverged state (test_faults.py checks the good ones are kept)
    assert load_latest_state(tmp_path / "run") == (None, None)
    assert not checkpoint_paths(tmp_path / "run")


def test_resume_with_changed_settings_says_so_and_refuses_another_experiment(tmp_path, capsys):
    run = tmp_path / "run"
    train(toy_cfg("training.total_steps=2", "logging.checkpoint_every=100"), run, device="cpu")
    first = (run / "config.yaml").read_text()
    capsys.readouterr()
    train(toy_cfg("training.total_steps=3", "training.batch_size=32", "logging.checkpoint_every=100"), run, device="cpu")
    out = capsys.readouterr().out
    assert "resuming with changed settings: " in out and "training.batch_size 64 -> 32" in out
    assert "training.total_steps 2 -> 3" in out
    assert (run / "config-until-00000002.yaml").read_text() == first  # the earlier config is kept
    assert "batch_size: 32" in (run / "config.yaml").read_text()
    with pytest.raises(TrainingError, match=r"resuming would change loss.k .*--allow-changes") as e:
        train(toy_cfg("training.total_steps=4", "loss.k=5", "logging.checkpoint_every=100"), run, device="cpu")
    assert "\n" not in str(e.value)
    assert load_latest_state(run)[1]["step"] == 3  # nothing trained
    train(toy_cfg("training.total_steps=4", "loss.k=5", "logging.checkpoint_every=100"), run, device="cpu",
          allow_changes=True)
    assert load_latest_state(run)[1]["step"] == 4
    # an unchanged resume prints nothing about settings
    capsys.readouterr()
    train(toy_cfg("training.total_steps=4", "loss.k=5", "logging.checkpoint_every=100"), run, device="cpu")
    assert "changed settings" not in capsys.readouterr().out
    # another architecture does not fit the checkpoint, even when changes are allowed: one line naming it
    with pytest.raises(CheckpointError, match=r"training-state-00000004\.pt: configuration and tensors disagree: "
                                              "shape mismatch") as e:
        train(toy_cfg("training.total_steps=5", "loss.k=5", "network.hidden=64"), run, device="cpu",
              allow_changes=True)
    assert "\n" not in str(e.value)
