"""Candidate recipes for ``imm demo`` at the demo's own scale, measured the way docs/demo.md measures the demo.

    python benchmarks/demo_recipe.py --variants "M=4;M=1;M=1, euler_fm"          # train, then FID at 1/2/4 steps
    python benchmarks/demo_recipe.py --variants "M=1" --mid-t 0.3,0.4,0.5,0.6,0.7   # also choose the 2-step middle time
    python benchmarks/demo_recipe.py --variants "M=4;M=1;flow matching" --cached-only   # the table from the record

Each variant is the ``mnist`` preset exactly as ``imm demo`` trains it (1.25M-parameter UNet, batch 64,
900 steps, both cores) in fp32 (as the recorded variants were; the ``bf16`` ones say so) with a few overrides, trained one after the other into ``--out``/<variant>/ (a
killed run resumes from its last checkpoint). FID of ``--num-images`` EMA samples (default 1,000, image
i from seed i: the protocol of docs/demo.md's 99.8 at 2 steps) at 1, 2 and 4 steps on uniform time
grids against the bundled 5,000-digit reference, cached in ``--out``/<variant>/fid-N-seedS.json and
in ``--record`` (default benchmarks/results/demo_recipe.json, kept in git; see benchmarks/record.py): a
variant whose FIDs are all on record is not trained again. Every entry is a ``SamplingEntry`` sampled
by the variant's ``loss.kind`` (``imm.methods.registry.entry_sampler``, the path of ``imm eval fid``):
flow matching takes Euler steps along the entry's time grid.

``--mid-t``: the 2-step sampler T -> t_mid -> eps for each t_mid given (in t, OT-FM time: x_t = (1 - t) x
+ t z), scored on ``--select-images`` images from other seeds (10^6 + i), so that the choice is not
made on the images that report it; the chosen t_mid is then scored on the reporting seeds (a rerun
with more t_mid values reuses the cached scores; ``--cached-only`` chooses among all cached ones).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from imm.model.sampling import SamplingEntry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record  # noqa: E402  (the FIDs kept in git)
from mnist_study import FID_SEED, checkpoint_at  # noqa: E402
from quality import counted_forward_equivalents, method_steps  # noqa: E402  (the equal-compute rule of quality.py)

VARIANTS = {
    "preset": [],
    "M=1": ["loss.group_size=1"],
    "M=4": ["loss.group_size=4"],  # the recipe of mnist_study.py (IMM_RECIPE)
    "M=2": ["loss.group_size=2"],
    "euler_fm": ["network.f_type=euler_fm"],
    "M=1, euler_fm": ["loss.group_size=1", "network.f_type=euler_fm"],
    "M=2, euler_fm": ["loss.group_size=2", "network.f_type=euler_fm"],
    "b=2": ["loss.b=2"],  # the preset (M = 1) with the study's b = 2, better at 2 NFE at both seeds there
    # the baselines at equal compute: the preset's 900 IMM steps are 1,200 flow-matching steps, 720 MeanFlow
    # steps (the paper's recipe, the loss's defaults, with its (t, t - r) conditioning on an euler_fm network)
    "flow matching": ["loss.kind=flow_matching"],
    "meanflow": ["loss.kind=meanflow", "network.f_type=euler_fm", "network.temb_type=stride"],
    # the preset in each precision (its precision=auto is one of them, by machine), at two training seeds:
    # bf16 trains in the bf16 working copy and samples in bf16 too (docs/benchmarks.md, "The fast path")
    "fp32": ["training.precision=fp32", "training.memory_format=contiguous"],
    "fp32, seed=1": ["training.precision=fp32", "training.memory_format=contiguous", "training.seed=1"],
    "bf16": ["training.precision=bf16", "training.memory_format=contiguous"],
    "bf16, seed=1": ["training.precision=bf16", "training.memory_format=contiguous", "training.seed=1"],
}
STEPS = {"imm": [1, 2, 4], "flow_matching": [1, 2, 4, 8], "meanflow": [1, 2, 4]}
PRECISION = ["training.precision=fp32", "training.memory_format=contiguous"]  # unless a variant says otherwise
REPORT_SEED = 0
RECORD = Path(__file__).resolve().parent / "results" / "demo_recipe.json"


def run_dir_of(out: Path, name: str) -> Path:
    return out / name.replace(", ", "+").replace(" ", "_").replace("=", "")


def variant_config(name: str) -> dict:
    """The variant's training config: the mnist preset in fp32 with its overrides, a baseline given the
    preset's IMM compute in its own steps."""
    from imm.training.config import load_train_config

    cfg = load_train_config("mnist", PRECISION + VARIANTS[name] + ["logging.progress=false"])
    cfg["training"]["total_steps"] = method_steps(int(cfg["training"]["total_steps"]), cfg["loss"]["kind"])
    return cfg


