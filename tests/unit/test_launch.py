"""Which launcher started a process (imm.core.distributed.launch): torchrun, SLURM's srun or neither, and one line
for a half-set environment."""

import pytest

from imm.core.distributed import SLURM_PORT_BASE, Launch, first_host, launch
from imm.core.errors import StateError

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
SRUN = {"SLURM_PROCID": "3", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu7,gpu8", "SLURM_JOB_ID": "123456"}


def test_no_launcher_is_one_process():
    assert launch({}) == Launch() == Launch("single", 0, 1, 0, None, None)
    assert launch({"WORLD_SIZE": "1"}) == Launch()  # a lone WORLD_SIZE=1 says one process
    sbatch_script = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}  # a batch script, outside srun
    assert launch(sbatch_script) == Launch()
    assert launch({**SRUN, "SLURM_STEP_NUM_TASKS": "1"}) == Launch()  # srun -n 1


def test_torchrun_and_srun():
    assert launch(TORCHRUN) == Launch("torchrun", 1, 2, 1, "10.0.0.1", 29500)
    assert launch({**SRUN, **TORCHRUN}) == Launch("torchrun", 1, 2, 1, "10.0.0.1", 29500)  # torchrun inside a job
    port = SLURM_PORT_BASE + 123456 % 20000
    assert launch(SRUN) == Launch("slurm", 3, 4, 1, "gpu7", port)  # the step's task count, not the job's
    without_step_count = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert launch(without_step_count).world_size == 8


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "half-set torchrun environment: RANK, WORLD_SIZE set but not LOCAL_RANK, "
                                       "MASTER_ADDR, MASTER_PORT"),
    ({"WORLD_SIZE": "4"}, "half-set torchrun environment"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_ID"}, "half-set SLURM task environment: SLURM_JOB_ID not set"),
    ({k: v for k, v in SRUN.items() if k not in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")},
     "SLURM_STEP_NUM_TASKS or SLURM_NTASKS not set"),
    ({**TORCHRUN, "RANK": "one"}, "RANK='one' is not an integer"),
])
def test_a_half_set_environment_is_one_line(env, message):
    with pytest.raises(StateError, match=message) as info:
        launch(env)
    assert "\n" not in str(info.value)


def test_first_host_of_a_node_list(monkeypatch):
    assert first_host("node3") == "node3" and first_host("a,b,c") == "a"
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: a range cannot be expanded
    with pytest.raises(StateError, match=r"cannot expand SLURM_JOB_NODELIST='node\[3-4\]' with scontrol"):
        first_host("node[3-4]")


def test_launch_slurm_dry_run_writes_the_batch_script(tmp_path, capsys, monkeypatch):
    """`imm launch slurm --dry-run` writes RUN/slurm/job.sbatch: one task per GPU, --requeue, the warning
    signal, the log in the run folder, imm train under srun, and the bounded requeue on exit 75."""
    from imm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["launch", "slurm", "--nodes", "4", "--gpus-per-node", "8", "--time", "04:00:00", "--partition", "gpu",
                 "--max-requeues", "3", "--dry-run", "--", "train", "--config", "cifar10", "--run-dir", "runs/c10",
                 "training.batch_size=512"]) == 0
    script = (tmp_path / "runs" / "c10" / "slurm" / "job.sbatch").read_text()
    assert capsys.readouterr().out.startswith(script)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=04:00:00", "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120", f"#SBATCH --output={tmp_path}/runs/c10/slurm/slurm-%j.out",
                 f"#SBATCH --chdir={tmp_path}", "max_requeues=3",
                 "trap 'stopped=1; echo \"imm launch: warned of the time limit; stopping every task at a checkpoint\"",
                 """      scancel --signal=TERM "$SLURM_JOB_ID"' USR1""", "trap 'stopped=1' TERM",
                 "-m imm train --config cifar10 --run-dir runs/c10 training.batch_size=512 &",
                 'if [ "$status" -eq 75 ] || { [ "$stopped" -eq 1 ] && [ "$status" -ne 0 ]; }; then',
                 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script, line
    assert "OMP_NUM_THREADS" not in script  # GPU tasks: torch's own threads


def test_launch_slurm_warning_seconds_and_a_time_in_minutes_reach_the_script(tmp_path, capsys, monkeypatch):
    from imm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["launch", "slurm", "--time", "90", "--warning-seconds", "600", "--dry-run", "--", "train",
                 "--config", "toy2d"]) == 0
    script = (tmp_path / "runs" / "toy2d" / "slurm" / "job.sbatch").read_text()
    assert "#SBATCH --time=90\n" in script and "#SBATCH --signal=B:USR1@600\n" in script


@pytest.mark.parametrize("args, message", [
    (["--dry-run", "--", "generate"], "imm launch slurm runs `imm train`"),
    (["--warning-seconds", "0", "--dry-run", "--", "train", "--config", "toy2d"], "--warning-seconds must be"),
    (["--time", "four hours", "--dry-run", "--", "train", "--config", "toy2d"], "--time 'four hours'"),
    (["--nodes", "0", "--dry-run", "--", "train", "--config", "toy2d"], "--nodes must be an integer >= 1"),
    (["--partition", "gpu;rm", "--dry-run", "--", "train", "--config", "toy2d"], "letters, digits"),
])
def test_launch_slurm_refuses_bad_options_in_one_line(tmp_path, capsys, monkeypatch, args, message):
    from imm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["launch", "slurm", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
