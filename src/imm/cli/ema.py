"""``imm ema reconstruct``: post-hoc EMA networks of any width from a run's snapshots (EDM2, Sec. 3)."""

from __future__ import annotations

from imm.cli.options import add_command, add_command_group, add_progress

EXAMPLES = """examples:
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


def add_parsers(sub) -> None:
    esub = add_command_group(sub, "ema", help="post-hoc EMA: any EMA length after training, from the run's snapshots",
                             description="Post-hoc EMA (Karras et al. 2024, EDM2, Sec. 3): a run with "
                                         "training.phema=true stores snapshots of two power-function EMAs; "
                                         "`reconstruct` combines them into the EMA of any relative width sigma_rel.",
                             examples=EXAMPLES)

    r = add_command(esub, "reconstruct", help="write the EMA networks of given widths sigma_rel",
                    description="Solve the paper's least-squares problem over all of RUN/phema/'s snapshots "
                                "for each width, at the newest snapshot's step, and write "
                                "OUT/phema-SIGMA_REL.safetensors (networks imm generate and imm eval fid take).",
                    examples=EXAMPLES)
    r.add_argument("--run-dir", required=True, help="the training run folder (its snapshots are in RUN/phema/)")
    r.add_argument("--sigma-rel", required=True,
                   help="comma-separated relative EMA widths, e.g. 0.05,0.08,0.12 (each in (0, 0.3003])")
    r.add_argument("--out", required=True, help="output folder for phema-SIGMA_REL.safetensors")
    add_progress(r)
    r.set_defaults(func=cmd_ema_reconstruct)
