"""The mnist preset's training step the plain way (fp32, contiguous NCHW) against this machine's fast path
(``training.precision=auto``, ``training.memory_format=auto``), side by side in one process.

    python benchmarks/fastpath_ab.py                     # 30 steps per path and round, 3 rounds, alternating
    python benchmarks/fastpath_ab.py --paths fp32/contiguous,auto,bf16/contiguous,bf16/channels_last,fp32/channels_last
    python benchmarks/fastpath_ab.py --paths auto,auto+compile   # torch.compile's first step and its gain per step
    python benchmarks/fastpath_ab.py --profile 12        # also the top operations of 12 steps of each path
    python benchmarks/fastpath_ab.py --quick             # smoke run (the test suite calls it)

Each path is the trainer's own step (:class:`imm.training.step.TrainStep` on the state
:func:`imm.training.loop.set_up_state` builds: the working copy, the layout, the optimizer, the EMA update)
on the preset's real digits from its data loader. The paths take turns, ``--steps`` steps each, for
``--rounds`` rounds, so that a busy moment of the machine falls on all of them alike; each reports the
median seconds per step over its rounds and its speed relative to the first path. The machine's probe
(:mod:`imm.core.fastpath`) decides what ``auto`` is; its timings are printed too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from imm.core import fastpath
from imm.data.datasets import build_dataset
from imm.data.encoders import build_encoder
from imm.data.loader import make_loader
from imm.methods.registry import build_loss
from imm.training.config import fast_path, load_train_config, network_config, sections, with_fast_path
from imm.training.logs import StepWindow
from imm.training.loop import set_up_state
from imm.training.step import TrainStep


def build_step(cfg: dict, path: str, run_dir: Path, device):
    """A TrainStep of ``cfg`` in ``path`` ('auto' or 'PRECISION/LAYOUT') and a batch of its data, as the
    trainer builds them; returns (step function, the resolved FastPath)."""
    path, compiled = path.removesuffix("+compile"), path.endswith("+compile")
    precision, memory_format = ("auto", "auto") if path == "auto" else path.split("/")
    opt, training, _ = sections(cfg)
    training = replace(training, precision=precision, memory_format=memory_format, compile=compiled)
    dataset, encoder = build_dataset(cfg["dataset"]), build_encoder(cfg.get("encoder"))
    net_cfg = network_config(cfg, dataset, encoder)
    fast = fast_path(training, net_cfg, device, cfg["loss"]["kind"])
    training, net_cfg = with_fast_path(training, net_cfg, fast)
    encoder.init(device)
    state, model, _ = set_up_state(cfg, training, opt, net_cfg, run_dir, device, start_over=False, allow_changes=False)
    loss_fn = build_loss(cfg["loss"])
    step = TrainStep(state, model, loss_fn, encoder, training, opt, training.batch_size, 1, device, StepWindow(device))
    loader = make_loader(dataset, training.batch_size, training.batch_size, 0, 1, seed=0, num_workers=0)
    raw, labels = next(loader)
    loader.close()
    return (lambda: step(raw, labels)), fast


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--paths", default="fp32/contiguous,auto",
                        help="comma-separated paths, the first the baseline: auto or PRECISION/LAYOUT with PRECISION "
                             "fp32|bf16 and LAYOUT contiguous|channels_last (default: fp32/contiguous,auto)")
    parser.add_argument("--steps", type=int, default=30, help="steps per path and round (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3; the median is reported)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile N steps of each path and print its top operations")
    parser.add_argument("--quick", action="store_true", help="a tiny UNet, 2 steps, 1 round (smoke run)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for p in paths:
        q = p.removesuffix("+compile")
        if q != "auto" and (q.count("/") != 1 or q.split("/")[0] not in ("fp32", "bf16")
                            or q.split("/")[1] not in ("contiguous", "channels_last")):
            parser.error(f"unknown path {p!r}: auto or fp32|bf16/contiguous|channels_last, optionally +compile")
    overrides = ["logging.progress=false", "logging.tensorboard=false"]
    if args.quick:
        overrides += ["network.model_channels=8", "network.channel_mult=[1]", "training.batch_size=8"]
        args.steps, args.rounds = 2, 1
    cfg = load_train_config("mnist", overrides)
    device = torch.device("cpu")
    probe = fastpath.probe()
    print(f"machine: {fastpath.cpu_name()} (bf16 flags: {', '.join(probe['bf16_flags']) or 'none'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"probe ({fastpath.cache_path()}): {json.dumps(probe['timings'])}")
    with tempfile.TemporaryDirectory() as tmp:
        steps, chosen = {}, {}
        first = {}
        for i, p in enumerate(paths):
            steps[p], chosen[p] = build_step(cfg, p, Path(tmp) / str(i), device)
            start = time.perf_counter()
            steps[p]()  # the first step: oneDNN's kernel choice, the optimizer's state, torch.compile's work
            first[p] = time.perf_counter() - start
            print(f"{p}: {chosen[p].describe()}; first step {first[p]:.1f} s", flush=True)
        per_step = {p: [] for p in paths}
        for _ in range(args.rounds):
            for p in paths:
                start = time.perf_counter()
                for _ in range(args.steps):
                    steps[p]()
                per_step[p].append((time.perf_counter() - start) / args.steps)
        base = statistics.median(per_step[paths[0]])
        rows = []
        print(f"\n| path | computes in | s/step (median of {args.rounds} x {args.steps}) | speed vs {paths[0]} |")
        print("|---|---|---|---|")
        for p in paths:
            med = statistics.median(per_step[p])
            rows.append({"path": p, "precision": chosen[p].precision, "memory_format": chosen[p].memory_format,
                         "s_per_step": med, "rounds": per_step[p], "speedup": base / med, "first_step_s": first[p]})
            print(f"| {p} | {chosen[p].precision}, {chosen[p].memory_format} | {med:.3f} | {base / med:.2f}x |")
        if args.profile:
            for p in paths:
                with torch.profiler.profile() as prof:
                    for _ in range(args.profile):
                        steps[p]()
                print(f"\n{p} ({chosen[p].precision}, {chosen[p].memory_format}): top operations of {args.profile} steps")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.json_out:
        args.json_out.write_text(json.dumps({"cpu": fastpath.cpu_name(), "torch": torch.__version__,
                                             "threads": torch.get_num_threads(), "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
