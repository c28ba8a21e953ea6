"""Quality per sampling step: IMM against flow matching and consistency training at equal training compute.

    python benchmarks/quality.py toy2d                 # 3 targets x 3 methods x 3 seeds (minutes on 2 cores)
    python benchmarks/quality.py mnist                 # FID on 1,000 samples per NFE (under an hour)
    python benchmarks/quality.py toy2d --quick         # smoke runs (the test suite calls both)

Every method trains the same network (the dataset's preset; MeanFlow with ``network.f_type=euler_fm`` and
``network.temb_type=stride``, its paper's (t, t - r) conditioning), with the same optimizer, batch, data and
EMA, through the same trainer (``loss.kind``). Compute is equal in forward-pass equivalents per sample
(``imm.methods.registry.METHODS``: IMM and consistency training 4, flow matching 3, MeanFlow 5), which
:func:`counted_forward_equivalents` checks with ``torch.utils.flop_counter`` on the network each run
trains: a budget of S IMM steps gives consistency training S steps, flow matching round(4 S / 3) and
MeanFlow round(4 S / 5).

Samplers (uniform time grids, each a ``SamplingEntry`` sampled by ``imm.methods.registry.entry_sampler``,
the path of ``imm eval fid``): IMM pushforward, consistency training restart (multistep CM sampling),
flow matching Euler (and Heun at even NFE). Metrics: toy2d, sliced W2 (10,000 samples)
and MMD^2 (2,000 samples, Gaussian kernels h = 0.1, 0.3, 1) to 10,000 target samples, with the
target-vs-target floor; mnist, FID of 1,000 samples against the bundled reference statistics.

Runs are kept under --out (a rerun resumes finished runs instead of retraining); the results go to
OUT/results.json, OUT/results.md (mean +- std over seeds) and OUT/quality.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import imm
from imm.data.datasets import toy2d_sample
from imm.evaluation.toy_metrics import mmd, mmd_self_term, sliced_wasserstein
from imm.methods.flow_matching import FLOW_SOLVERS
from imm.methods.registry import METHODS, entry_sampler
from imm.model.sampling import SamplingEntry
from imm.training.config import load_train_config
from imm.training.loop import train

NFES = {"imm": [1, 2, 4, 8], "consistency": [1, 2, 4, 8], "flow_matching": [1, 2, 4, 8, 16, 32], "meanflow": [1, 2, 4, 8]}
# what a method needs of the presets' networks (the toy2d preset's are already so)
METHOD_NETWORK = {"meanflow": ["network.f_type=euler_fm", "network.temb_type=stride"]}
TOY_TARGETS = ["gaussians8", "checkerboard", "spirals"]
MMD_SAMPLES = 2000  # generated samples in the MMD (against all 10,000 target samples)
DEFAULTS = {  # dataset -> IMM steps, batch, seeds, FM solvers
    "toy2d": dict(steps=400, batch=512, seeds=[0, 1, 2], solvers=["euler", "heun"]),
    "mnist": dict(steps=600, batch=64, seeds=[0], solvers=["euler"]),
}
QUICK = {"toy2d": dict(steps=10, batch=64, seeds=[0], solvers=["euler", "heun"]),
         "mnist": dict(steps=2, batch=8, seeds=[0], solvers=["euler"])}


def method_steps(imm_steps: int, method: str) -> int:
    """Steps that spend the compute of ``imm_steps`` IMM steps at the same batch size."""
    return round(imm_steps * METHODS["imm"].forward_equivalents / METHODS[method].forward_equivalents)


def counted_forward_equivalents(cfg: dict, shape: tuple[int, ...], label_dim: int = 0) -> float:
    """A training step of ``cfg``'s loss on ``cfg``'s network (images of ``shape``), counted with
    ``torch.utils.flop_counter`` (:func:`imm.methods.cost.forward_equivalents`); exits when the count does not
    round to the registry's, which sets every method's steps (:func:`method_steps`)."""
    from imm.methods.cost import forward_equivalents
    from imm.methods.registry import build_loss
    from imm.model.network import network_arguments

    arguments = {**network_arguments(cfg["network"]), "img_channels": shape[0], "img_resolution": shape[-1],
                 "label_dim": label_dim}
    torch.manual_seed(0)
    net = imm.IMMNetwork(**arguments).train()
    loss = build_loss(cfg["loss"])
    batch = 4 * loss.group_size
    labels = torch.arange(batch) % label_dim if label_dim else None
    counted = forward_equivalents(loss, net, torch.randn(batch, *shape), labels)
    method = cfg["loss"]["kind"]
    if round(counted) != METHODS[method].forward_equivalents:
        sys.exit(f"{method}: the FLOP counter counts {counted:.2f} forward passes per sample, the registry "
                 f"{METHODS[method].forward_equivalents}: equal compute would not be equal")
    return counted


def sampler_settings(method: str, solvers: list[str], quick: bool) -> list[tuple[str, int]]:
    """(solver, nfe) pairs evaluated for a method ('-' for the methods with a single sampler)."""
    nfes = NFES[method][:2] if quick else NFES[method]
    if not METHODS[method].solvers:  # one sampler
        return [("-", n) for n in nfes]
    return [(s, n) for s in solvers for n in nfes if n % FLOW_SOLVERS[s] == 0]


def sampling_entry(solver: str, nfe: int) -> SamplingEntry:
    """The uniform-grid entry of ``nfe`` network evaluations with ``solver`` ('-': the method's one sampler)."""
    if solver == "-":
        return SamplingEntry.uniform(nfe)
    return SamplingEntry(num_steps=nfe // FLOW_SOLVERS[solver], discretization="uniform", solver=solver)


def train_run(preset: str, overrides: list[str], run_dir: Path) -> tuple[Path, float]:
    """Train (or find finished) one run; returns the EMA network's path and the training wall time."""
    timing = run_dir / "timing.json"
    if timing.exists():
        return run_dir / "network.safetensors", json.loads(timing.read_text())["seconds"]
    cfg = load_train_config(preset, overrides)
    t0 = time.perf_counter()
    path = train(cfg, run_dir, progress=False)
    seconds = time.perf_counter() - t0
    timing.write_text(json.dumps({"seconds": seconds, "steps": cfg["training"]["total_steps"]}))
    return path, seconds


def common_overrides(method: str, seed: int, imm_steps: int, batch: int) -> list[str]:
    steps = method_steps(imm_steps, method)
    return [f"loss.kind={method}", *METHOD_NETWORK.get(method, []), f"training.total_steps={steps}",
            f"training.batch_size={batch}",
            f"training.seed={seed}", "logging.progress=false", f"logging.log_every={max(1, steps // 10)}",
            f"logging.checkpoint_every={steps}", f"logging.sample_every={steps + 1}", "logging.keep_last=1"]


def _toy2d_reference(target: str, n_eval: int):
    ref = toy2d_sample(target, n_eval, torch.Generator().manual_seed(1))
    return ref, mmd_self_term(ref)


def _toy2d_metrics(x, ref, ref_term) -> dict:
    return {"sw2": sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(3)),
            "mmd": mmd(x[:MMD_SAMPLES], ref, y_self_term=ref_term)}


def toy2d_task(args, out: Path, target: str, seed: int) -> list[dict]:
    """Train the three methods on one (target, seed) and evaluate every (solver, NFE); one process, one thread."""
    torch.set_num_threads(1)
    n_eval = 1000 if args.quick else 10_000
    ref, ref_term = _toy2d_reference(target, n_eval)
    x_T = torch.randn(n_eval, 2, 1, 1, generator=torch.Generator().manual_seed(10_000 + seed))
    rows = []
    for method in args.methods:
        run_dir = out / "runs" / target / f"{method}-seed{seed}"
        overrides = common_overrides(method, seed, args.steps, args.batch) + [f"dataset.name={target}"]
        path, seconds = train_run("toy2d", overrides, run_dir)
        net = imm.load_network(path).eval()
        sample = entry_sampler(method)
        for solver, nfe in sampler_settings(method, args.solvers, args.quick):
            x = sample(net, x_T * net.sigma_data, **sampling_entry(solver, nfe).kwargs())
            rows.append({"dataset": "toy2d", "target": target, "method": method, "solver": solver, "seed": seed,
                         "nfe": nfe, "train_steps": method_steps(args.steps, method), "train_seconds": round(seconds, 1),
                         **_toy2d_metrics(x, ref, ref_term)})
        print(f"toy2d {target} {method} seed {seed}: trained in {seconds:.0f} s", flush=True)
    return rows


def run_toy2d(args, out: Path) -> list[dict]:
    """Every (target, seed) task in ``--jobs`` single-threaded processes, plus the target-vs-target floors."""
    from concurrent.futures import ProcessPoolExecutor

    n_eval = 1000 if args.quick else 10_000
    targets = args.targets or (TOY_TARGETS[:1] if args.quick else TOY_TARGETS)
    rows = []
    for target in targets:
        ref, ref_term = _toy2d_reference(target, n_eval)
        floor = _toy2d_metrics(toy2d_sample(target, n_eval, torch.Generator().manual_seed(7)), ref, ref_term)
        rows.append({"dataset": "toy2d", "target": target, "method": "target", "solver": "-", "seed": None,
                     "nfe": None, **floor})
    tasks = [(target, seed) for target in targets for seed in args.seeds]
    if args.jobs == 1:
        return rows + [r for t in tasks for r in toy2d_task(args, out, *t)]
    with ProcessPoolExecutor(args.jobs) as pool:
        for part in pool.map(toy2d_task, *zip(*[(args, out, *t) for t in tasks])):
            rows += part
    return rows


def run_mnist(args, out: Path) -> list[dict]:
    from imm.data.encoders import build_encoder
    from imm.evaluation.evaluate import load_reference, network_fid
    from imm.evaluation.inception import load_inception

    num_images = 8 if args.quick else args.num_images
    mu_ref, sigma_ref = load_reference("mnist")
    inception = load_inception()
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            run_dir = out / "runs" / "mnist" / f"{method}-seed{seed}"
            overrides = common_overrides(method, seed, args.steps, args.batch)
            if args.quick:
                overrides += ["+dataset.max_size=64", "logging.sample_count=4"]
            path, seconds = train_run("mnist", overrides, run_dir)
            net = imm.load_network(path).eval()
            cfg = load_train_config("mnist", overrides)
            encoder = build_encoder(cfg["encoder"])
            entries = {f"{method if solver == '-' else solver}_nfe{nfe}": sampling_entry(solver, nfe)
                       for solver, nfe in sampler_settings(method, args.solvers, args.quick)}
            cache = run_dir / f"fid-{num_images}.json"  # a rerun with more seeds does not redo finished FIDs
            fid_rows = json.loads(cache.read_text()) if cache.exists() else []
            if [r["entry"] for r in fid_rows] != list(entries):
                fid_rows = network_fid(net, encoder, inception, entries, mu_ref, sigma_ref, num_images, 100,
                                       seed=1_000_000 * (seed + 1), device=torch.device("cpu"), progress=False,
                                       sample_fn=entry_sampler(method))
                cache.write_text(json.dumps(fid_rows))
            for (solver, nfe), r in zip(sampler_settings(method, args.solvers, args.quick), fid_rows):
                rows.append({"dataset": "mnist", "target": "mnist", "method": method, "solver": solver, "seed": seed,
                             "nfe": nfe, "fid": r["fid"], "num_images": r["num_images"],
                             "train_steps": method_steps(args.steps, method), "train_seconds": round(seconds, 1)})
            print(f"mnist {method} seed {seed}: trained in {seconds:.0f} s; FID "
                  + ", ".join(f"{r['entry']}={r['fid']:.1f}" for r in fid_rows), flush=True)
    return rows


def label(row: dict) -> str:
    return row["method"] if row["solver"] == "-" else f"{row['method']} ({row['solver']})"


def summarise(rows: list[dict], metric_names: list[str]) -> list[dict]:
    """Mean and std over seeds per (target, method, solver, nfe)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], label(r), r["nfe"]), []).append(r)
    out = []
    for (target, name, nfe), rs in groups.items():
        entry = {"target": target, "method": name, "nfe": nfe, "seeds": len(rs)}
        for m in metric_names:
            vals = [r[m] for r in rs]
            entry[m] = statistics.fmean(vals)
            entry[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(entry)
    return out


def markdown(summary: list[dict], metric_names: list[str]) -> str:
    """One table per target: rows = method, columns = NFE, cells = mean +- std of each metric."""
    lines = []
    for target in dict.fromkeys(s["target"] for s in summary):
        part = [s for s in summary if s["target"] == target]
        nfes = sorted({s["nfe"] for s in part if s["nfe"] is not None})
        for m in metric_names:
            lines += [f"**{target}, {m}** (mean ± std over seeds)", "",
                      "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                      "|---|" + "---|" * len(nfes)]
            for name in dict.fromkeys(s["method"] for s in part):
                cells = {s["nfe"]: s for s in part if s["method"] == name}
                if None in cells:  # the target-vs-target floor
                    lines.append(f"| {name} (floor) | " + " | ".join(f"{cells[None][m]:.4f}" for _ in nfes) + " |")
                    continue
                lines.append(f"| {name} | " + " | ".join(
                    f"{cells[n][m]:.4g} ± {cells[n][m + '_std']:.2g}" if n in cells else "" for n in nfes) + " |")
            lines.append("")
    return "\n".join(lines)


def plot(summary: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(s["target"] for s in summary))
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        part = [s for s in summary if s["target"] == target]
        for name in dict.fromkeys(s["method"] for s in part):
            pts = sorted((s["nfe"], s[metric], s[metric + "_std"]) for s in part if s["method"] == name)
            if pts[0][0] is None:
                ax.axhline(pts[0][1], color="gray", ls=":", label="target floor")
                continue
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=2, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(metric)
        ax.set_title(target)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(DEFAULTS))
    parser.add_argument("--out", type=Path, help="output folder (default runs/quality-DATASET)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets, few samples")
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], help="comma-separated seeds")
    parser.add_argument("--steps", type=int, help="IMM steps of the compute budget (the others get equal compute)")
    parser.add_argument("--batch", type=int, help="batch size (all methods)")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS), help="subset of " + ",".join(METHODS))
    parser.add_argument("--solvers", type=lambda s: s.split(","), help="flow-matching solvers: euler,heun")
    parser.add_argument("--targets", type=lambda s: s.split(","), help="toy2d targets (default: " + ",".join(TOY_TARGETS) + ")")
    parser.add_argument("--num-images", type=int, default=1000, help="mnist: samples per FID (default 1000)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="toy2d: parallel single-threaded processes (default: 2)")
    args = parser.parse_args(argv)
    preset = (QUICK if args.quick else DEFAULTS)[args.dataset]
    for key in ("steps", "batch", "seeds", "solvers"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        parser.error(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    bad = [s for s in args.solvers if s not in FLOW_SOLVERS]
    if bad:
        parser.error(f"unknown solver {bad[0]!r}; choose from {', '.join(FLOW_SOLVERS)}")
    out = args.out or Path("runs") / f"quality-{args.dataset}"
    out.mkdir(parents=True, exist_ok=True)
    shape, label_dim = ((2, 1, 1), 0) if args.dataset == "toy2d" else ((1, 32, 32), 10)
    counted = {m: round(counted_forward_equivalents(load_train_config(args.dataset, common_overrides(m, 0, 1, 8)),
                                                    shape, label_dim), 3) for m in args.methods}
    t0 = time.perf_counter()
    rows = run_toy2d(args, out) if args.dataset == "toy2d" else run_mnist(args, out)
    metric_names = ["sw2", "mmd"] if args.dataset == "toy2d" else ["fid"]
    summary = summarise(rows, metric_names)
    meta = {"dataset": args.dataset, "quick": args.quick, "seeds": args.seeds, "imm_steps": args.steps,
            "batch": args.batch, "steps_per_method": {m: method_steps(args.steps, m) for m in args.methods},
            "forward_equivalents_per_sample": {m: METHODS[m].forward_equivalents for m in args.methods},
            "forward_equivalents_counted": counted,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(), "wall_seconds": round(time.perf_counter() - t0, 1),
            "command": " ".join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))
    (out / "results.md").write_text(markdown(summary, metric_names))
    plot(summary, metric_names[0], out / "quality.png")
    print(markdown(summary, metric_names))
    print(f"wrote {out / 'results.json'}, results.md, quality.png in {meta['wall_seconds']:.0f} s")
    return 0 if all(math.isfinite(r[m]) for r in rows for m in metric_names if m in r) else 1


if __name__ == "__main__":
    sys.exit(main())
