"""The machine's fast path for a network: precision (fp32 or bf16) and memory layout (contiguous or channels_last),
measured rather than assumed (``training.precision=auto``, ``imm generate --precision auto``).

Whether bf16 pays on a CPU depends on the instructions it has: AMX-BF16 tiles run bf16 matmuls and convolutions
several times faster than fp32, AVX512-BF16 somewhat faster, a CPU without either emulates bf16 and is slower.
Whether channels_last pays depends on oneDNN's kernels for the whole block, not the convolution alone (on an
AMD EPYC with AVX512-BF16 the bf16 convolution ran 1.2x faster in channels_last, while GroupNorm in
channels_last ran 8x slower and the training step as a whole 1.26x slower). So :func:`probe` times, forward
and backward, one block of each network family in each precision and layout:

* ``conv`` (the DDPM++/NCSN++ UNet): GroupNorm -> SiLU -> 3x3 convolution, batch 64, 32 channels, 32x32;
* ``matmul`` (DiT, the MLP): LayerNorm -> Linear 256->1024 -> SiLU -> Linear 1024->256, 2,048 rows.

:func:`choose` picks bf16 only when the best bf16 time beats the best fp32 time by :data:`BF16_MARGIN`
(the bf16 step also pays for copying the weights and for the operations the block leaves out), and
channels_last only when it beats the contiguous layout by :data:`LAYOUT_MARGIN`. The timings are cached
per machine (CPU model and flags) and torch version in ``$IMM_CACHE/fastpath-KEY.json`` (default
``~/.cache/imm``), so a machine is probed once (about 3 s). On CUDA, ``auto`` keeps each command's
configured settings (TF32 training, the network's own precision for sampling): the probe is a CPU tool.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from imm.core.errors import InputError
from imm.core.files import write_text

PRECISIONS = ("auto", "fp32", "bf16")  # what a sampling command may ask for (training: imm.training.config)
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
FAMILIES = ("conv", "matmul")
BF16_MARGIN = 1.2
LAYOUT_MARGIN = 1.1
PROBE_VERSION = 1


def torch_memory_format(name: str) -> torch.memory_format:
    """'channels_last' or 'contiguous' as torch's memory format."""
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


@dataclass(frozen=True)
class FastPath:
    """What a command computes in: ``precision`` ('fp32' or 'bf16'; training also 'tf32', fp32 with TF32
    matmuls on CUDA, and 'fp16', autocast), ``memory_format`` ('contiguous' or 'channels_last') and ``reason``,
    one line saying why."""

    precision: str = "fp32"
    memory_format: str = "contiguous"
    reason: str = "as configured"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def torch_memory_format(self) -> torch.memory_format:
        return torch_memory_format(self.memory_format)

    def describe(self) -> str:
        return f"{self.precision}, {self.memory_format.replace('contiguous', 'contiguous (NCHW)')} ({self.reason})"


def _cpuinfo(field: str) -> str:
    """The first ``field`` line's value in Linux's ``/proc/cpuinfo`` ('' where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_name() -> str:
    """The CPU's model name as lscpu prints it (``/proc/cpuinfo``), else the platform's processor string."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def _cpu_flags() -> str:
    return _cpuinfo("flags")


def bf16_flags() -> list[str]:
    """The CPU's bf16 and AMX feature flags (e.g. ``avx512_bf16``, ``amx_bf16``)."""
    return sorted(f for f in _cpu_flags().split() if "bf16" in f or f.startswith("amx"))


def cache_path() -> Path:
    """``$IMM_CACHE/fastpath-KEY.json``: KEY digests the CPU model, its flags, the torch version and the probe's
    own version."""
    root = Path(os.environ.get("IMM_CACHE") or Path.home() / ".cache" / "imm")
    key = hashlib.sha256(f"{cpu_name()}|{_cpu_flags()}|{torch.__version__}|{PROBE_VERSION}".encode()).hexdigest()
    return root / f"fastpath-{key[:16]}.json"


def _block(family: str, dtype: torch.dtype, memory_format: torch.memory_format):
    """A forward+backward call of the family's representative block, on fixed random inputs."""
    gen = torch.Generator().manual_seed(0)
    if family == "conv":
        layers = torch.nn.Sequential(torch.nn.GroupNorm(8, 32), torch.nn.SiLU(), torch.nn.Conv2d(32, 32, 3, padding=1))
        x = torch.randn(64, 32, 32, 32, generator=gen)
    else:
        layers = torch.nn.Sequential(torch.nn.LayerNorm(256), torch.nn.Linear(256, 1024), torch.nn.SiLU(),
                                     torch.nn.Linear(1024, 256))
        x = torch.randn(2048, 256, generator=gen)
    layers = layers.to(dtype=dtype)
    x = x.to(dtype)
    if x.ndim == 4:
        layers = layers.to(memory_format=memory_format)
        x = x.contiguous(memory_format=memory_format)
    x.requires_grad_(True)

    def call():
        layers(x).float().square().mean().backward()

    return call


