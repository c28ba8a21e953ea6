# Copyright 2025 The imm authors.
# SPDX-License-Identifier: Apache-2.0
"""Consistency training on IMM's own networks, data and trainer (``loss.kind=consistency``), a baseline IMM is
compared with at equal compute. Pure math.

iCT (Song & Dhariwal, "Improved Techniques for Training Consistency Models", ICLR 2024) is the special case of
IMM in Lemma 1/2 of the paper: one particle per group (M = 1), the target time fixed at s = eps (the network is
f_{eps,t}, a consistency function with the boundary f_{eps,eps} = identity), and the pseudo-Huber kernel, whose
MMD^2 with M = 1 is exactly iCT's loss sqrt(||y_t - y_r||^2 + c^2) - c (``kernel='energy'`` gives the squared
L2 of the original CT, Song et al., "Consistency Models", ICML 2023). Its time schedule (iCT): a Karras grid of
N noise levels in eta (= sigma of EDM, rho = 7, eta in [0.002, eta(T)]), N doubling on the curriculum
N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1 / s0) + 1)), adjacent levels
(eta_i, eta_{i+1}) drawn from the discretised lognormal (P_mean, P_std), t and r their times, and the weight
lambda = 1 / (eta_{i+1} - eta_i). Sampling: the multistep consistency sampler (``imm.sample`` with
``sampler='restart'``: denoise to eps, re-noise; ``imm.methods.registry``).
"""

from __future__ import annotations

import math

import torch

from imm.core.errors import InputError
from imm.methods.moment_matching import _unwrap, dropped_labels, finite_mean, group_mmd
from imm.model import schedules


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
