"""``imm convert`` (any supported checkpoint -> our .safetensors) and ``imm info`` (a checkpoint's configuration)."""

from __future__ import annotations

import json

from imm.cli.options import add_command, add_overrides, split_network_overrides

EXAMPLES_CONVERT = """examples:
  imm convert cifar10.pkl cifar10.safetensors
  imm convert imagenet256_s_a1.pkl in256-s.safetensors temb_type=identity
"""

EXAMPLES_INFO = """examples:
  imm info cifar10.safetensors
  imm info runs/mnist/network.safetensors    # the network imm train writes
"""


def cmd_convert(args) -> int:
    from imm.io.checkpoint import convert
    from imm.model.network import network_arguments

    _, network = split_network_overrides([o if o.startswith("network.") else f"network.{o}" for o in args.overrides])
    net = convert(args.src, args.dst, **network_arguments(network))
    n = sum(p.numel() for p in net.parameters())
    print(f"wrote {args.dst} ({net.config['model_type']}, {n:,} parameters)")
    return 0


def cmd_info(args) -> int:
    from imm.io.checkpoint import read_checkpoint

    config, tensors = read_checkpoint(args.checkpoint)
    n = sum(t.numel() for t in tensors.values())
    print(json.dumps({"config": config, "tensors": len(tensors), "parameters": n}, indent=2, default=str))
    return 0


def add_parsers(sub) -> None:
    p = add_command(sub, "convert", help="convert a checkpoint to our safetensors format",
                    description="Read any supported checkpoint and write one .safetensors file "
                                "(weights + JSON configuration in its metadata).",
                    examples=EXAMPLES_CONVERT)
    p.add_argument("src", help="released pickle, torch.save file or .safetensors")
    p.add_argument("dst", help="output .safetensors path")
    add_overrides(p, "network configuration overrides, e.g. temb_type=identity")
    p.set_defaults(func=cmd_convert)

    p = add_command(sub, "info", help="print a checkpoint's network configuration and size",
                    description="Read a checkpoint safely and print its configuration as JSON.",
                    examples=EXAMPLES_INFO)
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)
