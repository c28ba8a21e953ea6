"""``imm launch slurm``: an ``imm train`` run as a SLURM batch job that requeues itself (:mod:`imm.interop.slurm`)."""

from __future__ import annotations

import argparse
import dataclasses

from imm.cli.options import add_command, add_command_group

EXAMPLES = """examples:
  imm launch slurm --nodes 4 --gpus-per-node 8 --time 04:00:00 --partition gpu -- \\
      train --config imagenet256-dit-xl --run-dir /shared/runs/xl dataset.path=/data/in256-latents.zip
  imm launch slurm --nodes 1 --tasks-per-node 2 --cpus-per-task 1 --dry-run -- train --config toy2d
"""


def cmd_launch_slurm(args) -> int:
    from imm.cli import build_parser, parse_command_line
    from imm.cli.train import run_folder
    from imm.core.errors import InputError
    from imm.interop.slurm import SlurmJob, submit, write_script

    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(SlurmJob)}
    job = SlurmJob(**{name: value for name, value in given.items() if value is not None})  # else its defaults
    train_args = args.train_command[1:] if args.train_command[:1] == ["--"] else args.train_command
    if train_args[:1] != ["train"]:
        raise InputError("imm launch slurm runs `imm train`: end the options with -- train --config NAME ...")
    run_dir = run_folder(parse_command_line(build_parser(), train_args))  # the one imm train will use
    script = write_script(job, train_args[1:], run_dir)
    if args.dry_run:
        print(script.read_text(), end="")
        print(f"# wrote {script}; submit it with: sbatch {script}")
        return 0
    job_id = submit(script)
    print(f"submitted job {job_id}: {script}\nlog: {script.parent}/slurm-{job_id}.out")
    return 0


def add_parsers(sub) -> None:
    group = add_command_group(sub, "launch", help="run imm train on a cluster's scheduler (SLURM)",
                              description="Run imm train through a cluster's scheduler.", examples=EXAMPLES)
    p = add_command(group, "slurm", help="write and submit a SLURM batch job that survives preemption",
                    description="Write RUN/slurm/job.sbatch (one task per GPU, or --tasks-per-node CPU tasks with "
                                "gloo; --requeue; a warning signal before the time limit) and submit it with sbatch. "
                                "On the warning or a preemption every task finishes its step, the run writes its "
                                "training state, and the job requeues itself (at most --max-requeues times); the "
                                "requeued job resumes from the run folder.", examples=EXAMPLES)
    p.add_argument("--nodes", type=int, help="nodes (default: 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node, one task each (default: 0, CPU)")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node (default: one per GPU, else 1; CPU tasks train with gloo)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per task (sbatch --cpus-per-task)")
    p.add_argument("--partition", default=None, help="the partition (sbatch --partition)")
    p.add_argument("--time", default=None, help="the time limit: minutes, HH:MM:SS or D-HH:MM:SS (sbatch --time)")
    p.add_argument("--account", default=None, help="the account to charge (sbatch --account)")
    p.add_argument("--max-requeues", type=int, help="requeue at most this many times (default: 10)")
    p.add_argument("--warning-seconds", type=int,
                   help="warn the job this many seconds before its time limit (sbatch --signal; default: 120)")
    p.add_argument("--dry-run", action="store_true", help="write and print the script; submit nothing")
    p.add_argument("train_command", nargs=argparse.REMAINDER, metavar="-- train ...",
                   help="the imm train command line")
    p.set_defaults(func=cmd_launch_slurm)
