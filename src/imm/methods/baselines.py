# Copyright 2025 The imm authors.
# SPDX-License-Identifier: Apache-2.0
"""The single-stage baselines IMM is compared with, on IMM's own networks, data and trainer. Pure math.

Both baselines train the same ``IMMNetwork`` (same backbone, same c_in / c_noise preconditioning) and
plug into the trainer through ``loss.kind`` (``imm``, ``flow_matching``, ``consistency``):

* **Flow matching** (``FlowMatchingLoss``; Lipman et al., "Flow Matching for Generative Modeling", ICLR
  2023; the OT path = the paper's ``fm`` schedule): x_t = (1 - t) x + t z with z ~ N(0, sigma_d^2 I), velocity target v = z - x. The
  backbone output G (read with ``IMMNetwork(..., backbone_only=True)``, so the c_in / c_noise
  preconditioning is shared and ``f_type`` does not matter) is trained so that sigma_d G(x_t, t, t) is
  the velocity: the loss is ||G - v / sigma_d||^2, and ``flow_sample`` runs Euler or Heun on
  dx/dt = sigma_d G(x, t, t). The second time input is always s = t (t - s = 0 for
  ``temb_type='stride'``), in training and in sampling. (With ``f_type='euler_fm'``,
  f_{s,t} = x_t - (t - s) sigma_d G of App. C.5 is the same Euler step.)
* **Consistency training** (``ConsistencyTrainingLoss``; iCT: Song & Dhariwal, "Improved Techniques for
  Training Consistency Models", ICLR 2024): the special case of IMM in Lemma 1/2 of the paper: one
  particle per group (M = 1), the target time fixed at s = eps (the network is f_{eps,t}, a consistency
  function with the boundary f_{eps,eps} = identity), and the pseudo-Huber kernel, whose MMD^2 with
  M = 1 is exactly iCT's loss sqrt(||y_t - y_r||^2 + c^2) - c (``kernel='energy'`` gives the squared L2
  of the original CT, Song et al., "Consistency Models", ICML 2023). Its usual time schedule (iCT): a
  Karras grid of N noise levels in eta (= sigma of EDM, rho = 7, eta in [0.002, eta(T)]), N doubling
  on the curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1 / s0) + 1)),
  adjacent levels (eta_i, eta_{i+1}) drawn from the discretised lognormal (P_mean, P_std), t and r
  their times, and the weight lambda = 1 / (eta_{i+1} - eta_i). Sampling: ``imm.sample`` with
  ``sampler='restart'`` (denoise to eps, re-noise), the multistep consistency sampler.

``imm.methods.registry`` registers both next to IMM (loss class, sampler, training compute per sample).
"""

from __future__ import annotations

import math

import torch

from imm.core.errors import InputError
from imm.methods.moment_matching import _unwrap, dropped_labels, finite_mean, group_mmd
from imm.model import schedules
from imm.model.sampling import step_cfg_scales

FLOW_SOLVERS = {"euler": 1, "heun": 2}  # the network evaluations of one step


class FlowMatchingLoss:
    """Conditional flow matching on the OT path: E_t,x,z ||G(x_t, t, t) - (z - x) / sigma_d||^2.

    t ~ U(eps, T) of the network (``time_sampling='uniform'``) or logit-normal(0, 1) mapped into that
    range (``'logit_normal'``, SD3's choice). Only G is trained (any ``f_type``); sample with
    ``flow_sample``, not ``imm.sample`` (which would feed the second time input s != t).
    Returns (loss, stats) like ``IMMLoss``: stats ``loss`` [B] per-sample loss, ``t`` [B], ``nonfinite``.
    """

    group_size = 1

    def __init__(self, time_sampling: str = "uniform", label_dropout: float = 0.0):
        if time_sampling not in ("uniform", "logit_normal"):
            raise InputError(f"unknown time_sampling {time_sampling!r}; choose uniform or logit_normal")
        if not 0 <= label_dropout <= 1:
            raise InputError(f"label_dropout must lie in [0, 1], got {label_dropout}")
        self.time_sampling = time_sampling
        self.label_dropout = float(label_dropout)

    def set_progress(self, step: int, total_steps: int) -> None:
        """No schedule over training (part of the loss protocol, imm.methods.registry.TrainingLoss)."""

    def __call__(self, net, images, labels=None, target_net=None, generator=None):
        meta = _unwrap(target_net if target_net is not None else net)
        batch, device = images.shape[0], images.device
        dtype = torch.promote_types(images.dtype, torch.float32)
        u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        if self.time_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn(batch, generator=generator, device=device, dtype=torch.float64))
        t = (meta.eps + (meta.T - meta.eps) * u).to(dtype)
        noise = torch.randn(images.shape, generator=generator, device=device, dtype=dtype) * meta.sigma_data
        _, onehot, keep = dropped_labels(meta, labels, batch, device, self.label_dropout, generator)
        x = images.to(dtype)
        x_t = schedules.add_noise(x, t.view(-1, *([1] * (x.ndim - 1))), noise, "fm")
        g = net(x_t, t, t, class_labels=onehot, backbone_only=True)  # through DDP/compile wrappers
        per_sample = (g.to(dtype) - (noise - x) / meta.sigma_data).square().flatten(1).mean(1)
        loss, nonfinite = finite_mean(per_sample)
        stats = {"loss": per_sample.detach(), "t": t, "nonfinite": nonfinite}
        if keep is not None:
            stats["label_dropped"] = 1 - keep.float().mean()
        return loss, stats


