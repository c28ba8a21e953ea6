"""``imm prepare images`` (image folders or zips -> EDM-style PNG zip), ``imm prepare latents`` (-> SD-VAE latent
archive) and ``imm prepare stats`` (describe a dataset, preview grid)."""

from __future__ import annotations

import json

from imm.cli.options import add_command, add_command_group, add_device, add_progress, positive

EXAMPLES_PREPARE = """examples:
  imm prepare images --source /data/ILSVRC2012/train --dest /data/in256.zip --resolution 256 \\
      --transform center-crop-dhariwal --workers 16
  imm prepare images --source photos.zip --dest photos-64.zip --resolution 64 --transform center-crop
  torchrun --nproc_per_node=8 -m imm prepare latents --source /data/in256.zip --dest /data/in256-latents.zip
  imm prepare stats --source /data/in256-latents.zip --config imagenet256 --grid preview.png
"""

EXAMPLES_PREPARE_IMAGES = """examples:
  imm prepare images --source /data/ILSVRC2012/train --dest /data/in256.zip --resolution 256 \\
      --transform center-crop-dhariwal --min-size 1 --workers 16
  imm prepare images --source photos.zip --dest photos-64.zip --resolution 64 --transform center-crop
  imm prepare images --source cifar-png/ --dest cifar10-32x32.zip --resolution 32    # already 32x32

Class sub-folders (sorted names -> class ids 0..K-1) become labels in dataset.json; a folder of
loose images is unlabelled. Unreadable files, files that are not regular files (FIFOs, devices:
never opened), images of an unsupported bit depth and images smaller than --min-size are skipped,
counted and named (the first few per reason). 16-bit images are scaled to 8 bits with rounding.
The zip is written to a temporary file and renamed when complete.
"""

EXAMPLES_PREPARE_LATENTS = """examples:
  imm prepare latents --source /data/in256.zip --dest /data/in256-latents.zip
  torchrun --nproc_per_node=8 -m imm prepare latents --source /data/in256.zip --dest /data/in256-latents.zip \\
      --vae /models/sd-vae-ft-ema --batch-size 128
  imm prepare latents --source small.zip --dest small-latents --vae ./tiny-vae --device cpu   # a folder

Rerunning the same command resumes: finished shards (1000 images each) are kept and skipped. The
per-channel raw_mean/raw_std go to DEST_STEM.stats.json and are printed as encoder.* overrides.
"""

EXAMPLES_PREPARE_STATS = """examples:
  imm prepare stats --source /data/in256.zip --grid in256.png
  imm prepare stats --source /data/in256-latents.zip --config imagenet256 --grid latents.png  # decodes with the VAE
  imm prepare stats --source /data/in256-latents.zip --grid latents.png    # mean channels 0-2, no VAE
  imm prepare stats --source mnist
"""


def cmd_prepare_images(args) -> int:
    from imm.data.prepare import prepare_images, skip_summary

    info = prepare_images(args.source, args.dest, resolution=args.resolution, transform=args.transform,
                          max_images=args.max_images, min_size=args.min_size, use_labels=not args.no_labels,
                          workers=args.workers, progress=not args.no_progress, overwrite=args.overwrite)
    labels = f"{info['label_dim']} classes" if info["label_dim"] else "unlabelled"
    print(f"wrote {info['path']} ({info['count']} images, {labels})")
    print(skip_summary(info["skipped"]))
    return 0


def cmd_prepare_latents(args) -> int:
    from imm.core import distributed
    from imm.data.latents import write_latent_archive

    result = write_latent_archive(args.source, args.dest, vae=args.vae, batch_size=args.batch_size,
                                  dtype=args.dtype, shard_size=args.shard_size, device=args.device,
                                  use_fp16=not args.no_fp16, workers=args.workers, progress=not args.no_progress)
    if result is not None and result.get("finished"):
        print(f"wrote {result['path']} ({result['count']} latents)")
    distributed.shutdown()
    return 0


def cmd_prepare_stats(args) -> int:
    from imm.data.prepare import dataset_stats, format_stats

    info = dataset_stats(args.source, config=args.config, grid=args.grid, vae=args.vae,
                         num_images=args.num_images, device=args.device)
    print(json.dumps(info) if args.json else format_stats(info))
    return 0


