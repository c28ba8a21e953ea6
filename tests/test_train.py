"""The trainer: learning, DDP = 1 process, bit-exact resume, crash-safe checkpoints, bad input, faults."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import imm
from imm.core.config import ConfigError, apply_overrides, load_config
from imm.data.datasets import toy2d_sample
from imm.evaluation.toy_metrics import sliced_wasserstein
from imm.io.checkpoint import atomic_write
from imm.training.checkpoints import checkpoint_paths, load_latest_state
from imm.training.config import load_train_config, resolve_config
from imm.training.loop import EXIT_STOPPED, POLL_EVERY, TrainingError, train

TOY_FAST = ["training.batch_size=64", "logging.log_every=5", "logging.progress=false", "logging.tensorboard=false", "logging.sample_steps=[]"]  # no end-of-run scatter plot (toy2d_learns checks it)


def toy_cfg(*overrides):
    return load_train_config("toy2d", [*TOY_FAST, *overrides])


def online_weights(run_dir):
    _, state = load_latest_state(run_dir)
    return state["model"], state["ema"], state["step"]


def test_toy2d_learns_in_600_steps(tmp_path):
    """1-step samples move measurably closer to the target than at initialisation (sliced W2). No wall-clock
    bound: the same 600 steps took 27-49 s on idle 2-core machines of this project (benchmarks time runs)."""
    start = time.perf_counter()
    cfg = toy_cfg("training.total_steps=600", "training.batch_size=512", "logging.log_every=100",
                  "logging.checkpoint_every=1000", "logging.sample_steps=[1,2,4]")
    path = train(cfg, tmp_path / "run", device="cpu")
    elapsed = time.perf_counter() - start
    target = toy2d_sample("gaussians8", 4000, torch.Generator().manual_seed(1))
    x_T = torch.randn(4000, 2, 1, 1, generator=torch.Generator().manual_seed(2))
    trained = imm.load_network(path)
    torch.manual_seed(0)
    init = imm.IMMNetwork(**trained.config).eval()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    d_init = sliced_wasserstein(imm.sample(init, x_T), target, generator=g())
    d_trained = sliced_wasserstein(imm.sample(trained, x_T), target, generator=g())
    print(f"toy2d sliced W2: init {d_init:.3f} -> trained {d_trained:.3f} in {elapsed:.1f}s")
    assert d_trained < 0.75 * d_init  # 0.48 -> about 0.3; the estimate's noise is about 0.02
    # the run folder has what the README promises
    run = tmp_path / "run"
    assert (run / "metrics.jsonl").exists() and (run / "config.yaml").exists()
    assert len(checkpoint_paths(run)) >= 1
    # it ends with a scatter plot of 1/2/4-step samples over the target and the sliced W2 of each
    assert (run / "samples" / "step00000600_scatter.png").stat().st_size > 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert logged["step"] == 600 and {"sw2/1step", "sw2/2step", "sw2/4step"} <= set(logged)
    assert abs(logged["sw2/1step"] - d_trained) < 0.05 and logged["sw2/1step"] < 0.75 * d_init  # other noise, same W2
    # imm generate from the file alone (the settings it records): a scatter plot per sampling entry
    from imm import cli

    assert cli.main(["generate", "--checkpoint", str(path), "--out", str(tmp_path / "gen")]) == 0
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == [
        "1_step_samples.png", "2_steps_samples.png", "4_steps_samples.png"]


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


def free_port() -> int:
    """A TCP port nobody listens on now (the system picks it for a socket bound to port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# 2 processes x 1 chunk of 16 or 1 process x 2 accumulated chunks of 16: the same global batch of 32
MULTI = ["training.batch_size=32", "training.batch_per_device=16", "logging.checkpoint_every=100"]


def torchrun(run_dir, steps, *overrides, launch=None):
    """``imm train`` on the toy under torchrun (2 gloo processes on this machine unless ``launch`` says
    otherwise); returns the Popen."""
    launch = launch or ["--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "imm", "train", "--config", "toy2d",
           "--run-dir", str(run_dir), "--device", "cpu", *TOY_FAST, *MULTI, f"training.total_steps={steps}",
           *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def finished(proc) -> str:
    """The output of a torchrun launch that succeeded."""
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def assert_trained_alike(one, other, steps):
    """The online network and the 0.995 EMA of two runs at ``steps``, equal to float round-off."""
    a, ema_a, _ = online_weights(one)
    b, ema_b, step = online_weights(other)
    assert step == steps
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
        assert torch.allclose(ema_a["0.995"][k], ema_b["0.995"][k], rtol=1e-5, atol=1e-6), k


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(tmp_path, parallel):
    """2 gloo processes x 1 chunk of 16 == 1 process x 2 accumulated chunks of 16 (global batch 32),
    with DDP and with FSDP2 (which also resumes from its own checkpoint)."""
    train(toy_cfg("training.total_steps=4", *MULTI), tmp_path / "one", device="cpu")
    for steps in (2, 4) if parallel == "fsdp" else (4,):
        finished(torchrun(tmp_path / "two", steps, f"training.parallel={parallel}"))
    assert_trained_alike(tmp_path / "one", tmp_path / "two", 4)


@pytest.mark.integration
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_resume_on_another_number_of_processes(tmp_path, parallel):
    """A checkpoint of 2 processes resumes on 1, and one of 1 process on 2, and both train on like a run of
    the same global batch that never moved (the chunks and their random draws do not depend on the process
    that runs them; the optimizer state is saved whole)."""
    setting = f"training.parallel={parallel}"
    train(toy_cfg("training.total_steps=4", *MULTI, setting), tmp_path / "one", device="cpu")
    finished(torchrun(tmp_path / "two-then-one", 2, setting))
    train(toy_cfg("training.total_steps=4", *MULTI, setting), tmp_path / "two-then-one", device="cpu")
    assert_trained_alike(tmp_path / "one", tmp_path / "two-then-one", 4)
    train(toy_cfg("training.total_steps=2", *MULTI, setting), tmp_path / "one-then-two", device="cpu")
    finished(torchrun(tmp_path / "one-then-two", 4, setting))
    assert_trained_alike(tmp_path / "one", tmp_path / "one-then-two", 4)


@pytest.mark.integration
def test_two_nodes_rendezvous_on_loopback_equal_one_process(tmp_path):
    """Two torchrun launches of one process each, as on two machines (--nnodes=2, c10d rendezvous on
    127.0.0.1), sharing the run directory: they train like one process of the same global batch."""
    train(toy_cfg("training.total_steps=4", *MULTI), tmp_path / "one", device="cpu")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [torchrun(tmp_path / "nodes", 4, launch=["--nnodes=2", "--nproc_per_node=1", f"--node_rank={i}",
                                                     "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
                                                     "--rdzv_id=imm-test"]) for i in range(2)]
    outputs = "".join(finished(node) for node in nodes)
    assert "2 process(es) on cpu" in outputs  # one world of two, not two runs of one
    assert_trained_alike(tmp_path / "one", tmp_path / "nodes", 4)


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


def test_sigterm_writes_a_checkpoint_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "imm", "train", "--config", "toy2d", "--run-dir", str(run), "--device", "cpu",
           *TOY_FAST, "training.total_steps=100000", "logging.checkpoint_every=100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").stat().st_size == 0:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED == 75, err[-2000:]
    assert "checkpoint written" in err and "Traceback" not in err
    path, state = load_latest_state(run)
    assert state["step"] >= 5
    train(toy_cfg(f"training.total_steps={state['step'] + 2}", "logging.checkpoint_every=100000"), run, device="cpu")
    assert load_latest_state(run)[1]["step"] == state["step"] + 2


@pytest.mark.integration
def test_sigterm_to_every_process_of_a_torchrun_job_stops_it_with_a_checkpoint(tmp_path):
    """As a cluster scheduler does it, SIGTERM to torchrun and its workers: the workers agree at their next
    poll (every POLL_EVERY steps), write one checkpoint and exit 75; a rerun on one process resumes."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "imm", "train", "--config", "toy2d", "--run-dir", str(run),
           "--device", "cpu", *TOY_FAST, *MULTI, "training.total_steps=100000", "logging.checkpoint_every=100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").stat().st_size == 0:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert err.count("checkpoint written, rerun to resume") == 2, err[-3000:]  # both workers, same step
    assert len(checkpoint_paths(run)) == 1
    _, state = load_latest_state(run)
    assert state["step"] >= 5 and state["step"] % POLL_EVERY == 0
    train(toy_cfg(f"training.total_steps={state['step'] + 2}", *MULTI), run, device="cpu")
    assert load_latest_state(run)[1]["step"] == state["step"] + 2


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


def _npz_images(path, n=8, res=8, channels=3, labels=False):
    rng = np.random.default_rng(0)
    arrays = {"arr_0": rng.integers(0, 256, (n, res, res, channels), dtype=np.uint8)}
    if labels:
        arrays["arr_1"] = np.arange(n) % 3
    np.savez(path, **arrays)
    return path


def _image_cfg(npz, *overrides):
    cfg = load_config("toy2d")
    cfg["network"] = {k: v for k, v in cfg["network"].items() if k not in ("hidden", "depth", "model_type")}
    cfg["network"].update(model_type="SongUNet", model_channels=8, channel_mult=[1], num_blocks=1,
                          attn_resolutions=[], dropout=0.1, f_type="simple_edm", img_channels=3, img_resolution=8,
                          sigma_data=0.5, eps=0.006)
    cfg["encoder"] = {"class_name": "StandardRGBEncoder", "channels": 3}
    cfg["dataset"] = {"kind": "npz", "path": str(npz)}
    return apply_overrides(resolve_config(cfg), [*TOY_FAST, "training.batch_size=8", "training.xflip=true", *overrides])


def test_image_training_with_dropout_resumes_bit_exact(tmp_path):
    npz = _npz_images(tmp_path / "d.npz")
    train(_image_cfg(npz, "training.total_steps=4", "logging.sample_every=2", "logging.sample_steps=[1,2]",
                     "logging.sample_count=4", "logging.tensorboard=true"), tmp_path / "full", device="cpu")
    train(_image_cfg(npz, "training.total_steps=2"), tmp_path / "part", device="cpu")
    train(_image_cfg(npz, "training.total_steps=4"), tmp_path / "part", device="cpu")
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
    npz = _npz_images(tmp_path / "d.npz")
    with pytest.raises((ConfigError, ValueError), match=message):
        train(_image_cfg(npz, *overrides), tmp_path / "run", device="cpu")
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
    cfg = _image_cfg(_npz_images(tmp_path / "d.npz"))
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
    # the stop writes no checkpoint of the diverged state (issue 13; test_faults.py checks the good ones are kept)
    assert load_latest_state(tmp_path / "run") == (None, None)
    assert not checkpoint_paths(tmp_path / "run")


def test_compiled_training_matches_eager(tmp_path):
    """training.compile=true compiles both passes (the no-grad target pass too) and trains like eager."""
    losses = {}
    for mode in ("false", "true"):
        train(toy_cfg("training.total_steps=3", "logging.log_every=1", f"training.compile={mode}"),
              tmp_path / mode, device="cpu")
        rows = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses["true"]) == 3
    assert np.allclose(losses["true"], losses["false"], rtol=1e-4), losses


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