def measure(rounds: int = 5) -> dict:
    """Seconds of one call of each family's block in each precision and layout: the fastest of ``rounds``
    rounds, each timing every variant of the family once after a warm-up, so that a busy moment of the
    machine (another process) does not decide the choice."""
    timings = {}
    for family in FAMILIES:
        layouts = ("contiguous", "channels_last") if family == "conv" else ("contiguous",)
        variants = [f"{p}/{m}" for p in ("fp32", "bf16") for m in layouts]
        calls = {}
        for v in variants:
            path = FastPath(*v.split("/"))
            calls[v] = _block(family, path.dtype, path.torch_memory_format)
            calls[v]()  # warm-up: oneDNN picks and caches its kernels
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(rounds):
            for v in variants:
                start = time.perf_counter()
                calls[v]()
                best[v] = min(best[v], time.perf_counter() - start)
        timings[family] = best
    return timings


def probe(refresh: bool = False) -> dict:
    """The cached timings of this machine (:func:`measure`, run once and :func:`record`-ed):
    ``{"cpu": ..., "torch": ..., "threads": ..., "timings": {family: {"precision/layout": seconds}}}``."""
    if not refresh:
        try:
            cached = json.loads(cache_path().read_text())
            if cached.get("version") == PROBE_VERSION and set(cached.get("timings", {})) == set(FAMILIES):
                return cached
        except (OSError, ValueError):
            pass
    return record(measure())


def record(timings: dict) -> dict:
    """Write ``timings`` (:func:`measure`'s form) with this machine's description to :func:`cache_path`, where
    :func:`probe` reads them from then on; returns what was written."""
    result = {"version": PROBE_VERSION, "cpu": cpu_name(), "bf16_flags": bf16_flags(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "timings": timings}
    path = cache_path()
    try:
        write_text(path, json.dumps(result, indent=1) + "\n")
    except OSError:
        pass  # a read-only home: probe again next time
    return result


def choose_from(timings: dict, family: str, precision: str = "auto", memory_format: str = "auto") -> FastPath:
    """The fast path for a network of ``family`` from measured ``timings`` (:func:`measure`'s form): ``auto``
    entries are chosen by the margins of the module docstring, the others kept."""
    times = timings[family]
    best = {p: min((t, k.split("/")[1]) for k, t in times.items() if k.startswith(p + "/")) for p in ("fp32", "bf16")}
    reasons = []
    if precision == "auto":
        ratio = best["fp32"][0] / best["bf16"][0]
        precision = "bf16" if ratio >= BF16_MARGIN else "fp32"
        reasons.append(f"a {family} block ran {ratio:.2f}x as fast in bf16 as in fp32"
                       f"{'' if precision == 'bf16' else f', under the {BF16_MARGIN}x that pays'}")
    if memory_format == "auto":
        measured = "bf16" if precision in ("bf16", "fp16") else "fp32"
        contiguous, last = times.get(f"{measured}/contiguous"), times.get(f"{measured}/channels_last")
        if last is None:
            memory_format = "contiguous"
        else:
            ratio = contiguous / last
            memory_format = "channels_last" if ratio >= LAYOUT_MARGIN else "contiguous"
            reasons.append(f"channels_last {ratio:.2f}x as fast as contiguous in {measured}")
    return FastPath(precision, memory_format, "; ".join(reasons) or "as configured")


def choose(family: str, device, precision: str = "auto", memory_format: str = "auto") -> FastPath:
    """:func:`choose_from` this machine's :func:`probe` on the CPU (the probe runs only when something is
    ``auto``); on other devices ``auto`` is TF32 in the contiguous layout."""
    if family not in FAMILIES:
        raise InputError(f"unknown network family {family!r}; choose one of {', '.join(FAMILIES)}")
    device = torch.device(device)
    if precision != "auto" and memory_format != "auto":
        return FastPath(precision, memory_format)
    if device.type != "cpu":
        return FastPath("tf32" if precision == "auto" else precision,
                        "contiguous" if memory_format == "auto" else memory_format, f"auto on {device.type}: as configured")
    measured = probe()
    path = choose_from(measured["timings"], family, precision, memory_format)
    if path.reason == FastPath.reason:  # nothing was measured against (a layout auto of the matmul family)
        return path
    return FastPath(path.precision, path.memory_format, f"auto on {measured['cpu']}: {path.reason}")
