"""Sharing a model: ``imm export diffusers`` (a diffusers pipeline folder, :mod:`imm.interop.export`) and
``imm push`` (a Hugging Face Hub repository with a model card, :mod:`imm.interop.push`)."""

from __future__ import annotations

from imm.cli.options import add_command, add_command_group, add_overrides, split_network_overrides

PUSH_EXAMPLES = """examples:
  imm push runs/mnist hf://me/imm-mnist --dry-run      # builds ./me--imm-mnist and lists it
  imm push runs/mnist hf://me/imm-mnist --private
  imm push cifar10.pt hf://me/imm-cifar10 --config cifar10

then anyone samples it:
  imm generate --checkpoint hf://me/imm-mnist --out samples
"""

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


def cmd_push(args) -> int:
    from imm.interop.push import push

    overrides, network = split_network_overrides(args.overrides)
    repo_id, files, folder = push(args.source, args.repo, private=args.private, dry_run=args.dry_run, out=args.out,
                                  config=args.config, overrides=overrides, network_overrides=network,
                                  license=args.license, overwrite=args.overwrite)
    if folder is not None:
        print(f"dry run: wrote {folder}; `imm push` without --dry-run uploads these files to hf://{repo_id} "
              "in one commit:")
    else:
        print(f"pushed to https://huggingface.co/{repo_id} in one commit:")
    for name in files:
        print(f"  {name}")
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

    p = add_command(sub, "push", help="upload a run or checkpoint to the Hugging Face Hub with a model card",
                    description="Upload SOURCE to the model repository hf://OWNER/REPO in one commit: the network "
                                "(imm generate --checkpoint hf://OWNER/REPO samples it), its diffusers pipeline "
                                "(IMMPipeline.from_pretrained('OWNER/REPO')), a run's config.yaml and a model "
                                "card with the run's measured FIDs. The token is huggingface_hub's login "
                                "(hf auth login).", examples=PUSH_EXAMPLES)
    p.add_argument("source", metavar="SOURCE",
                   help="a run folder, .safetensors, training state, released .pkl/.pt, or hf:// path")
    p.add_argument("repo", metavar="hf://OWNER/REPO", help="the model repository (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--dry-run", action="store_true", help="build the repository's folder locally and list it; "
                                                          "upload nothing")
    p.add_argument("--out", default=None, help="with --dry-run: the folder to build (default: ./OWNER--REPO)")
    p.add_argument("--overwrite", action="store_true", help="with --dry-run: replace --out if it exists")
    p.add_argument("--config", default=None,
                   help="preset or YAML for the sampling entries and encoder (default: what SOURCE records, else cifar10)")
    p.add_argument("--license", default="apache-2.0", help="the model card's license (default: apache-2.0)")
    add_overrides(p, "dotted config overrides, e.g. network.temb_type=identity")
    p.set_defaults(func=cmd_push)
