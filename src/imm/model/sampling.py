"""Few-step samplers (paper Sec. 4.3, Alg. 2/4/5; the official release's ``generate_images.py``,
github.com/lumalabs/imm).

* ``pushforward``: x <- f_{t_{i+1}, t_i}(x) along the time grid (Alg. 2).
* ``restart``:     x <- f_{eps, t_i}(x), then re-noise to t_{i+1} with fresh noise (Alg. 5).

Time grids, exactly as the release builds them (float64):

* ``uniform``: linspace(T, eps, N + 1)
* ``edm``:     rho = 7 spacing in eta between eta(T) and eta(eps)
* otherwise:   [T] + [eta^-1(nt) for nt in mid_nt] + [eps]   (``mid_nt=None`` is one step T -> eps)

The loop runs in float64 like the release; the network itself runs in float32 (or autocast).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from imm.core.errors import InputError
from imm.model import schedules

SAMPLERS = ("pushforward", "restart")
DISCRETIZATIONS = ("uniform", "edm")


MAX_SAMPLING_STEPS = 4096  # the most steps an entry may take (a file's entry may ask for anything)


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must hold finite numbers, got {value!r:.40}")
    return float(value)


@dataclass(frozen=True)
class SamplingEntry:
    """One named way to sample (an entry of a config's ``sampling:`` section): the keyword arguments of
    :func:`sample` other than the inputs, and ``solver``, the ODE solver of a flow-matching network's entry
    (``euler`` or ``heun``; :func:`imm.methods.registry.entry_sampler` samples an entry with the sampler of
    the network's training method and refuses a key that method cannot honour). Unset (None) fields take
    the sampler's defaults."""

    sampler: str = "pushforward"
    num_steps: int | None = None
    discretization: str | None = None
    mid_nt: tuple[float, ...] | None = None
    cfg_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    solver: str | None = None

    def __post_init__(self):
        """Every field typed and bounded (an entry may come from a file someone else wrote): at most
        :data:`MAX_SAMPLING_STEPS` steps, finite numbers, names as strings."""
        if not isinstance(self.sampler, str) or self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r:.40}; choose one of {', '.join(SAMPLERS)}")
        steps = self.num_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or not 1 <= steps <= MAX_SAMPLING_STEPS):
            raise InputError(f"num_steps must be an integer from 1 to {MAX_SAMPLING_STEPS}, got {steps!r:.40}")
        for name in ("discretization", "solver"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InputError(f"{name} must be a name, got {getattr(self, name)!r:.40}")
        if self.cfg_scale is not None:
            object.__setattr__(self, "cfg_scale", _finite("cfg_scale", self.cfg_scale))
        for name, most in (("mid_nt", MAX_SAMPLING_STEPS - 1), ("cfg_interval", 2)):  # hashable, like the rest
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) > most:
                raise InputError(f"{name} must be a list of at most {most} numbers, got {value!r:.60}")
            object.__setattr__(self, name, tuple(_finite(name, v) for v in value))
        if self.cfg_interval is not None and len(self.cfg_interval) != 2:
            raise InputError(f"cfg_interval must be two times [lo, hi], got {list(self.cfg_interval)}")

    def kwargs(self) -> dict:
        """The fields that are set, as keyword arguments of the entry's sampler (lists for the sequences)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name == "sampler":
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def with_guidance(self, cfg_scale: float | None = None, cfg_interval=None) -> SamplingEntry:
        """A copy with ``cfg_scale`` / ``cfg_interval`` replaced where they are given (not None)."""
        changes = {k: v for k, v in (("cfg_scale", cfg_scale), ("cfg_interval", cfg_interval)) if v is not None}
        return SamplingEntry(**{**self.kwargs(), **changes})

    @classmethod
    def uniform(cls, num_steps: int) -> SamplingEntry:
        """``num_steps`` steps on the uniform time grid (pushforward for IMM)."""
        return cls(num_steps=int(num_steps), discretization="uniform")


def time_grid(net, num_steps: int | None = None, discretization: str | None = None,
              mid_nt: Sequence[float] | None = None, device=None) -> torch.Tensor:
    """The N + 1 times T = t_0 > t_1 > ... > t_N = eps of an N-step sampler, in float64."""
    if discretization in DISCRETIZATIONS:
        if num_steps is None or int(num_steps) < 1:
            raise InputError(f"discretization={discretization!r} needs num_steps >= 1")
        num_steps = int(num_steps)
        if discretization == "uniform":
            return torch.linspace(net.T, net.eps, num_steps + 1, dtype=torch.float64, device=device)
        rho = 7
        nt_min = net.eta(torch.as_tensor(net.eps, dtype=torch.float64)).item()
        nt_max = net.eta(torch.as_tensor(net.T, dtype=torch.float64)).item()
        frac = torch.arange(num_steps + 1, dtype=torch.float64, device=device) / num_steps
        nt = (nt_max ** (1 / rho) + frac * (nt_min ** (1 / rho) - nt_max ** (1 / rho))) ** rho
        return net.nt_to_t(nt)
    if discretization is not None:
        raise InputError(f"unknown discretization {discretization!r}; choose one of {', '.join(DISCRETIZATIONS)} or give mid_nt")
    mid_nt = list(mid_nt or [])
    if num_steps is not None and int(num_steps) != len(mid_nt) + 1:
        raise InputError(f"num_steps={num_steps} disagrees with mid_nt={mid_nt} ({len(mid_nt) + 1} steps)")
    # The release converts each mid_nt through a float32 tensor (torch.as_tensor of a Python float).
    mid_t = [net.nt_to_t(torch.as_tensor(float(nt), dtype=torch.float32)).item() for nt in mid_nt]
    return torch.tensor([net.T, *mid_t, net.eps], dtype=torch.float64, device=device)


def step_cfg_scales(start_times: torch.Tensor, cfg_scale: float | None,
                    cfg_interval: Sequence[float] | None = None) -> list[float | None]:
    """The guidance weight of each step (None: unguided), given the steps' start times."""
    if cfg_interval is None:
        return [cfg_scale] * len(start_times)
    if cfg_scale is None:
        raise InputError("cfg_interval needs cfg_scale")
    if len(cfg_interval) != 2 or not float(cfg_interval[0]) <= float(cfg_interval[1]):
        raise InputError(f"cfg_interval must be [t_lo, t_hi] with t_lo <= t_hi; got {list(cfg_interval)}")
    lo, hi = float(cfg_interval[0]), float(cfg_interval[1])
    return [cfg_scale if lo <= float(t) <= hi else None for t in start_times]


