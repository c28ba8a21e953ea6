"""Training end to end: learning runs, torchrun (DDP/FSDP2, process counts, two nodes), SIGTERM, compile."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import imm
from imm.data.datasets import toy2d_sample
from imm.evaluation.toy_metrics import sliced_wasserstein
from imm.training.checkpoints import checkpoint_paths, load_latest_state
from imm.training.loop import EXIT_STOPPED, POLL_EVERY, train
from tests.helpers import TOY_FAST, free_port, online_weights, toy_cfg


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
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}"
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


def test_two_srun_tasks_equal_one_process(tmp_path):
    """Two processes started as srun starts the tasks of a job step (SLURM_PROCID, SLURM_STEP_ID,
    SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID; no torchrun) meet at the job's port
    on the node list's first host and train as 1 process x 2 accumulated chunks."""
    from imm.core.distributed import SLURM_PORT_BASE, SLURM_PORTS

    train(toy_cfg("training.total_steps=4", *MULTI), tmp_path / "one", device="cpu")
    port = next(p for p in iter(free_port, None) if SLURM_PORT_BASE <= p < SLURM_PORT_BASE + SLURM_PORTS)
    job = {"SLURM_JOB_ID": str(port - SLURM_PORT_BASE + SLURM_PORTS), "SLURM_JOB_NODELIST": "127.0.0.1",
           "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"}
    cmd = [sys.executable, "-m", "imm", "train", "--config", "toy2d", "--run-dir", str(tmp_path / "two"), "--device",
           "cpu", *TOY_FAST, *MULTI, "training.total_steps=4"]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    tasks = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**base, **job, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                                   "OMP_NUM_THREADS": "1"}) for rank in (0, 1)]
    main_output = [finished(task) for task in tasks][0]
    assert "2 process(es) on cpu" in main_output and "global batch 32 = 2 x 1 x 16" in main_output, main_output
    assert_trained_alike(tmp_path / "one", tmp_path / "two", 4)


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


def test_two_processes_in_bf16_train_like_one(tmp_path):
    """bf16 with DDP: each process runs its bf16 working copy, DDP averages the bf16 gradients, the fp32 weights
    take them; one process accumulating both chunks lands on the same weights to bf16's resolution."""
    bf16 = ["training.precision=bf16"]
    train(toy_cfg("training.total_steps=4", *MULTI, *bf16), tmp_path / "one", device="cpu")
    out = finished(torchrun(tmp_path / "two", 4, *bf16))
    assert "computing in bf16" in out
    a, _, _ = online_weights(tmp_path / "one")
    b, _, step = online_weights(tmp_path / "two")
    assert step == 4 and all(v.dtype == torch.float32 for v in b.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0.02, atol=4e-3)


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
