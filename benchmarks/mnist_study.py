"""IMM against flow matching and consistency training on real MNIST digits: budget curve, ablations, levers.

    python benchmarks/mnist_study.py budget              # FID vs training compute, 3 methods, 16x range
    python benchmarks/mnist_study.py ablate --seeds 0,1  # the paper's knobs at one small budget, ranked by 2-NFE FID
    python benchmarks/mnist_study.py levers              # warm start from flow matching, gap annealing
    python benchmarks/mnist_study.py compare             # every method at its best recipe, in bf16 (its own record)
    python benchmarks/mnist_study.py budget --quick      # smoke run (the test suite calls it)

The set-up is the ``mnist`` preset (32x32 digits, the bundled 5,000-digit reference statistics) with the
UNet narrowed to ``model_channels=16`` (0.31M parameters, about 3x cheaper per step than the demo's 32):
the cheapest network that still learns digits, so that a 16x compute range fits in hours on 2 cores.
Every FID uses the same ``--num-images`` samples (default 256; image i from seed 10^6 + i, the same
noise for every run) against the bundled reference, so FIDs are biased upwards alike for all runs and
are comparable with each other, not with FID-50K numbers.

Compute is counted in forward-pass equivalents per sample (``imm.methods.registry.METHODS``: IMM
and consistency training 4, flow matching 3, MeanFlow 5; checked against ``torch.utils.flop_counter`` on
the study's network before anything trains, ``quality.counted_forward_equivalents``), so a budget of B
"IMM steps" gives flow matching round(4 B / 3) steps and MeanFlow round(4 B / 5) at the same batch. The budget curve trains one run per method to the largest budget
with a constant learning rate and evaluates its EMA checkpoints at each budget on the way (the FID-vs-
training-progress curve of EDM-style papers); consistency training, whose curriculum is laid out over
the run's length, gets one run per budget. Runs and FIDs are cached under ``--out``: a rerun adds
seeds, budgets and variants without redoing finished work. Every FID measured is also added to
``--record`` (default benchmarks/results/mnist_study.json, kept in git): a run whose FIDs are all on
record is neither trained nor evaluated again, so the study grows across machines whose ``runs/`` is
gone. ``--jobs`` runs that many single-threaded processes side by side.

``compare`` is the method table: IMM at the best recipe the studies below found (M = 1, b = 2), flow
matching, consistency training and MeanFlow, trained in bf16 (the machine's fast path; the other studies
stay in fp32, as recorded) with their own cache (``runs/mnist-compare``) and record
(``benchmarks/results/mnist_compare.json``). A multi-budget run is trained budget by budget, each one's
FIDs recorded as soon as its checkpoint exists, so that a run killed at a session's end loses at most
one budget's training; ``--save-states`` copies the newest checkpoint of each unfinished run to
``benchmarks/results/states/`` (a few MB each, meant for git), and a run whose folder is gone resumes from
there on another machine.
"""

from __future__ import annotations

import argparse
import glob
import math
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record  # noqa: E402  (the FIDs kept in git)
from quality import counted_forward_equivalents, method_steps  # noqa: E402  (the equal-compute rule shared with quality.py)
from record import load as load_rows  # noqa: E402
from record import save_json

SETUP = ["network.model_channels=16", "training.batch_size=64", "training.precision=fp32", "logging.progress=false",
         "logging.sample_every=1000000", "logging.tensorboard=false"]
BUDGETS = [120, 240, 480, 960, 1920]  # IMM steps; multiples of 3*40 so every method's steps hit a checkpoint
CHECKPOINT_EVERY = 40
QUICK_SETUP = SETUP + ["+dataset.max_size=64", "network.model_channels=8"]  # --quick: checkpoints every step
# The IMM recipe this study measures: the mnist preset with groups of 4 (the preset itself has M = 1).
IMM_RECIPE = ["loss.group_size=4"]
# Methods whose training schedule depends on the run's length (iCT's N(k) curriculum): a checkpoint on the
# way of a longer run is not a shorter run, so the budget curve trains them once per budget.
LENGTH_SCHEDULED = ("consistency",)
NFES = {"imm": [1, 2, 4], "flow_matching": [1, 2, 4, 8], "consistency": [1, 2, 4], "meanflow": [1, 2, 4]}
FID_SEED = 1_000_000
ABLATION_BUDGET = 480
RECORD = Path(__file__).resolve().parent / "results" / "mnist_study.json"
COMPARE_RECORD = RECORD.with_name("mnist_compare.json")
STATES = RECORD.parent / "states"  # the newest training state of each unfinished compare run (--save-states)
# The method table trains in bf16 with the layout fixed, so that a run resumed on another machine trains on
# in the same arithmetic whatever that machine's probe would choose.
COMPARE_SETUP = [o.replace("training.precision=fp32", "training.precision=bf16") for o in SETUP] + [
    "training.memory_format=contiguous"]