def add_parsers(sub) -> None:
    from imm.data.prepare import TRANSFORMS

    psub = add_command_group(sub, "prepare", help="make datasets: image zips, VAE latent archives, dataset statistics",
                             description="Dataset tools: `images` (folders/zips -> EDM-style PNG zip), `latents` "
                                         "(PNG zip -> SD-VAE latent archive, torchrun-sharded, resumable) and "
                                         "`stats` (describe any dataset the trainer reads, preview grid).",
                             examples=EXAMPLES_PREPARE)

    r = add_command(psub, "images", help="image folder or zip -> EDM-style zip of PNGs with dataset.json",
                    description="Convert a folder or zip of images (class sub-folders = labels) into a zip "
                                "of RESxRES RGB PNGs (00000/img00000000.png, 1000 per folder) with "
                                "dataset.json, as EDM's dataset_tool writes.",
                    examples=EXAMPLES_PREPARE_IMAGES)
    r.add_argument("--source", required=True, help="a folder or a .zip of images")
    r.add_argument("--dest", required=True, help="output .zip")
    r.add_argument("--resolution", type=int, default=256, help="output size in pixels (default: 256)")
    r.add_argument("--transform", choices=TRANSFORMS, default=None,
                   help="center-crop: largest centred square, LANCZOS; center-crop-dhariwal: ADM/DiT ImageNet "
                        "crop (BOX halving, BICUBIC); center-crop-wide: 2:1 crop on a black square. Default: "
                        "none (images must already be RESxRES)")
    r.add_argument("--max-images", type=positive, default=None, help="stop after N images (default: all)")
    r.add_argument("--min-size", type=int, default=None,
                   help="skip images whose shorter side is below this many pixels (default: resolution/16, "
                        "at least 8; 1 keeps every readable image)")
    r.add_argument("--no-labels", action="store_true", help="ignore class folders (unlabelled dataset)")
    r.add_argument("--workers", type=positive, default=1, help="decoding processes (default: 1)")
    r.add_argument("--overwrite", action="store_true", help="replace --dest if it exists")
    add_progress(r)
    r.set_defaults(func=cmd_prepare_images)

    r = add_command(psub, "latents", help="image zip -> SD-VAE latent archive (mean and std per image)",
                    description="Encode every image with diffusers' AutoencoderKL and store the posterior "
                                "mean and std concatenated on channels ([2C, h, w] .npy, EDM2-style), with "
                                "dataset.json and per-channel statistics. Run under torchrun to shard over "
                                "GPUs; rerun to resume.",
                    examples=EXAMPLES_PREPARE_LATENTS)
    r.add_argument("--source", required=True, help="an image archive (from imm prepare images) or folder")
    r.add_argument("--dest", required=True, help="output .zip (built in DEST.work/, then packed) or a folder")
    r.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="Hugging Face hub id or a local diffusers AutoencoderKL folder (default: stabilityai/sd-vae-ft-ema)")
    r.add_argument("--batch-size", type=positive, default=64, help="images per VAE call (default: 64)")
    r.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="stored dtype (default: float32; float16 halves the size)")
    r.add_argument("--shard-size", type=positive, default=1000,
                   help="images per shard = per folder, the unit of resuming (default: 1000)")
    add_device(r)
    r.add_argument("--no-fp16", action="store_true", help="run the VAE in float32 on GPU (default: float16)")
    r.add_argument("--workers", type=int, default=None,
                   help="image-decoding DataLoader workers per process (default: 4 on GPU, 0 on CPU)")
    add_progress(r)
    r.set_defaults(func=cmd_prepare_latents)

    r = add_command(psub, "stats", help="describe a dataset (count, shape, labels) and write a preview grid",
                    description="Print resolution, channels, dtype, count and a label summary of any dataset "
                                "the trainer reads; --grid writes a preview (latents are decoded through the "
                                "VAE of --vae or of the --config's encoder).",
                    examples=EXAMPLES_PREPARE_STATS)
    r.add_argument("--source", default=None, help="folder, .zip, .npz or mnist (default: the config's dataset.path)")
    r.add_argument("--config", default=None, help="preset or YAML: its dataset options and encoder (for decoding)")
    r.add_argument("--grid", default=None, help="write a preview grid PNG here")
    r.add_argument("--num-images", type=positive, default=64, help="items in the grid (default: 64)")
    r.add_argument("--vae", default=None, help="decode latent previews with this VAE (hub id or folder)")
    add_device(r, default="cpu")
    r.add_argument("--json", action="store_true", help="print JSON instead of text")
    r.set_defaults(func=cmd_prepare_stats)