@torch.no_grad()
def flow_velocity(net, x, t, labels=None, cfg_scale: float | None = None):
    """dx/dt = sigma_d G(x, t, t) of a flow-matching-trained network; CFG on G as in ``IMMNetwork``."""
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
    g = net(x, t, t, class_labels=labels, cfg_scale=cfg_scale, backbone_only=True)
    return net.sigma_data * g.to(x.dtype)


@torch.no_grad()
def flow_sample(net, x_T, labels=None, *, nfe: int | None = None, solver: str = "euler",
                cfg_scale: float | None = None, grid: torch.Tensor | None = None, cfg_interval=None):
    """Integrate the flow from t = T to t = eps with ``nfe`` network evaluations.

    ``euler``: one step per interval of the time grid; ``heun``: Heun's second-order method on each
    interval (the corrector on every step, so nfe = 2 x steps exactly). The grid is uniform with nfe
    (Euler) or nfe / 2 (Heun) steps, or ``grid`` as given (times T = t_0 > ... > t_N = eps, e.g.
    ``imm.model.sampling.time_grid`` of a sampling entry; nfe then follows from it). ``cfg_scale`` guides
    the velocity; with ``cfg_interval`` only the steps whose start time lies in it, both evaluations of a
    Heun step alike (``imm.model.sampling.step_cfg_scales``, the rule of ``imm.sample``). Float64 state,
    float32 network.
    """
    if solver not in FLOW_SOLVERS:
        raise InputError(f"unknown solver {solver!r}; choose one of {', '.join(FLOW_SOLVERS)}")
    per_step = FLOW_SOLVERS[solver]
    if grid is None:
        if nfe is None or nfe < 1 or nfe % per_step:
            raise InputError(f"nfe={nfe}: Euler needs nfe >= 1, Heun an even nfe >= 2")
        grid = torch.linspace(net.T, net.eps, nfe // per_step + 1, dtype=torch.float64)
    else:
        grid = torch.as_tensor(grid, dtype=torch.float64)
        if grid.ndim != 1 or len(grid) < 2 or not bool((grid[1:] < grid[:-1]).all()):
            raise InputError("grid must hold two or more decreasing times")
        if nfe is not None and nfe != (len(grid) - 1) * per_step:
            raise InputError(f"nfe={nfe} disagrees with a {len(grid) - 1}-step {solver} grid")
    x = x_T.to(torch.float64)
    for t_cur, t_next, scale in zip(grid[:-1], grid[1:], step_cfg_scales(grid[:-1], cfg_scale, cfg_interval)):
        h = float(t_next - t_cur)
        v = flow_velocity(net, x.float(), t_cur, labels, scale).to(torch.float64)
        if solver == "euler":
            x = x + h * v
        else:
            x_pred = x + h * v
            v_next = flow_velocity(net, x_pred.float(), t_next, labels, scale).to(torch.float64)
            x = x + h * 0.5 * (v + v_next)
    return x.to(torch.float32)


def karras_levels(n: int, eta_min: float, eta_max: float, rho: float = 7.0) -> torch.Tensor:
    """n noise levels eta_min = eta_0 < ... < eta_{n-1} = eta_max, rho-spaced (EDM Eq. 5), float64."""
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    return (eta_min ** (1 / rho) + i * (eta_max ** (1 / rho) - eta_min ** (1 / rho))) ** rho


def ict_num_levels(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1/s0) + 1))."""
    k_prime = max(1, math.floor(total_steps / (math.log2(s1 / s0) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


class ConsistencyTrainingLoss:
    """Consistency training as IMM with M = 1, s = eps and the pseudo-Huber (or energy) kernel.

    The trainer calls ``set_progress(step, total_steps)`` before each step (the N(k) curriculum).
    Stats as ``IMMLoss`` (``loss``, ``t``, ``s``, ``r``, ``weight``, ``mmd2``, ``nonfinite``, ``num_levels``).
    """

    group_size = 1

    def __init__(self, kernel: str = "pseudo_huber", huber_c: float = 0.00054, eta_min: float = 0.002,
                 s0: int = 10, s1: int = 1280, P_mean: float = -1.1, P_std: float = 2.0,
                 label_dropout: float = 0.0):
        if kernel not in ("pseudo_huber", "energy"):
            raise InputError(f"consistency training uses kernel pseudo_huber or energy, got {kernel!r}")
        if not 0 <= label_dropout <= 1:
            raise InputError(f"label_dropout must lie in [0, 1], got {label_dropout}")
        self.kernel, self.huber_c, self.label_dropout = kernel, float(huber_c), float(label_dropout)
        self.eta_min, self.s0, self.s1 = float(eta_min), int(s0), int(s1)
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.step, self.total_steps = 0, 1

    def set_progress(self, step: int, total_steps: int) -> None:
        self.step, self.total_steps = int(step), int(total_steps)

    def levels(self, meta) -> torch.Tensor:
        """The current Karras grid in eta, from max(eta_min, eta(eps)) to eta(T)."""
        ends = schedules.eta(torch.tensor([meta.eps, meta.T], dtype=torch.float64), meta.noise_schedule)
        n = ict_num_levels(self.step, self.total_steps, self.s0, self.s1)
        return karras_levels(n, max(self.eta_min, float(ends[0])), float(ends[1]))

    def sample_times(self, meta, n: int, generator=None, device=None):
        """(t, r, weight) [n]: adjacent levels from iCT's discretised lognormal, lambda = 1/(eta_{i+1}-eta_i)."""
        eta = self.levels(meta)
        cdf = torch.special.ndtr((eta.log() - self.P_mean) / self.P_std)
        probs = (cdf[1:] - cdf[:-1]).clamp(min=0)
        i = torch.multinomial(probs.to(device), n, replacement=True, generator=generator).cpu()
        eta_r, eta_t = eta[i], eta[i + 1]
        t = schedules.eta_to_t(eta_t, meta.noise_schedule)
        r = schedules.eta_to_t(eta_r, meta.noise_schedule)
        return t, r, 1 / (eta_t - eta_r)

    def __call__(self, net, images, labels=None, target_net=None, generator=None):
        target_net = net if target_net is None else target_net
        meta = _unwrap(target_net)
        batch, device = images.shape[0], images.device
        tdtype = torch.promote_types(images.dtype, torch.float32)
        t, r, weight = (v.to(device=device, dtype=tdtype) for v in self.sample_times(meta, batch, generator, device))
        s = torch.full_like(t, meta.eps)
        noise = torch.randn(images.shape, generator=generator, device=device, dtype=tdtype) * meta.sigma_data
        _, onehot, keep = dropped_labels(meta, labels, batch, device, self.label_dropout, generator)
        x = images.to(tdtype)
        shape = (-1,) + (1,) * (x.ndim - 1)
        x_t = schedules.add_noise(x, t.view(shape), noise, meta.noise_schedule)
        x_r = schedules.add_noise(x, r.view(shape), noise, meta.noise_schedule)  # the same z: CT's estimator
        with torch.no_grad():
            y_r = target_net(x_r, r, s, class_labels=onehot)
        y_t = net(x_t, t, s, class_labels=onehot)
        mmd2 = group_mmd(y_t.reshape(batch, 1, -1), y_r.detach().reshape(batch, 1, -1), None, self.kernel,
                         huber_c=self.huber_c)
        loss, nonfinite = finite_mean(mmd2, weight)
        stats = {"loss": (weight * mmd2).detach(), "mmd2": mmd2.detach(), "t": t, "s": s, "r": r,
                 "weight": weight, "nonfinite": nonfinite,
                 "num_levels": torch.tensor(ict_num_levels(self.step, self.total_steps, self.s0, self.s1))}
        if keep is not None:
            stats["label_dropped"] = 1 - keep.float().mean()
        return loss, stats