# name -> (method, overrides on top of SETUP). The budget curve's three runs:
BUDGET_VARIANTS = {"imm": ("imm", []), "flow_matching": ("flow_matching", []), "consistency": ("consistency", [])}


# name -> (method, overrides). The method table: each method at its best recipe known on this set-up.
COMPARE_VARIANTS = {
    "imm": ("imm", ["loss.group_size=1", "loss.b=2"]),  # the best of the ablation and levers at budget 480
    "flow_matching": ("flow_matching", []),
    "consistency": ("consistency", []),
    # the paper's ImageNet recipe (the loss's defaults) with its (t, t - r) conditioning, on an euler_fm network
    "meanflow": ("meanflow", []),
    # a small sweep of the fraction of r != t and the adaptive weight's power p, one change each
    "meanflow r!=t 0.5": ("meanflow", ["loss.r_neq_t_fraction=0.5"]),
    "meanflow r!=t 0.75": ("meanflow", ["loss.r_neq_t_fraction=0.75"]),
    "meanflow p=0.5": ("meanflow", ["loss.p=0.5"]),
    "meanflow p=0.75": ("meanflow", ["loss.p=0.75"]),
    # the settings of the authors' CIFAR-10 script (github.com/Gsunshine/py-meanflow, cifar10_v1.sh; their "v1"
    # time sampler orders t >= r after the masking, this one before it)
    "meanflow CIFAR-10 script": ("meanflow", ["loss.r_neq_t_fraction=0.75", "loss.p=0.75", "loss.P_mean_t=-0.6",
                                              "loss.P_std_t=1.6", "loss.P_mean_r=-4.0", "loss.P_std_r=1.6"]),
}
METHOD_NETWORK = {"meanflow": ["network.f_type=euler_fm", "network.temb_type=stride"]}


def _abl(*overrides):
    return ("imm", list(overrides))


# The paper's knobs, one change each from the study's IMM recipe (IMM_RECIPE on the mnist preset: mapping
# time_decrement k=3, M=4, uniform times, a=1, b=5, Laplace, AdamW lr 2e-3, EMA 0.995, batch 64 = 16 groups).
ABLATIONS = {
    "imm": _abl(),  # the study's recipe = the budget curve's IMM run
    "k=2": _abl("loss.k=2"), "k=4": _abl("loss.k=4"), "k=5": _abl("loss.k=5"),
    "eta_decrement k=12": _abl("loss.mapping=eta_decrement", "loss.k=12"),
    "eta_decrement k=8": _abl("loss.mapping=eta_decrement", "loss.k=8"),
    "M=1": _abl("loss.group_size=1"), "M=2": _abl("loss.group_size=2"), "M=8": _abl("loss.group_size=8"),
    "lognormal": _abl("loss.time_sampling=lognormal"),
    "lognormal t>=0.5": _abl("loss.time_sampling=lognormal_authors"),
    "a=2": _abl("loss.a=2"), "b=4": _abl("loss.b=4"), "b=2": _abl("loss.b=2"),
    "rbf": _abl("loss.kernel=rbf"),
    "lr 1e-3": _abl("optimizer.lr=1e-3"), "lr 4e-3": _abl("optimizer.lr=4e-3"),
    # with the preset's EMA warm-up, decay min(d, (1 + s) / (10 + s)) <= 0.982 over 480 steps: below every d
    # here, so these three rows train the same EMA; without warm-up the decay is d from the first step
    "EMA 0.99": _abl("training.ema_decays=[0.99]"), "EMA 0.999": _abl("training.ema_decays=[0.999]"),
    "EMA 0.99, no warm-up": _abl("training.ema_decays=[0.99]", "training.ema_warmup=false"),
    "EMA 0.995, no warm-up": _abl("training.ema_warmup=false"),
    "batch 32": _abl("training.batch_size=32"), "batch 128": _abl("training.batch_size=128"),
    "euler_fm": _abl("network.f_type=euler_fm"),
    "label dropout 0.1, target sees dropped": _abl("loss.label_dropout=0.1", "loss.same_dropped_labels=true"),
    "label dropout 0.1, target sees all": _abl("loss.label_dropout=0.1", "loss.same_dropped_labels=false"),
}

