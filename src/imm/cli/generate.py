"""``imm generate``: sample grids, or N seeded images per sampling entry, from a checkpoint."""

from __future__ import annotations

from imm.cli.options import (
    add_command,
    add_device,
    add_fast_path,
    add_overrides,
    add_progress,
    add_threads,
    split_network_overrides,
)

EXAMPLES = """examples:
  imm generate --checkpoint cifar10.pt --config cifar10 --out samples
  imm generate --checkpoint imagenet256_s_a1.pkl --config imagenet256 network.temb_type=identity \\
      encoder.vae_name=/path/to/sd-vae-ft-ema eval.batch_size=16
  torchrun --nproc_per_node=8 -m imm generate --checkpoint cifar10.pt --config cifar10 --num-images 50000
"""


def cmd_generate(args) -> int:
    from imm.core import distributed
    from imm.evaluation.generate import run
    from imm.evaluation.sampling_run import sampling_config

    overrides, network = split_network_overrides(args.overrides)
    cfg, source = sampling_config(args.config, args.checkpoint, overrides)
    entries = args.entries.split(",") if args.entries else None
    paths = run(cfg, args.checkpoint, args.out, network, device=args.device, num_images=args.num_images,
                entries=entries, progress=not args.no_progress, source=source, seed=args.seed,
                batch_size=args.batch_size, precision=args.precision, memory_format=args.memory_format)
    if distributed.is_main():
        for p in paths:
            print(p)
    distributed.shutdown()
    return 0


def add_parsers(sub) -> None:
    from imm.core.config import load_config, preset_names

    with_entries = ", ".join(n for n in preset_names() if load_config(n).get("sampling"))
    p = add_command(sub, "generate", help="sample image grids (or N seeded images for FID) from a checkpoint",
                    description=f"Sample with the sampling entries of a config (presets: {with_entries}).",
                    examples=EXAMPLES)
    p.add_argument("--checkpoint", help="released .pkl/.pt, torch.save file or our .safetensors (or eval.resume=PATH)")
    p.add_argument("--config", default=None,
                   help="preset name or YAML file (default: the settings an imm train checkpoint records, else cifar10)")
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    add_device(p)
    add_fast_path(p)
    p.add_argument("--num-images", type=int, default=None,
                   help="write N seeded images per entry (PNGs + ADM-style .npz) instead of grids")
    p.add_argument("--entries", default=None, help="comma-separated sampling entries to run (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (same as eval.batch_size=)")
    p.add_argument("--seed", type=int, default=None, help="base seed; image i uses seed + i (same as eval.seed=)")
    add_progress(p)
    add_overrides(p, "dotted config overrides, e.g. eval.batch_size=16 network.temb_type=identity")
    add_threads(p)
    p.set_defaults(func=cmd_generate)