def train_variant(cfg: dict, run_dir: Path) -> None:
    """Train (or resume, or find finished) a variant's run."""
    from imm.training.loop import train

    steps = cfg["training"]["total_steps"]
    if not ((run_dir / "network.safetensors").exists() and checkpoint_at(run_dir, steps).exists()):
        t0 = time.perf_counter()
        train(cfg, run_dir, progress=False)
        print(f"{run_dir.name}: trained {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)


def fids(args, name: str, entries: dict, num_images: int, seed: int) -> dict:
    """FID of the variant's EMA network for each sampling entry (``{key: SamplingEntry}``, sampled by the
    variant's ``loss.kind``: ``imm.methods.registry.entry_sampler``), from the
    record and the run's cache where there, else measured (training the run first if need be) and kept in
    both. With ``--cached-only`` only the known ones (all known ones if ``entries`` is None)."""
    cfg, run_dir, key = variant_config(name), run_dir_of(args.out, name), f"fid-{num_images}-seed{seed}"
    recipe = record.recipe(cfg, steps=cfg["training"]["total_steps"])
    on_record = record.cells(args.record, run_dir.name, recipe, key)
    cache = {**on_record, **record.load(run_dir / f"{key}.json")}
    if not args.cached_only and cache.keys() - on_record.keys():  # cached in the run dir but not on record: record them
        record.add(args.record, run_dir.name, recipe, key, {k: v for k, v in cache.items() if k not in on_record})
    if entries is None:
        return cache
    todo = {k: v for k, v in entries.items() if k not in cache}
    if todo and not args.cached_only:
        import imm
        from imm.data.encoders import build_encoder
        from imm.evaluation.evaluate import load_reference, network_fid
        from imm.evaluation.inception import load_inception
        from imm.methods.registry import entry_sampler
        from imm.model.precision import sampling_network

        train_variant(cfg, run_dir)
        net = imm.load_network(run_dir / "network.safetensors").eval()
        if cfg["training"]["precision"] == "bf16":
            net = sampling_network(net, torch.bfloat16)
        mu, sigma = load_reference("mnist")
        encoder = build_encoder(cfg["encoder"])
        rows = network_fid(net, encoder, load_inception(), todo, mu, sigma, num_images, 100, seed=seed,
                           device=torch.device("cpu"), progress=False, sample_fn=entry_sampler(cfg["loss"]["kind"]))
        new = {k: r["fid"] for k, r in zip(todo, rows)}
        cache.update(new)
        record.save_json(run_dir / f"{key}.json", {**record.load(run_dir / f"{key}.json"), **new})
        record.add(args.record, run_dir.name, recipe, key, new)
    return {k: cache[k] for k in entries if k in cache}


def mid_t_entry(t_mid: float) -> SamplingEntry:
    """The 2-step entry through t_mid; it gives the middle time as eta = t / (1 - t) (the OT-FM
    noise-to-signal ratio, ``mid_nt`` of the release's sampling entries)."""
    return SamplingEntry(mid_nt=(t_mid / (1 - t_mid),))


def uniform_entries(steps: list[int]) -> dict[str, SamplingEntry]:
    return {f"{s} steps": SamplingEntry.uniform(s) for s in steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--variants", default="preset;flow matching",
                        help=f"';'-separated variants, of: {'; '.join(VARIANTS)} (default: preset;flow matching)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo-scale"), help="runs and FIDs (default: runs/demo-scale)")
    parser.add_argument("--num-images", type=int, default=1000, help="images per FID (default 1000)")
    parser.add_argument("--mid-t", default=None, help="comma-separated 2-step middle times t to choose from, e.g. 0.4,0.5,0.6")
    parser.add_argument("--select-images", type=int, default=300, help="images per FID when choosing --mid-t (default 300)")
    parser.add_argument("--record", type=Path, default=RECORD,
                        help=f"the FIDs measured, kept across machines (default {RECORD.relative_to(RECORD.parents[2])})")
    parser.add_argument("--cached-only", action="store_true", help="no training or sampling: print what is on record or cached")
    args = parser.parse_args(argv)
    names = [v.strip() for v in args.variants.split(";") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from: {'; '.join(VARIANTS)}")
    mid_ts = [float(t) for t in args.mid_t.split(",")] if args.mid_t else []
    if any(not 0 < t < 1 for t in mid_ts):
        parser.error("--mid-t values must lie strictly between 0 and 1")

    all_steps = sorted({s for steps in STEPS.values() for s in steps})
    lines = ["| variant | " + " | ".join(f"{s} step{'s' * (s > 1)}" for s in all_steps) + " | 2 steps, chosen t_mid |",
             "|---|" + "---|" * (len(all_steps) + 1)]
    for name in names:
        cfg = variant_config(name)
        method = cfg["loss"]["kind"]
        if not args.cached_only:
            counted = counted_forward_equivalents(cfg, (1, 32, 32), 10)
            print(f"{name}: {cfg['training']['total_steps']} steps of {counted:.2f} forward passes per sample "
                  "(torch.utils.flop_counter)", flush=True)
        got = fids(args, name, uniform_entries(STEPS[method]), args.num_images, REPORT_SEED)
        selection = {f"t_mid={t:g}": mid_t_entry(t) for t in mid_ts} if mid_ts else None
        scores = fids(args, name, selection, args.select_images, FID_SEED)
        scores = {k: v for k, v in scores.items() if k.startswith("t_mid=")}
        chosen = None
        if scores:
            print(f"{name}: 2-step FID of {args.select_images} selection images by t_mid: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in sorted(scores.items())), flush=True)
            best = min(scores, key=scores.get)
            t_best = float(best.split("=")[1])
            report = fids(args, name, {best: mid_t_entry(t_best)}, args.num_images, REPORT_SEED)
            chosen = {"t_mid": t_best, "fid": report[best]} if report else None
        cells = [f"{got[k]:.1f}" if k in got else "" for k in uniform_entries(all_steps)]
        cells.append(f"{chosen['fid']:.1f} (t_mid = {chosen['t_mid']:g})" if chosen else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print(f"FID of {args.num_images} EMA samples (seeds {REPORT_SEED}-{REPORT_SEED + args.num_images - 1}) "
          "against the bundled 5,000-digit reference, uniform time grids unless stated:")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