# Two levers beyond the paper. A warm start spends a fraction of the budget on flow matching (the budget
# curve's flow-matching run, whose checkpoints every 40 steps are the starting points) and the rest on IMM
# from those weights; gap annealing moves k over the run (time_decrement: gap 1/2^k in t).
LEVERS = {  # "imm" and "flow_matching" are the budget curve's runs, read at the lever budget
    "imm": ("imm", []),
    "flow_matching": ("flow_matching", []),
    "FM 50% then IMM, euler_fm": ("imm", ["network.f_type=euler_fm"], 0.5),
    "FM 75% then IMM, euler_fm": ("imm", ["network.f_type=euler_fm"], 0.75),
    "euler_fm": ("imm", ["network.f_type=euler_fm"]),
    "anneal k 1->5": ("imm", ["loss.k_start=1", "loss.k=5"]),
    "FM 50% then IMM, simple_edm": ("imm", [], 0.5),
    "anneal k 1->3": ("imm", ["loss.k_start=1", "loss.k=3"]),
    "anneal k 2->4": ("imm", ["loss.k_start=2", "loss.k=4"]),
    # the ablation's winners at this budget, combined (2-NFE: M=1 and M=2, euler_fm; 1-NFE: lognormal t>=0.5)
    "M=1, euler_fm, lognormal t>=0.5": ("imm", ["loss.group_size=1", "network.f_type=euler_fm",
                                                "loss.time_sampling=lognormal_authors"]),
    "M=2, euler_fm, lognormal t>=0.5": ("imm", ["loss.group_size=2", "network.f_type=euler_fm",
                                                "loss.time_sampling=lognormal_authors"]),
    "M=1, euler_fm": ("imm", ["loss.group_size=1", "network.f_type=euler_fm"]),
    "M=2, euler_fm": ("imm", ["loss.group_size=2", "network.f_type=euler_fm"]),
    # the mnist preset's M = 1 with k = 2 or b = 2 (ahead of the study's recipe at seed 0 of the ablation)
    "M=1, k=2": ("imm", ["loss.group_size=1", "loss.k=2"]),
    "M=1, b=2": ("imm", ["loss.group_size=1", "loss.b=2"]),
}


