"""CPU threads: as many intra-op threads as the cores other processes leave free.

PyTorch starts one OpenMP thread per physical core. When another process is busy on one of those cores,
every parallel region waits at its barrier for the thread that lost its core: on 2 cores a 2-thread
training step beside one busy process took 2.5x its idle time, and two such runs side by side 4.2x each,
where a fair share is 2x (docs/benchmarks.md, "Sharing the CPU"); with one thread per free core, 1.6x and
1.7x. So the command-line tools (``imm train``, ``demo``, ``generate``, ``eval``) ask this module at
start-up and every few seconds:

- ``--threads N`` (or ``torch.set_num_threads`` before calling the Python API, which never adapts) fixes
  the count;
- ``OMP_NUM_THREADS`` set in the environment (torchrun sets it to 1 for several processes per machine)
  fixes it too, as PyTorch already reads it;
- otherwise the count follows the cores free of other processes' work: Linux's ``/proc/stat`` busy time
  minus this process's own CPU time, over the last few seconds, rounded (``free_cores``).
"""
from __future__ import annotations

import os
import time

import torch

from imm.core.errors import InputError

CHECK_EVERY_S = 5.0  # how often a running command looks again
_adaptive: "AdaptiveThreads | None" = None
_source: str | None = None  # what set the count: --threads, OMP_NUM_THREADS, automatic


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or taskset's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _busy_and_total_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from the first line of /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user time
    return total - idle, total


def free_cores(other_busy_cores: float, cores: int) -> int:
    """Threads to run: the cores not used by others, rounded to the nearest whole core, at least 1.

    Rounding (not flooring) keeps small background noise (a shell, a file system daemon) from costing a
    thread; a process using most of a core takes it."""
    return max(1, min(cores, round(cores - other_busy_cores)))


class AdaptiveThreads:
    """Measures what other processes use between two calls and sets ``torch.set_num_threads`` to the rest."""

    def __init__(self, cores: int | None = None, check_every_s: float = CHECK_EVERY_S):
        self.cores = cores or available_cores()
        self.check_every_s = check_every_s
        self._mark = self._sample()

    def _sample(self):
        return time.monotonic(), time.process_time(), _busy_and_total_jiffies()

    def others_busy_cores(self) -> float | None:
        """Cores' worth of CPU time spent by other processes since the last measurement (None: unknown)."""
        (wall0, own0, jiffies0), (wall1, own1, jiffies1) = self._mark, self._sample()
        self._mark = (wall1, own1, jiffies1)
        if jiffies0 is None or jiffies1 is None or jiffies1[1] <= jiffies0[1]:
            return None
        machine_cores = os.cpu_count() or self.cores
        busy_share = (jiffies1[0] - jiffies0[0]) / (jiffies1[1] - jiffies0[1])  # of all the machine's CPUs
        busy_cores = busy_share * machine_cores
        own_cores = (own1 - own0) / max(wall1 - wall0, 1e-6)
        return max(0.0, busy_cores - own_cores)

    def adjust(self) -> int:
        others = self.others_busy_cores()
        if others is not None:
            torch.set_num_threads(free_cores(others, self.cores))
        return torch.get_num_threads()

    def maybe_adjust(self) -> None:
        if time.monotonic() - self._mark[0] >= self.check_every_s:
            self.adjust()


def configure(threads: int | None) -> None:
    """Set up the threads of a command-line run. ``threads``: the ``--threads`` value (None: automatic
    unless OMP_NUM_THREADS is set)."""
    global _adaptive, _source
    _adaptive = None
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
        _source = "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        _source = "OMP_NUM_THREADS"
    else:
        _adaptive = AdaptiveThreads()
        time.sleep(0.25)  # one short look at what the machine is doing before the first step
        _adaptive.adjust()
        _source = f"of {_adaptive.cores} cores, following the cores other processes leave free"


def describe() -> str:
    """``2 threads of 2 cores, following ...`` / ``1 thread, --threads`` for a run's start-up line."""
    n = torch.get_num_threads()
    return f"{n} thread{'s' * (n != 1)}" + (f" {_source}" if _adaptive else f", {_source}" if _source else "")


def tick() -> None:
    """Called by long loops (a training step, a sampling batch): re-measures every CHECK_EVERY_S seconds."""
    if _adaptive is not None:
        _adaptive.maybe_adjust()
