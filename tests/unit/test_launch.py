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