def checkpoint_at(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"training-state-{step:08d}.pt"


def run_id(run: str, seed: int) -> str:
    """A run's folder name under ``--out``/runs/ and its key in the record."""
    return f"{run.replace(' ', '_').replace('=', '')}-seed{seed}"


def train_config(method: str, overrides: list[str], setup: list[str], *extra: str) -> dict:
    """A run's training config: the mnist preset, the study's set-up, the study's IMM recipe, the variant."""
    from imm.training.config import load_train_config

    return load_train_config("mnist", [*setup, f"loss.kind={method}", *(IMM_RECIPE if method == "imm" else []),
                                       *METHOD_NETWORK.get(method, []), *overrides, *extra])


def recipe_of(task: dict) -> dict:
    """What a task's run trains (``record.recipe``), a warm start's flow-matching share included."""
    pretrain = {"warm_start": f"first {task['pretrain']:g} of the budget on {run_id('flow_matching', task['seed'])}"} \
        if task["pretrain"] else {}
    return record.recipe(train_config(task["method"], task["overrides"], task["setup"], f"training.seed={task['seed']}"),
                         **pretrain)


def recorded(task: dict) -> dict:
    """The record's FIDs of a task's run (``{"step/nfe": fid}``)."""
    if not task["record"]:
        return {}
    return record.cells(task["record"], run_id(task["run"], task["seed"]), recipe_of(task), f"fid-{task['num_images']}")


def add_to_record(task: dict, fids: dict) -> None:
    record.add(task["record"], run_id(task["run"], task["seed"]), recipe_of(task), f"fid-{task['num_images']}", fids,
               sort_key=lambda kv: [int(x) for x in kv[0].split("/")])


def train_variant(out: Path, name: str, method: str, overrides: list[str], seed: int, imm_steps: int,
                  keep_all: bool, setup: list[str], checkpoint_every: int) -> Path:
    """Train (or resume, or find finished) one run; returns its run folder."""
    from imm.training.loop import train

    run_dir = out / "runs" / run_id(name, seed)
    steps = method_steps(imm_steps, method)
    done = load_rows(run_dir / "done.json")
    if done.get("steps") == steps or (done.get("steps", 0) > steps and checkpoint_at(run_dir, steps).exists()):
        return run_dir  # finished (a longer run's checkpoint serves a shorter budget); a longer budget resumes
    cfg = train_config(method, overrides, setup, f"training.total_steps={steps}", f"training.seed={seed}",
                       f"logging.log_every={max(1, steps // 20)}",
                       f"logging.checkpoint_every={checkpoint_every}",  # a killed run resumes
                       f"logging.keep_last={0 if keep_all else 1}")
    t0 = time.perf_counter()
    train(cfg, run_dir, progress=False)
    save_json(run_dir / "done.json", {"seconds": round(time.perf_counter() - t0, 1), "steps": steps,
                                      "method": method, "overrides": overrides})
    return run_dir


def evaluate_run(run_dir: Path, method: str, budgets: list[int], nfes: list[int], num_images: int) -> list[dict]:
    """FID of the EMA at each budget's checkpoint and NFE, cached in RUN/fid-N.json."""
    import imm
    from imm.data.encoders import build_encoder
    from imm.evaluation.evaluate import load_reference, network_fid
    from imm.evaluation.inception import load_inception
    from imm.methods.registry import entry_sampler
    from imm.model.sampling import SamplingEntry

    cache_path = run_dir / f"fid-{num_images}.json"
    cache = load_rows(cache_path)
    mu_ref, sigma_ref = load_reference("mnist")
    inception = encoder = None
    rows = []
    for budget in budgets:
        step = method_steps(budget, method)
        todo = [n for n in nfes if f"{step}/{n}" not in cache]
        if todo:
            if inception is None:
                inception = load_inception()
                encoder = build_encoder({"kind": "rgb", "channels": 1})
            ckpt = checkpoint_at(run_dir, step)
            if not ckpt.exists() and load_rows(run_dir / "done.json").get("steps") != step:
                sys.exit(f"mnist_study.py: {run_dir.name} has no checkpoint at step {step} (the run went past it "
                         f"without keeping it); remove {run_dir} to train it again")
            net = imm.load_network(ckpt if ckpt.exists() else run_dir / "network.safetensors").eval()
            entries = {f"nfe{n}": SamplingEntry.uniform(n) for n in todo}
            got = network_fid(net, encoder, inception, entries, mu_ref, sigma_ref, num_images, 128, seed=FID_SEED,
                              device=torch.device("cpu"), progress=False,
                              sample_fn=entry_sampler(method))
            for n, r in zip(todo, got):
                cache[f"{step}/{n}"] = r["fid"]
            cache = {**load_rows(cache_path), **cache}  # another process may have added entries meanwhile
            save_json(cache_path, cache)
        rows += [{"budget": budget, "steps": step, "nfe": n, "fid": cache[f"{step}/{n}"]} for n in nfes]
    return rows


def warm_start_plan(out: Path, budget: int, fraction: float, seed: int, setup: list[str],
                    checkpoint_every: int) -> tuple[list[str], int]:
    """(init_from override, IMM steps) that spend ``fraction`` of ``budget`` on the budget curve's
    flow-matching run and the rest on IMM. Where that run's checkpoint is not on this machine (its FIDs
    may be on record while its files are gone), its first ``fraction`` of the budget is trained here."""
    fm_steps = method_steps(round(fraction * budget), "flow_matching")
    if fm_steps % checkpoint_every:
        sys.exit(f"mnist_study.py: a warm start needs a flow-matching checkpoint at step {fm_steps}; "
                 f"choose a budget whose fraction {fraction} is a multiple of {3 * checkpoint_every // 4} IMM steps")
    ckpt = checkpoint_at(out / "runs" / run_id("flow_matching", seed), fm_steps)
    if not ckpt.exists():
        train_variant(out, "flow_matching", "flow_matching", [], seed, round(fraction * budget), True, setup,
                      checkpoint_every)
    if not ckpt.exists():
        sys.exit(f"mnist_study.py: {ckpt} is missing (the run went past it without keeping it); "
                 f"remove {ckpt.parents[1]} to train it again")
    return [f"training.init_from={ckpt}"], budget - round(fraction * budget)


def kept_states(task: dict) -> list[Path]:
    """The run's states under ``--states``, ``RUN.training-state-STEP.pt`` (the checkpoint's own name after the
    run's): read by name, never unpickled here."""
    return sorted(task["states"].glob(f"{glob.escape(run_id(task['run'], task['seed']))}.training-state-*.pt"))


def restore_state(task: dict) -> None:
    """A run whose folder has no checkpoint resumes from its state under ``--states``, if one is kept there."""
    kept = kept_states(task) if task.get("states") else []
    folder = task["out"] / "runs" / run_id(task["run"], task["seed"]) / "checkpoints"
    if kept and not any(folder.glob("training-state-*.pt")):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(kept[-1], folder / kept[-1].name[len(run_id(task["run"], task["seed"])) + 1:])
        print(f"{task['name']} seed {task['seed']}: resuming from {kept[-1]}", flush=True)


def save_states(tasks: list[dict]) -> None:
    """Keep the newest checkpoint of each unfinished run under ``--states`` and drop the finished runs'."""
    for task in tasks:
        finished = len(cached_rows(task)) == len(task["budgets"]) * len(task["nfes"])
        newest = sorted((task["out"] / "runs" / run_id(task["run"], task["seed"]) / "checkpoints")
                        .glob("training-state-*.pt"))
        if not finished and not newest:
            continue
        for old in kept_states(task):
            old.unlink()
        if not finished:
            target = task["states"] / f"{run_id(task['run'], task['seed'])}.{newest[-1].name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(newest[-1], target)
            print(f"kept {newest[-1].name} of {task['name']} seed {task['seed']} as {target}")


def cached_rows(task: dict) -> list[dict]:
    """The rows of ``task`` whose FIDs are on record or cached under ``--out`` (no training, no evaluation)."""
    run = run_id(task["run"], task["seed"])
    cache = {**recorded(task),
             **load_rows(task["out"] / "runs" / run / f"fid-{task['num_images']}.json")}
    rows = []
    for budget in task["budgets"]:
        steps = method_steps(budget - round(task["pretrain"] * budget), task["method"]) if task["pretrain"] else \
            method_steps(budget, task["method"])
        rows += [{"variant": task["name"], "method": task["method"], "seed": task["seed"], "budget": budget,
                  "steps": steps, "nfe": n, "fid": cache[f"{steps}/{n}"]} for n in task["nfes"] if f"{steps}/{n}" in cache]
    return rows


def job(task: dict) -> list[dict]:
    """One variant and seed: train, then evaluate; single-threaded so that --jobs processes share the cores."""
    known = cached_rows(task)
    if task.get("cached_only") or len(known) == len(task["budgets"]) * len(task["nfes"]):
        return known
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    overrides, budgets = task["overrides"], task["budgets"]
    if task["pretrain"]:  # a warm start: the rows keep the whole budget, the run has the IMM share of it
        extra, steps = warm_start_plan(task["out"], budgets[0], task["pretrain"], task["seed"], task["setup"],
                                       task["checkpoint_every"])
        overrides, budgets = overrides + extra, [steps]
    restore_state(task)
    known_cells = {(r["steps"], r["nfe"]): r for r in known}
    rows = []
    for budget in sorted(budgets):  # budget by budget: each one's FIDs are on record as soon as it is trained
        steps = method_steps(budget, task["method"])
        if all((steps, n) in known_cells for n in task["nfes"]):
            rows += [{k: known_cells[steps, n][k] for k in ("budget", "steps", "nfe", "fid")} for n in task["nfes"]]
            continue
        run_dir = task["out"] / "runs" / run_id(task["run"], task["seed"])
        if load_rows(run_dir / "done.json").get("steps", 0) > steps and not checkpoint_at(run_dir, steps).exists():
            print(f"{task['name']} seed {task['seed']}: budget {budget} left out (the run went past step {steps} "
                  f"without keeping it; remove {run_dir} to measure it)", flush=True)
            continue
        run_dir = train_variant(task["out"], task["run"], task["method"], overrides, task["seed"], budget,
                                len(budgets) > 1, task["setup"], task["checkpoint_every"])
        got = evaluate_run(run_dir, task["method"], [budget], task["nfes"], task["num_images"])
        if task["record"]:
            add_to_record(task, {f"{r['steps']}/{r['nfe']}": r["fid"] for r in got})
        rows += got
    if task["pretrain"]:
        rows = [{**r, "budget": task["budgets"][0]} for r in rows]
    print(f"{task['name']} seed {task['seed']}: done in {time.perf_counter() - t0:.0f} s; "
          + ", ".join(f"B{r['budget']}/nfe{r['nfe']}={r['fid']:.1f}" for r in rows), flush=True)
    return [{"variant": task["name"], "method": task["method"], "seed": task["seed"], **r} for r in rows]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std of the FID over seeds per (variant, budget, nfe)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["method"], r["budget"], r["nfe"]), []).append(r["fid"])
    return [{"variant": v, "method": m, "budget": b, "nfe": n, "seeds": len(f), "fid": statistics.fmean(f),
             "fid_std": statistics.stdev(f) if len(f) > 1 else 0.0} for (v, m, b, n), f in groups.items()]


