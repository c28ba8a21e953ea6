"""How `imm train` shares a CPU: seconds per step of the mnist preset alone, beside one busy single-threaded
process, and two runs side by side, with PyTorch's fixed default of one thread per core ("fixed") against
the package's automatic thread count (`imm.core.threads`, "auto"), in one run of this script.

    python benchmarks/cpu_sharing.py --steps 30 --out runs/cpu-sharing     # about 15 min on 2 idle cores

Needs the machine otherwise idle: anything else running adds to every number. Each training run is a real
`imm train --config mnist` subprocess; its seconds per step are the median over its log windows after the
first (start-up and the first steps excluded). Ratios are to the alone time of the same mode; the
targets, for the auto mode: beside a busy process at most 2.2x, two runs at most 2.5x each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY_LOOP = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"


def train_command(run_dir: Path, steps: int, log_every: int, threads: str) -> list[str]:
    cmd = [sys.executable, "-m", "imm", "train", "--config", "mnist", "--run-dir", str(run_dir),
           f"training.total_steps={steps}", f"logging.log_every={log_every}", "logging.sample_every=100000",
           "logging.checkpoint_every=100000", "logging.progress=false", "logging.tensorboard=false"]
    return cmd + ([] if threads == "auto" else ["--threads", threads])


def seconds_per_step(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["train/steps_per_s"] for r in rows if "train/steps_per_s" in r][1:]  # the first window warms up
    return 1.0 / statistics.median(rates)


def run_trainings(n: int, steps: int, log_every: int, threads: str, busy: bool, work: Path) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    neighbour = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        if busy:
            time.sleep(1.0)  # the case measured: the neighbour is already busy when training starts
        dirs = [Path(tempfile.mkdtemp(dir=work)) for _ in range(n)]
        procs = [subprocess.Popen(train_command(d, steps, log_every, threads), env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for d in dirs]
        for p in procs:
            _, err = p.communicate()
            if p.returncode:
                raise SystemExit(f"imm train failed:\n{err}")
        return [seconds_per_step(d) for d in dirs]
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    ap.add_argument("--log-every", type=int, default=5, help="steps per timing window (default 5)")
    ap.add_argument("--fixed-threads", default=str(os.cpu_count()),
                    help="the fixed mode's --threads (default: the core count, PyTorch's default here)")
    ap.add_argument("--out", type=Path, default=Path("runs/cpu-sharing"), help="results folder")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        for mode, threads in (("fixed", args.fixed_threads), ("auto", "auto")):
            for case, n, busy in (("alone", 1, False), ("beside one busy process", 1, True),
                                  ("two runs side by side", 2, False)):
                times = run_trainings(n, args.steps, args.log_every, threads, busy, Path(tmp))
                results.setdefault(mode, {})[case] = times
                print(f"{mode:5s} {case:24s} s/step " + ", ".join(f"{t:.2f}" for t in times), flush=True)
    lines = ["| threads | alone s/step | beside a busy process: s/step (ratio) | two side by side: s/step each (ratio) |",
             "|---|---|---|---|"]
    for mode, cases in results.items():
        alone = cases["alone"][0]
        busy = cases["beside one busy process"][0]
        pair = cases["two runs side by side"]
        label = f"fixed {args.fixed_threads}" if mode == "fixed" else "auto (imm.core.threads)"
        lines.append(f"| {label} | {alone:.2f} | {busy:.2f} ({busy / alone:.2f}x) | "
                     + ", ".join(f"{t:.2f} ({t / alone:.2f}x)" for t in pair) + " |")
    table = "\n".join(lines)
    print(table)
    (args.out / "cpu_sharing.json").write_text(json.dumps({"steps": args.steps, "results": results}, indent=1))
    (args.out / "cpu_sharing.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
