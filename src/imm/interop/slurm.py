"""``imm launch slurm``: an ``imm train`` run as a SLURM batch job that survives preemption and time limits.

:func:`sbatch_script` writes a readable script (``man sbatch``): one task per GPU (or ``tasks_per_node`` CPU
tasks with gloo), ``#SBATCH --requeue``, and ``#SBATCH --signal=B:USR1@SECONDS`` so the batch shell is warned
before the time limit. On that warning the shell sends SIGTERM to every task (``scancel --signal=TERM``; on
a preemption or a requeue SLURM sends it to them itself); every task finishes its step, the run writes its training state and exits with
:data:`imm.training.loop.EXIT_STOPPED` (75); the shell then requeues the job (``scontrol requeue``) while
``SLURM_RESTART_COUNT`` is below the bound and the stop wrote a newer training state than the job started
from (a run that stops without progress is not requeued again; also when the step ends otherwise after such
a signal: ``srun`` ends a step's other tasks once one has exited), and the requeued job resumes from the run folder with no flag.
Any other exit ends the job as it is. Each task finds its rank from SLURM's environment
(:func:`imm.core.distributed.launch`), so the script runs ``imm train`` itself under ``srun``, no torchrun.

:func:`submit` runs ``sbatch --parsable``; nothing here polls or schedules by itself.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from imm.core.errors import InputError, MissingError, StateError
from imm.core.files import write_text
from imm.training.loop import EXIT_STOPPED

TIME_FORMAT = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")  # sbatch's --time: minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]


@dataclass(frozen=True)
class SlurmJob:
    """What the batch job asks SLURM for (see ``man sbatch``)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one per GPU, else 1
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    max_requeues: int = 10
    warning_seconds: int = 120  # how long before the time limit the batch shell is warned

    def __post_init__(self):
        for name in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "max_requeues", "warning_seconds"):
            value = getattr(self, name)
            low = 0 if name in ("gpus_per_node", "max_requeues") else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.time is not None and not TIME_FORMAT.match(self.time):
            raise InputError(f"--time {self.time!r}: give minutes, HH:MM:SS or D-HH:MM:SS (as sbatch takes it)")
        for name in ("partition", "account"):
            value = getattr(self, name)
            if value is not None and not re.fullmatch(r"[A-Za-z0-9_.,:+-]+", value):
                raise InputError(f"--{name} {value!r}: letters, digits and _ . , : + - only")

    @property
    def tasks(self) -> int:
        """Tasks per node: ``tasks_per_node``, else one per GPU, else one."""
        return self.tasks_per_node or self.gpus_per_node or 1


def sbatch_script(job: SlurmJob, train_args: list[str], run_dir: Path, python: str | None = None) -> str:
    """The batch script that runs ``imm train TRAIN_ARGS`` (whose run folder is ``run_dir``) as ``job``."""
    run_dir = Path(run_dir).resolve()
    logs = run_dir / "slurm"
    options = [f"--job-name=imm-{run_dir.name}", f"--nodes={job.nodes}", f"--ntasks-per-node={job.tasks}"]
    options += [f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []
    options += [f"--cpus-per-task={job.cpus_per_task}"] if job.cpus_per_task else []
    options += [f"--{name}={getattr(job, name)}" for name in ("partition", "account", "time") if getattr(job, name)]
    options += ["--requeue", f"--signal=B:USR1@{job.warning_seconds}", "--open-mode=append",
                f"--output={logs}/slurm-%j.out", f"--chdir={Path.cwd()}"]  # train_args' paths as given here
    command = shlex.join([python or sys.executable, "-m", "imm", "train", *train_args])
    threads = 'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"\n' if not job.gpus_per_node else ""
    return f"""#!/bin/bash
# Written by `imm launch slurm`; submit it again with: sbatch {shlex.quote(str(logs / 'job.sbatch'))}
# One task per {'GPU' if job.gpus_per_node else 'CPU slot'}; each finds its rank from SLURM's environment.
# The time-limit warning (USR1) or a preemption (TERM) stops the run at a checkpoint (exit {EXIT_STOPPED}), and the
# job requeues itself at most {job.max_requeues} times; the requeued job resumes from the run folder.
{chr(10).join(f'#SBATCH {option}' for option in options)}

max_requeues={job.max_requeues}
stopped=0
{threads}# the time-limit warning (USR1, to this shell only): SIGTERM to every task, which stops at a checkpoint
trap 'stopped=1; echo "imm launch: warned of the time limit; stopping every task at a checkpoint"
      scancel --signal=TERM "$SLURM_JOB_ID"' USR1
# a preemption or a requeue: SLURM sends SIGTERM to the tasks itself; this shell waits for them
trap 'stopped=1' TERM
newest() {{ ls {shlex.quote(str(run_dir / 'checkpoints'))} 2>/dev/null | grep -E '^training-state-[0-9]+[.]pt$' | sort | tail -n 1; }}
before=$(newest)
echo "imm launch: job $SLURM_JOB_ID, restart ${{SLURM_RESTART_COUNT:-0}}, on $SLURM_JOB_NODELIST"
srun --kill-on-bad-exit=1 {command} &
step=$!
status=0
wait "$step" || status=$?
while kill -0 "$step" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for the step itself
    status=0
    wait "$step" || status=$?
done
# stopped at a checkpoint: the run's exit {EXIT_STOPPED}, or a signal to this job and any failure (srun ends the
# other tasks of a step once one has exited)
if [ "$status" -eq {EXIT_STOPPED} ] || {{ [ "$stopped" -eq 1 ] && [ "$status" -ne 0 ]; }}; then
    if [ "$(newest)" = "$before" ]; then
        echo "imm launch: the run stopped without a newer training state than at its start ($before): not requeued"
    elif [ "${{SLURM_RESTART_COUNT:-0}}" -lt "$max_requeues" ]; then
        echo "imm launch: the run stopped at a checkpoint; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "imm launch: the run stopped at a checkpoint after $max_requeues requeues; not requeued again"
    fi
fi
exit "$status"
"""


def write_script(job: SlurmJob, train_args: list[str], run_dir, python: str | None = None) -> Path:
    """``RUN/slurm/job.sbatch`` (:func:`sbatch_script`), written atomically; returns its path."""
    path = Path(run_dir).resolve() / "slurm" / "job.sbatch"
    write_text(path, sbatch_script(job, train_args, run_dir, python))
    path.chmod(0o755)
    return path


def submit(script: Path) -> str:
    """``sbatch --parsable SCRIPT``: the job id."""
    try:
        done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise MissingError("sbatch is not on the PATH: run imm launch slurm on a SLURM login node "
                           "(or --dry-run to write the script only)") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise StateError(f"sbatch refused {script}: {reason}")
    return done.stdout.strip().split(";")[0]
