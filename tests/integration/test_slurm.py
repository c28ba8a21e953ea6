"""``imm launch slurm`` on a real one-node SLURM cluster (tests/slurm_cluster.py): a 2-task gloo job of the toy
run trains like one process."""

import pytest

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
    log = tmp_path / "two" / "slurm" / f"slurm-{job}.out"
    cluster.wait(lambda: cluster.job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", ""),
                 f"job {job} to end", 300)
    text = log.read_text()
    assert cluster.job_state(job) in ("COMPLETED", ""), text[-3000:]
    assert "2 process(es) on cpu" in text and "global batch 32 = 2 x 1 x 16" in text, text[-3000:]
    assert_trained_alike(tmp_path / "one", tmp_path / "two", 4)
