"""``imm export diffusers``: a checkpoint as a diffusers pipeline folder (:mod:`imm.interop.export`)."""

from __future__ import annotations

from imm.cli.options import add_command, add_command_group, add_overrides, split_network_overrides

EXAMPLES = """examples:
  imm export diffusers runs/mnist mnist-diffusers
  imm export diffusers cifar10.pt cifar10-diffusers --config cifar10
  imm export diffusers hf://OWNER/REPO/network.safetensors out

then, in Python:
  from imm import IMMPipeline
  pipe = IMMPipeline.from_pretrained("mnist-diffusers")
  images = pipe(batch_size=4, num_inference_steps=2).images
"""


def cmd_export_diffusers(args) -> int:
    from imm.interop.export import export_diffusers

    overrides, network = split_network_overrides(args.overrides)
    out = export_diffusers(args.checkpoint, args.out, config=args.config, overrides=overrides,
                           network_overrides=network, overwrite=args.overwrite,
                           copy_vae=True if args.copy_vae else None)
    print(f"wrote {out}")
    return 0


def add_parsers(sub) -> None:
    group = add_command_group(sub, "export", help="write a checkpoint in another tool's format (diffusers)",
                              description="Write a checkpoint in another tool's format.", examples=EXAMPLES)
    p = add_command(group, "diffusers", help="a diffusers pipeline folder (IMMPipeline.from_pretrained loads it)",
                    description="Write CKPT as a diffusers pipeline folder OUT: the network, its sampler (the "
                                "training method's, with the sampling entries the checkpoint records or --config "
                                "gives) and the encoder that decodes its samples. Needs diffusers.",
                    examples=EXAMPLES)
    p.add_argument("checkpoint", metavar="CKPT",
                   help="a run folder, .safetensors, training state, released .pkl/.pt, or hf:// path")
    p.add_argument("out", metavar="OUT", help="the folder to write")
    p.add_argument("--config", default=None,
                   help="preset or YAML for the sampling entries and encoder (default: what CKPT records, else cifar10)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--copy-vae", action="store_true",
                   help="a latent network: copy its VAE into OUT as the vae component (default: only a VAE other "
                        "than stabilityai/sd-vae-ft-ema or -mse, which OUT names and the pipeline loads from the Hub)")
    add_overrides(p, "dotted config overrides, e.g. network.temb_type=identity encoder.vae_name=FOLDER")
    p.set_defaults(func=cmd_export_diffusers)
