"""``imm launch slurm`` on a real one-node SLURM cluster (tests/slurm_cluster.py): a 2-task gloo job of the toy
run trains like one process."""

import time
from pathlib import Path

import pytest
import torch

from imm.cli import main
from tests import slurm_cluster
from tests.helpers import TOY_FAST, toy_cfg

pytestmark = pytest.mark.slurm
if slurm_cluster.missing():
    pytest.skip(slurm_cluster.missing(), allow_module_level=True)

MULTI = ["training.batch_size=32", "training.batch_per_device=16", "logging.checkpoint_every=100"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield running
    finally:
        running.stop()


def submitted_job(capsys) -> str:
    """The job id of `imm launch slurm`'s "submitted job ID: SCRIPT" line."""
    line = next((line for line in capsys.readouterr().out.splitlines() if line.startswith("submitted job ")), "")
    assert line, "no 'submitted job' line"
    return line.split()[2].rstrip(":")


def test_a_two_task_job_trains_like_one_process(cluster, tmp_path, capsys, monkeypatch):
    from imm.training.loop import train
    from tests.integration.test_train import assert_trained_alike

    train(toy_cfg("training.total_steps=4", *MULTI), tmp_path / "one", device="cpu")
    capsys.readouterr()
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "slurm", "--tasks-per-node", "2", "--cpus-per-task", "1", "--", "train", "--config",
                 "toy2d", "--run-dir", "two", "--device", "cpu", *TOY_FAST, *MULTI, "training.total_steps=4"]) == 0
    job = submitted_job(capsys)
    text = ended(cluster, job, tmp_path / "two" / "slurm" / f"slurm-{job}.out")
    assert "2 process(es) on cpu" in text and "global batch 32 = 2 x 1 x 16" in text, text[-3000:]
    assert_trained_alike(tmp_path / "one", tmp_path / "two", 4)


def launched(cluster, capsys, config, run_dir: str, *options: str) -> tuple[str, object]:
    """(job id, log path) of a 2-task `imm launch slurm` job of imm train with ``config`` into ``run_dir``."""
    capsys.readouterr()
    assert main(["launch", "slurm", "--tasks-per-node", "2", "--cpus-per-task", "1", *options, "--", "train",
                 "--config", str(config), "--run-dir", run_dir, "--device", "cpu"]) == 0
    job = submitted_job(capsys)
    return job, Path(run_dir).resolve() / "slurm" / f"slurm-{job}.out"


def ended(cluster, job: str, log, state: str = "COMPLETED") -> str:
    """The log of ``job`` once it has ended, in ``state`` (or gone from the controller's memory)."""
    cluster.wait(lambda: cluster.job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", ""),
                 f"job {job} to end", 300)
    text = log.read_text()
    assert cluster.job_state(job) in (state, ""), text[-3000:]
    return text


def trained(cluster, job: str, metrics, steps: int = 20) -> None:
    cluster.wait(lambda: metrics.is_file() and metrics.read_text().count("\n") >= steps // 5,
                 f"job {job} to train {steps} steps", 300)


def restarted(cluster, job: str, log, while_pending=None) -> None:
    """Wait for the stop at a checkpoint and the requeued job, call ``while_pending()``, and start the job now
    (not ~2 minutes later)."""
    cluster.wait(lambda: log.is_file() and "stopped by signal at step" in log.read_text(), "the stop at a checkpoint",
                 180)
    cluster.wait(lambda: cluster.job_state(job) == "PENDING", "the requeued job to wait", 120)
    if while_pending:
        while_pending()
    # slurmd refuses a job credential issued in the same second as the one it revoked when the first run ended
    # ("Job credential revoked"); SLURM's own delay before a requeued job starts again avoids that, so wait 2 s
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")


def test_a_job_requeued_mid_run_finishes_like_an_uninterrupted_one(cluster, tmp_path, capsys, monkeypatch):
    """A running 2-task job requeued by `scontrol requeue` (as a preemption in REQUEUE mode does): every task
    stops at a step, the run writes its training state, the requeued job (started at once with `scontrol update
    StartTime=now`) resumes from the run folder, and its final network equals, bit for bit, that of the same job
    left alone."""
    from tests.helpers import digits_run

    settings = digits_run(tmp_path / "settings", "training.total_steps=100", "training.batch_size=8",
                          "training.batch_per_device=4", "logging.log_every=5", "logging.checkpoint_every=1000")
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    monkeypatch.chdir(tmp_path)
    config = settings / "config.yaml"
    job, log = launched(cluster, capsys, config, "alone")
    ended(cluster, job, log)
    job, log = launched(cluster, capsys, config, "requeued")
    trained(cluster, job, tmp_path / "requeued" / "metrics.jsonl")
    assert cluster.run("scontrol", "requeue", job).returncode == 0  # as a preemption in REQUEUE mode does
    restarted(cluster, job, log)
    text = ended(cluster, job, log)
    assert "restart 1" in text and "resuming at step" in text, text[-3000:]
    assert_equal_runs(tmp_path / "alone", tmp_path / "requeued", 100)