@torch.no_grad()
def sample(net, x_T: torch.Tensor, labels: torch.Tensor | None = None, *, sampler: str = "pushforward",
           num_steps: int | None = None, discretization: str | None = None,
           mid_nt: Sequence[float] | None = None, cfg_scale: float | None = None,
           cfg_interval: Sequence[float] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample from an IMM network in a few steps.

    Args:
        net: an ``IMMNetwork`` (e.g. from ``imm.load_network``).
        x_T: the starting point at time T, already scaled by sigma_data
            (``sigma_data * randn``, what the release's ``get_init_noise`` returns).
        labels: integer class ids [B] (or one-hot rows); None for unconditional nets, or to
            sample a conditional net with the null label.
        sampler: ``pushforward`` or ``restart``.
        num_steps, discretization, mid_nt: the time grid (see module docstring).
        cfg_scale: classifier-free guidance weight w (None: no guidance).
        cfg_interval: ``[t_lo, t_hi]``: guide only the steps whose start time t lies in
            t_lo <= t <= t_hi, plain conditional output elsewhere (the guidance interval of
            Kynkaanniemi et al., "Applying Guidance in a Limited Interval Improves Sample and
            Distribution Quality in Diffusion Models", NeurIPS 2024, Sec. 3, stated in IMM time t
            instead of sigma). None guides every step.
        generator: RNG for the restart sampler's fresh noise.

    Returns:
        The samples at time eps in model space, float32, same shape as ``x_T``.
    """
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if cfg_scale is not None and net.label_dim == 0:
        raise InputError("cfg_scale needs a class-conditional network (label_dim > 0)")
    expected = (net.img_channels, net.img_resolution, net.img_resolution)
    if x_T.ndim != 4 or tuple(x_T.shape[1:]) != expected:
        raise InputError(f"x_T must have shape [B, {', '.join(map(str, expected))}]; got {list(x_T.shape)}")
    t_steps = time_grid(net, num_steps, discretization, mid_nt, device=x_T.device)
    scales = step_cfg_scales(t_steps[:-1], cfg_scale, cfg_interval)
    class_labels = net.one_hot(labels, x_T.shape[0], x_T.device) if labels is not None else None
    x = x_T.to(torch.float64)
    if sampler == "pushforward":
        for t_cur, t_next, scale in zip(t_steps[:-1], t_steps[1:], scales):
            x = net(x, t_cur, t_next, class_labels, cfg_scale=scale).to(torch.float64)
        return x.to(torch.float32)
    # restart: denoise to eps from each grid time, re-noise to the next grid time (the last time, eps, is not visited)
    starts = t_steps[:-1]
    for i, (t_cur, scale) in enumerate(zip(starts, scales)):
        x = net(x, t_cur, torch.full_like(t_cur, net.eps), class_labels, cfg_scale=scale).to(torch.float64)
        if i < len(starts) - 1:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64) * net.sigma_data
            x = schedules.add_noise(x, starts[i + 1], noise, net.noise_schedule)
    return x.to(torch.float32)