def budget_table(summary: list[dict]) -> str:
    budgets = sorted({s["budget"] for s in summary})
    lines = ["| method | NFE | " + " | ".join(f"B={b}" for b in budgets) + " |", "|---|---|" + "---|" * len(budgets)]
    for (v, n) in dict.fromkeys((s["variant"], s["nfe"]) for s in summary):
        cells = {s["budget"]: s for s in summary if s["variant"] == v and s["nfe"] == n}
        lines.append(f"| {v} | {n} | " + " | ".join(
            f"{cells[b]['fid']:.1f}" + (f" ± {cells[b]['fid_std']:.1f}" if cells[b]["seeds"] > 1 else "")
            if b in cells else "" for b in budgets) + " |")
    return "\n".join(lines)


def _loglog_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line log FID = a + b log budget through ``points``: (a, b)."""
    xs, ys = [math.log(b) for b, _ in points], [math.log(f) for _, f in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def crossing(summary: list[dict], ours: tuple[str, int], theirs: tuple[str, int], fit_points: int = 3) -> str:
    """Where the FID line ``ours`` (variant, NFE) first lies below ``theirs``; if it never does, where
    log-log lines through the last ``fit_points`` budgets of each would cross (an extrapolation)."""
    def line(key):
        return sorted((s["budget"], s["fid"]) for s in summary if (s["variant"], s["nfe"]) == key)

    a, b = line(ours), line(theirs)
    common = sorted(set(x for x, _ in a) & set(x for x, _ in b))
    fa, fb = dict(a), dict(b)
    name = f"{ours[0]} at {ours[1]} NFE vs {theirs[0]} at {theirs[1]} NFE"
    below = [x for x in common if fa[x] < fb[x]]
    if below:
        return f"{name}: lower from budget {below[0]} on" + ("" if below == common[common.index(below[0]):] else
                                                              " (not at every larger budget)")
    if len(common) < fit_points:
        return f"{name}: higher at every budget measured"
    (ia, sa), (ib, sb) = (_loglog_fit([(x, f[x]) for x in common[-fit_points:]]) for f in (fa, fb))
    if sa >= sb:
        return (f"{name}: higher at every budget measured, and not closing (log-log slopes {sa:.2f} vs {sb:.2f} "
                f"over the last {fit_points} budgets)")
    log_x = (ib - ia) / (sa - sb)
    fitted = f"log-log lines through the last {fit_points} budgets (slopes {sa:.2f} vs {sb:.2f})"
    if log_x > math.log(1e4 * common[-1]):
        return f"{name}: higher at every budget measured; {fitted} cross beyond 10,000x the largest measured"
    x = math.exp(log_x)
    ratio = x / common[-1]
    return (f"{name}: higher at every budget measured; {fitted} cross near budget {x:,.0f} IMM steps "
            f"({ratio:.{1 if ratio < 10 else 0}f}x the largest measured), an extrapolation")


def paired_differences(rows: list[dict], reference: str, nfe: int) -> dict[str, list[float]]:
    """Per variant, its FID at ``nfe`` minus the ``reference`` variant's at the same seed and budget, one
    value per seed both ran: the seed moves every variant alike (the same data order and noise), so these
    differences are resolved far better than the spread of either FID over seeds."""
    fid = {(r["variant"], r["seed"], r["budget"]): r["fid"] for r in rows if r["nfe"] == nfe}
    out: dict[str, list[float]] = {}
    for (v, seed, budget), f in fid.items():
        if v != reference and (reference, seed, budget) in fid:
            out.setdefault(v, []).append(f - fid[reference, seed, budget])
    return out


def ranked_table(summary: list[dict], nfes: list[int],
                 differences: tuple[str, dict[str, list[float]]] | None = None) -> str:
    """One row per variant, columns = NFE, sorted by the 2-NFE FID; with ``differences`` = (heading, values
    per variant, as ``paired_differences`` gives them), a last column of those values."""
    variants = list(dict.fromkeys(s["variant"] for s in summary))
    cell = {(s["variant"], s["nfe"]): s for s in summary}
    variants.sort(key=lambda v: cell.get((v, 2), {"fid": math.inf})["fid"])
    extra = [f" {differences[0]} |"] if differences is not None else []
    lines = ["| variant | seeds | " + " | ".join(f"NFE {n}" for n in nfes) + " |" + "".join(extra),
             "|---|---|" + "---|" * (len(nfes) + len(extra))]
    for v in variants:
        seeds = max(s["seeds"] for s in summary if s["variant"] == v)
        line = f"| {v} | {seeds} | " + " | ".join(
            f"{cell[v, n]['fid']:.1f}" + (f" ± {cell[v, n]['fid_std']:.1f}" if cell[v, n]["seeds"] > 1 else "")
            if (v, n) in cell else "" for n in nfes) + " |"
        if differences is not None:
            line += " " + ", ".join(f"{d:+.1f}" for d in differences[1].get(v, [])) + " |"
        lines.append(line)
    return "\n".join(lines)


def plot_budget(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from imm.evaluation.evaluate import plain_numbers

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"imm": "-", "flow_matching": "--", "consistency": ":"}
    for (v, m, n) in dict.fromkeys((s["variant"], s["method"], s["nfe"]) for s in summary):
        pts = sorted((s["budget"] * 4 * 64, s["fid"]) for s in summary if s["variant"] == v and s["nfe"] == n)
        ax.plot(*zip(*pts), styles.get(m, "-."), marker="o", ms=3, label=f"{v}, NFE {n}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_numbers(ax.yaxis)
    ax.set_xlabel("training compute (forward-pass equivalents x samples)")
    ax.set_ylabel("FID (256 samples)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plan(args) -> list[tuple]:
    if args.study == "budget":
        variants, budgets = BUDGET_VARIANTS, args.budgets
    elif args.study == "compare":
        variants, budgets = COMPARE_VARIANTS, args.budgets
    elif args.study == "ablate":
        variants, budgets = ABLATIONS, [args.budget]
    else:
        variants, budgets = LEVERS, [args.budget]
    if args.only:
        missing = [v for v in args.only if v not in variants]
        if missing:
            sys.exit(f"mnist_study.py: unknown variant {missing[0]!r}; choose from {', '.join(variants)}")
        variants = {v: variants[v] for v in args.only}
    tasks = []
    for seed in args.seeds:
        for name, (method, overrides, *pretrain) in variants.items():
            common = {"out": args.out, "name": name, "method": method, "overrides": overrides,
                      "pretrain": pretrain[0] if pretrain else 0, "seed": seed,
                      "nfes": NFES[method][:2] if args.quick else NFES[method], "num_images": args.num_images,
                      "setup": QUICK_SETUP if args.quick else COMPARE_SETUP if args.study == "compare" else SETUP,
                      "checkpoint_every": 1 if args.quick else CHECKPOINT_EVERY, "states": args.states,
                      "cached_only": args.cached_only, "record": None if args.quick else args.record}
            if method in LENGTH_SCHEDULED:  # one run per budget, each with its full schedule, named by it
                tasks += [{**common, "run": f"{name} B{b}", "budgets": [b]} for b in budgets]
            else:
                tasks.append({**common, "run": name, "budgets": budgets})
    return tasks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["budget", "ablate", "levers", "compare"])
    parser.add_argument("--out", type=Path, help="cache folder (default runs/mnist-study; compare: runs/mnist-compare)")
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0])
    parser.add_argument("--budgets", type=lambda s: [int(v) for v in s.split(",")], default=BUDGETS,
                        help="budget study: IMM-step budgets (multiples of 120)")
    parser.add_argument("--budget", type=int, default=ABLATION_BUDGET, help="ablate/levers: the one budget")
    parser.add_argument("--only", type=lambda s: s.split(";"), help="';'-separated subset of the variants")
    parser.add_argument("--record", type=Path,
                        help=f"the FIDs measured, kept across machines (default {RECORD.relative_to(RECORD.parents[2])}; "
                             f"compare: {COMPARE_RECORD.relative_to(RECORD.parents[2])}; --quick keeps none)")
    parser.add_argument("--states", type=Path, default=STATES,
                        help="where --save-states keeps unfinished runs' newest training states, and runs resume from")
    parser.add_argument("--save-states", action="store_true",
                        help="train nothing: keep the newest checkpoint of each unfinished run under --states")
    parser.add_argument("--num-images", type=int, default=256, help="samples per FID (default 256)")
    parser.add_argument("--jobs", type=int, default=2, help="single-threaded processes side by side")
    parser.add_argument("--quick", action="store_true", help="smoke run: budgets 3 and 6, 8 FID images, NFE 1 and 2")
    parser.add_argument("--cached-only", action="store_true",
                        help="train and evaluate nothing: tables and plot from the cached FIDs (missing ones left out)")
    args = parser.parse_args(argv)
    compare = args.study == "compare"
    args.out = args.out or Path("runs/mnist-compare" if compare else "runs/mnist-study")
    args.record = args.record or (COMPARE_RECORD if compare else RECORD)
    if args.quick:
        args.budgets, args.budget, args.num_images, args.jobs = [3, 6], 3, 8, 1
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = plan(args)
    if args.save_states:
        save_states(tasks)
        return 0
    counted = {} if args.cached_only else {  # the FLOP counter's count of each method as the study trains it
        t["method"]: round(counted_forward_equivalents(train_config(t["method"], t["overrides"], t["setup"]),
                                                       (1, 32, 32), 10), 3) for t in tasks}
    t0 = time.perf_counter()
    if args.jobs == 1 or args.cached_only:
        rows = [r for t in tasks for r in job(t)]
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = [r for part in pool.map(job, tasks) for r in part]
    summary = summarise(rows)
    if args.study in ("budget", "compare"):
        table = budget_table(summary)
    elif args.study == "ablate":
        table = ranked_table(summary, [1, 2, 4],
                             ("NFE 2 minus the study's recipe, per seed", paired_differences(rows, "imm", 2)))
    else:
        table = ranked_table(summary, [1, 2, 4])
    pairs = [(("imm", n), ("flow_matching", m)) for n, m in ((1, 1), (2, 2), (2, 4), (2, 8), (4, 4))]
    pairs += [(("imm", n), ("meanflow", n)) for n in (1, 2, 4)] if args.study == "compare" else []
    variants = {s["variant"] for s in summary}
    lines = [crossing(summary, ours, theirs) for ours, theirs in pairs if {ours[0], theirs[0]} <= variants]
    if args.study in ("budget", "compare") and lines:
        table += "\n\n" + "\n".join(f"- {line}" for line in lines)
    meta = {"study": args.study, "seeds": args.seeds, "num_images": args.num_images, "setup": tasks[0]["setup"] if tasks else SETUP,
            "forward_equivalents_counted": counted,
            "wall_seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
            "command": " ".join(["python", "benchmarks/mnist_study.py", *(argv if argv is not None else sys.argv[1:])])}
    save_json(args.out / f"{args.study}.json", {"meta": meta, "rows": rows, "summary": summary})
    (args.out / f"{args.study}.md").write_text(table + "\n")
    if args.study in ("budget", "compare"):
        plot_budget(summary, args.out / ("budget.png" if args.study == "budget" else "compare.png"))
    print(table)
    return 0 if all(math.isfinite(r["fid"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
