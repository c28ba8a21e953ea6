"""Training never loses a good checkpoint: non-finite stops, unreadable checkpoints,
orphaned temporary files, file modes, unreadable samples, metrics.jsonl after a resume, bad numbers."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from imm.cli import main
from imm.core.config import ConfigError, apply_overrides, load_config
from imm.core.files import atomic_write
from imm.data.datasets import ImageFolderDataset
from imm.data.loader import make_loader
from imm.training.checkpoints import checkpoint_paths, load_latest_state
from imm.training.config import load_train_config, resolve_config
from imm.training.loop import TrainingError, train

TOY_FAST = ["training.batch_size=64", "logging.log_every=1", "logging.progress=false", "logging.tensorboard=false", "logging.sample_steps=[]"]


def toy_cfg(*overrides):
    return load_train_config("toy2d", [*TOY_FAST, *overrides])


def files(run):
    """{checkpoint file name: bytes} of a run (only the names rotation and resume look at)."""
    return {p.name: p.read_bytes() for p in checkpoint_paths(run)}


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Non-finite stops


def test_nonfinite_stop_keeps_good_checkpoints_and_lower_lr_resumes_from_them(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    good = ["logging.checkpoint_every=2", "logging.keep_last=2"]
    train(toy_cfg("training.total_steps=6", *good), run, device="cpu")
    before = files(run)
    assert sorted(before) == ["training-state-00000004.pt", "training-state-00000006.pt"]
    # lr=1e30: the first step from step 6 is finite but throws the weights out, the next ones are not;
    # a checkpoint every step would write that state and rotate the good ones away
    diverge = ["training.total_steps=30", "optimizer.lr=1e30", "training.max_nonfinite_steps=3",
               "logging.checkpoint_every=1", "logging.keep_last=2"]
    for _ in range(3):  # a requeueing scheduler retries the same command
        with pytest.raises(TrainingError, match="non-finite") as e:
            train(toy_cfg(*diverge), run, device="cpu")
        message = one_line(e)
        assert files(run) == before
        assert "training-state-00000006.pt" in message and "optimizer.lr=" in message
    # the advice, followed: a lower lr resumes from step 6 and trains like a run that never diverged
    train(toy_cfg("training.total_steps=10", *good), run, device="cpu")
    train(toy_cfg("training.total_steps=10", *good), ref, device="cpu")
    _, a = load_latest_state(run)
    _, b = load_latest_state(ref)
    assert a["step"] == b["step"] == 10
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


def test_nonfinite_stop_sets_aside_the_checkpoint_it_started_from(tmp_path):
    """A checkpoint whose very next step is non-finite gives the same step again whatever the lr:
    it is renamed *.diverged, and the rerun starts from the one before."""
    run = tmp_path / "run"
    train(toy_cfg("training.total_steps=4", "logging.checkpoint_every=2"), run, device="cpu")
    ckpt = run / "checkpoints"
    # a checkpoint written after the finite step that ruined the weights (huge but finite)
    train(toy_cfg("training.total_steps=5", "optimizer.lr=1e30", "logging.checkpoint_every=100"), run, device="cpu")
    assert (ckpt / "training-state-00000005.pt").exists()
    with pytest.raises(TrainingError, match="non-finite") as e:
        train(toy_cfg("training.total_steps=30", "training.max_nonfinite_steps=2"), run, device="cpu")
    assert "training-state-00000005.pt" in one_line(e) and "training-state-00000004.pt" in one_line(e)
    assert (ckpt / "training-state-00000005.pt.diverged").exists()
    assert load_latest_state(run)[1]["step"] == 4


# ---------------------------------------------------------------------------------------------
# Unreadable checkpoints


def test_all_checkpoints_unreadable_refuses_then_starts_over_on_request(tmp_path):
    run = tmp_path / "run"
    cfg = toy_cfg("training.total_steps=4", "logging.checkpoint_every=2")
    train(cfg, run, device="cpu")
    for p in checkpoint_paths(run):
        p.write_bytes(p.read_bytes()[:100])  # torn
    torn = files(run)
    with pytest.raises(TrainingError) as e:
        train(cfg, run, device="cpu")
    message = one_line(e)
    assert all(name in message for name in torn) and "--start-over" in message
    assert files(run) == torn  # nothing touched
    train(cfg, run, device="cpu", start_over=True)
    assert sorted(files(run)) == ["training-state-00000002.pt", "training-state-00000004.pt"]
    assert load_latest_state(run)[1]["step"] == 4  # the fresh ones, readable
    assert {p.name for p in (run / "checkpoints").glob("*.corrupt")} == {f"{n}.corrupt" for n in torn}


def test_start_over_flag_on_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", "toy2d", "--run-dir", str(run), "--device", "cpu", *TOY_FAST,
            "training.total_steps=2", "logging.checkpoint_every=100"]
    assert main(args) == 0
    (path,) = checkpoint_paths(run)
    path.write_bytes(b"PK\x03\x04 not a checkpoint")
    assert main(args) == 2
    assert "no readable checkpoint" in capsys.readouterr().err
    assert main([*args[:1], "--start-over", *args[1:]]) == 0
    assert load_latest_state(run)[1]["step"] == 2


def test_rotation_never_keeps_unreadable_checkpoints_in_place_of_readable_ones(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    train(toy_cfg("training.total_steps=4", "logging.checkpoint_every=2", "logging.keep_last=3"), run, device="cpu")
    # newer unreadable files (higher step numbers): set aside, the fresh checkpoints stay
    for step in (8, 10):
        (ckpt / f"training-state-{step:08d}.pt").write_bytes(b"garbage")
    train(toy_cfg("training.total_steps=6", "logging.checkpoint_every=2", "logging.keep_last=2"), run, device="cpu")
    assert sorted(files(run)) == ["training-state-00000004.pt", "training-state-00000006.pt"]
    assert (ckpt / "training-state-00000010.pt.corrupt").read_bytes() == b"garbage"
    # an unreadable older one is never kept while a readable one is deleted
    (ckpt / "training-state-00000004.pt").write_bytes(b"garbage")
    (ckpt / "training-state-00000002.pt").write_bytes(files(run)["training-state-00000006.pt"])
    train(toy_cfg("training.total_steps=8", "logging.checkpoint_every=2", "logging.keep_last=3"), run, device="cpu")
    assert "training-state-00000002.pt" in files(run)  # only 6 and 8 are known good: too few to rotate


# ---------------------------------------------------------------------------------------------
# Temporary files and modes


def test_orphaned_temporary_files_are_removed_at_start(tmp_path):
    run = tmp_path / "run"
    train(toy_cfg("training.total_steps=2", "logging.checkpoint_every=100"), run, device="cpu")
    orphans = [run / "checkpoints" / ".training-state-00000004.pt.k2j_9xq1.tmp",
               run / ".network.safetensors.abcdefgh.tmp", run / ".metrics.jsonl.0123456789abcdef.tmp"]
    for p in orphans:
        p.write_bytes(b"half a file")
    keep = run / "checkpoints" / "notes.tmp"  # not one of atomic_write's names
    keep.write_text("mine")
    train(toy_cfg("training.total_steps=3", "logging.checkpoint_every=100"), run, device="cpu")
    assert not any(p.exists() for p in orphans) and keep.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_write_gives_the_users_normal_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "out.bin", lambda tmp: open(tmp, "wb").close())
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# Unreadable samples


def _png(i):
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(i).randint(0, 256, (8, 8, 3)).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _npy(i):
    buf = io.BytesIO()
    np.save(buf, np.random.RandomState(i).randint(0, 256, (3, 8, 8)).astype(np.uint8))
    return buf.getvalue()


def _dataset_with_a_truncated_file(tmp_path, layout):
    """8 items, item 5 truncated after its header (the start-up check reads headers only)."""
    encode, ext = (_png, "png") if layout == "zip-png" else (_npy, "npy")
    items = {f"img{i:02d}.{ext}": encode(i) for i in range(8)}
    items[f"img05.{ext}"] = items[f"img05.{ext}"][:-60]
    if layout == "zip-png":
        path = tmp_path / "data.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in items.items():
                zf.writestr(name, data)
    else:
        path = tmp_path / "data"
        path.mkdir()
        for name, data in items.items():
            (path / name).write_bytes(data)
    return path, f"img05.{ext}"


def _image_cfg(path, *overrides):
    cfg = load_config("toy2d")
    cfg["network"] = {k: v for k, v in cfg["network"].items() if k not in ("hidden", "depth", "kind")}
    cfg["network"].update(model_type="SongUNet",  # the release's keys: resolve_config reads them as kind model_channels=8, channel_mult=[1], num_blocks=1,
                          attn_resolutions=[], f_type="simple_edm", img_channels=3, img_resolution=8,
                          sigma_data=0.5, eps=0.006)
    cfg["encoder"] = {"class_name": "StandardRGBEncoder", "channels": 3}
    cfg["dataset"] = {"path": str(path)}
    return apply_overrides(resolve_config(cfg), [*TOY_FAST, "training.batch_size=8", "training.total_steps=3",
                                                 "logging.checkpoint_every=100", *overrides])


@pytest.mark.parametrize("layout", ["zip-png", "folder-npy"])
def test_unreadable_sample_is_named_skipped_counted_and_bounded(tmp_path, layout):
    path, bad = _dataset_with_a_truncated_file(tmp_path, layout)
    ds = ImageFolderDataset(path)  # headers are fine
    with pytest.raises(ValueError, match=f"{bad}"):
        ds[5]
    # the default tolerance (1% of the files) is exceeded by 1 file in 8: one line naming it
    with pytest.raises(TrainingError, match=bad) as e:
        train(_image_cfg(path), tmp_path / "strict", device="cpu")
    assert "training.max_unreadable_fraction" in one_line(e)
    assert not checkpoint_paths(tmp_path / "strict")
    # tolerated: the run trains, substitutes deterministically (resume stays exact) and logs the count
    loose = "training.max_unreadable_fraction=0.2"
    train(_image_cfg(path, loose, "training.num_workers=2"), tmp_path / "full", device="cpu")
    train(_image_cfg(path, loose, "training.total_steps=1"), tmp_path / "part", device="cpu")
    train(_image_cfg(path, loose), tmp_path / "part", device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data/unreadable_samples"] == 1
    _, a = load_latest_state(tmp_path / "full")
    _, b = load_latest_state(tmp_path / "part")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_loader_substitutes_the_next_readable_item(tmp_path):
    path, _ = _dataset_with_a_truncated_file(tmp_path, "zip-png")
    ds = ImageFolderDataset(path)
    loader = make_loader(ds, 8, shuffle=False, max_unreadable=1)
    raw, _ = next(loader)
    assert torch.equal(raw[5], ds[6][0]) and torch.equal(raw[4], ds[4][0])
    assert list(loader.unreadable) == [5] and "img05.png" in loader.unreadable[5]


# ---------------------------------------------------------------------------------------------
# metrics.jsonl after a resume


def test_resumed_metrics_do_not_repeat_steps(tmp_path):
    run = tmp_path / "run"
    train(toy_cfg("training.total_steps=5", "logging.checkpoint_every=2", "logging.keep_last=5"), run, device="cpu")
    # killed after step 5 was logged, before its checkpoint; the last line torn by the kill
    (run / "checkpoints" / "training-state-00000005.pt").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')
    train(toy_cfg("training.total_steps=7", "logging.checkpoint_every=2", "logging.keep_last=5"), run, device="cpu")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6, 7]


# ---------------------------------------------------------------------------------------------
# Numbers in the config


@pytest.mark.parametrize("override", [
    "training.total_steps=0", "training.total_steps=-5", "training.total_steps=2.5", "logging.checkpoint_every=0",
    "training.batch_size=0", "optimizer.lr=fast", "optimizer.lr=0", "optimizer.lr=nan", "optimizer.lr=-1e-4",
    "logging.log_every=0", "logging.sample_every=0", "logging.keep_last=-1", "logging.fid_every=-1",
    "logging.sample_count=0", "training.max_nonfinite_steps=0", "training.num_workers=-1",
    "training.batch_per_device=0", "training.seed=-1", "training.total_steps=true", "optimizer.warmup_steps=-1",
    "optimizer.eps=-1", "optimizer.weight_decay=inf", "optimizer.grad_clip=-1", "optimizer.betas=[0.9]",
    "optimizer.betas=[0.9,1.5]", "training.ema_decays=[1.5]", "training.ema_decays=[x]",
    "logging.sample_steps=[0]", "logging.fid_steps=[two]", "training.max_unreadable_fraction=1.5",
])
def test_bad_numbers_are_one_line_config_errors(tmp_path, override):
    with pytest.raises(ConfigError) as e:
        train(toy_cfg("training.total_steps=2", override), tmp_path / "run", device="cpu")
    assert override.split("=")[0] in one_line(e)
    assert not (tmp_path / "run").exists()