def assert_equal_runs(alone, interrupted, steps: int) -> None:
    """Both runs ended at ``steps`` with equal online and EMA weights, bit for bit."""
    from tests.helpers import online_weights

    (a, ema_a, step_a), (b, ema_b, step_b) = online_weights(alone), online_weights(interrupted)
    assert step_a == step_b == steps
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(ema_a["0.995"][key], ema_b["0.995"][key]), key


def test_a_job_at_its_time_limit_requeues_and_finishes_like_an_uninterrupted_one(cluster, tmp_path, capsys,
                                                                                  monkeypatch):
    """A 2-task job with a one-minute ``--time`` and ``--warning-seconds 15``: SLURM warns the batch shell at its
    first time-limit check 15 s or more after the start (it checks every 30 s and signals up to 30 s early),
    every task stops at a step, the run writes its training state and the job requeues itself. While the job
    waits, its config is edited to end 10 steps past that state, so the requeued run resumes and finishes before
    its own warning; the final network equals, bit for bit, that of an uninterrupted job of the same steps."""
    import yaml

    from tests.helpers import digits_run

    settings = digits_run(tmp_path / "settings", "training.batch_size=8", "training.batch_per_device=4",
                          "logging.log_every=5", "logging.checkpoint_every=1000000")
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    monkeypatch.chdir(tmp_path)
    cfg = yaml.safe_load((settings / "config.yaml").read_text())
    cfg["training"]["total_steps"] = 1_000_000
    config = tmp_path / "timed.yaml"
    config.write_text(yaml.safe_dump(cfg))
    job, log = launched(cluster, capsys, config, "timed", "--time", "1", "--warning-seconds", "15")

    def end_ten_steps_later():
        states = sorted((tmp_path / "timed" / "checkpoints").glob("training-state-*.pt"))
        assert states, log.read_text()[-3000:]
        cfg["training"]["total_steps"] = int(states[-1].stem.rsplit("-", 1)[1]) + 10
        config.write_text(yaml.safe_dump(cfg))

    restarted(cluster, job, log, while_pending=end_ten_steps_later)
    steps = cfg["training"]["total_steps"]
    text = ended(cluster, job, log)
    assert "warned of the time limit" in text and "requeueing job" in text, text[-3000:]
    assert f"resuming at step {steps - 10}" in text and "DUE TO TIME LIMIT" not in text, text[-3000:]
    job, log = launched(cluster, capsys, config, "alone")
    ended(cluster, job, log)
    assert_equal_runs(tmp_path / "alone", tmp_path / "timed", steps)


def test_a_job_stops_requeueing_after_its_bound(cluster, tmp_path, capsys, monkeypatch):
    """With --max-requeues 0 the warning stops the run at a checkpoint and the job ends there, saying why."""
    from tests.helpers import digits_run

    settings = digits_run(tmp_path / "settings", "training.total_steps=100", "training.batch_size=8",
                          "training.batch_per_device=4", "logging.log_every=5")
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    monkeypatch.chdir(tmp_path)
    job, log = launched(cluster, capsys, settings / "config.yaml", "bounded", "--max-requeues", "0")
    trained(cluster, job, tmp_path / "bounded" / "metrics.jsonl")
    assert cluster.run("scancel", "--batch", "--signal=USR1", job).returncode == 0
    text = ended(cluster, job, log, state="FAILED")  # the batch script exits with the run's 75
    assert "stopped by signal at step" in text and "after 0 requeues; not requeued again" in text, text[-3000:]
    assert list((tmp_path / "bounded" / "checkpoints").glob("training-state-*.pt"))
    # resubmitted by hand on another number of tasks, it resumes and ends
    job, log = launched(cluster, capsys, settings / "config.yaml", "bounded", "--tasks-per-node", "1")
    text = ended(cluster, job, log)
    assert "resuming at step" in text and "1 process(es)" in text and (tmp_path / "bounded" / "network.safetensors").is_file()


def test_a_failing_run_is_not_requeued(cluster, tmp_path, capsys, monkeypatch):
    """A run that fails (here: no dataset) ends its job with the error line in the log; nothing requeues it."""
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["launch", "slurm", "--tasks-per-node", "2", "--cpus-per-task", "1", "--", "train", "--config",
                 "mnist", "--run-dir", "failing", "dataset.kind=folder", f"dataset.path={tmp_path / 'nowhere'}"]) == 0
    job = submitted_job(capsys)
    text = ended(cluster, job, tmp_path / "failing" / "slurm" / f"slurm-{job}.out", state="FAILED")
    assert "error:" in text and "nowhere" in text and "requeueing" not in text and "restart 1" not in text, text[-3000:]
