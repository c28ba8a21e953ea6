# Copyright 2025 The imm authors.
# SPDX-License-Identifier: Apache-2.0
"""MeanFlow on IMM's own networks, data and trainer (``loss.kind=meanflow``), the one-step method IMM is compared
with at equal compute. Pure math.

Geng, Deng, Bai, Kolter, He, "Mean Flows for One-step Generative Modeling", 2025 (arXiv 2505.13447). On the OT
path z_t = (1 - t) x + t e with e ~ N(0, sigma_d^2 I) and velocity v = e - x, the average velocity
u(z_t, r, t) = 1/(t - r) int_r^t v(z_tau, tau) dtau satisfies the MeanFlow identity u = v - (t - r) d/dt u,
with the total derivative d/dt u = v . d_z u + d_t u (dr/dt = 0). Training regresses u_theta on the
stop-gradient target u_tgt = v - (t - r) (v . d_z u_theta + d_t u_theta), whose
derivative term is one forward-mode Jacobian-vector product of u_theta at (z_t, r, t) with tangents (v, 0, 1)
(``torch.func.jvp``; the same call returns u_theta, which carries the gradient). The loss per sample is
sg(w) ||u_theta - sg(u_tgt)||^2, summed over dimensions, with the paper's adaptive weight
w = 1 / (||delta||^2 + c)^p (p = 0 is plain L2).

In IMM's terms: with ``network.f_type=euler_fm`` the network is f_{s,t}(x_t) = x_t - (t - s) sigma_d G(x_t, t,
s) (App. C.5 of the IMM paper), so u_theta(z, r, t) = sigma_d G(z, t, r) and f_{r,t} is MeanFlow's step
z_r = z_t - (t - r) u: IMM's pushforward sampler (``imm.sample``) is MeanFlow's one- and
multi-step sampler, and a MeanFlow checkpoint samples through ``imm generate`` like any other. The paper's
best time conditioning, (t, t - r), is ``network.temb_type=stride``.

Times (the paper's sampler, version "v0" of its code): t and r each from a logit-normal law, sigmoid(N(P_mean,
P_std^2)), ordered so that t >= r, and r set to t in all but a fraction ``r_neq_t_fraction`` of the pairs (where
r = t the target is plain flow matching, u(z, t, t) = v); the unit interval is mapped onto the network's
[eps, T]. Guidance in training (the paper's "Mean Flows with Guidance"): v is replaced by
v~ = omega v + kappa u_theta(z_t, t, t | c) + (1 - omega - kappa) u_theta(z_t, t, t | null) (no gradient) in
the tangent and in the target, for the samples whose label is kept; omega = 1, kappa = 0 is no guidance. One
network evaluation per step at sampling time.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from imm.core.errors import InputError
from imm.methods.moment_matching import _unwrap, dropped_labels, finite_mean
from imm.model import schedules


def average_velocity(net, z, t, r, labels=None) -> torch.Tensor:
    """u_theta(z_t, r, t) = sigma_d G(z_t, t, r) of an ``euler_fm`` network (or a wrapper of one)."""
    return _unwrap(net).sigma_data * net(z, t, r, class_labels=labels, backbone_only=True)


def velocity_and_total_derivative(net, z, t, r, v, labels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_theta(z, r, t), d/dt u_theta = v . d_z u_theta + d_t u_theta) from one forward-mode JVP with tangents
    (v, 0, 1). u_theta keeps its gradient; the derivative is returned detached. Attention
    runs on PyTorch's math kernel: the fused ones have no forward-mode derivative."""
    with sdpa_kernel([SDPBackend.MATH]):
        u, dudt = torch.func.jvp(lambda z_, t_, r_: average_velocity(net, z_, t_, r_, labels),
                                 (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    return u, dudt.detach()


def logit_normal(n: int, p_mean: float, p_std: float, generator=None, device=None) -> torch.Tensor:
    """sigmoid(N(p_mean, p_std^2)) in (0, 1), float64."""
    return torch.sigmoid(p_mean + p_std * torch.randn(n, generator=generator, device=device, dtype=torch.float64))


class MeanFlowLoss:
    """MeanFlow: regress u_theta(z_t, r, t) on sg(v - (t - r) d/dt u_theta) with the adaptive weight.

    Options (the paper's ImageNet defaults): ``r_neq_t_fraction`` 0.25 of the pairs with r != t; t and r from
    logit-normal(``P_mean_t``, ``P_std_t``) and (``P_mean_r``, ``P_std_r``), all (-0.4, 1.0); adaptive weight
    power ``p`` 1 and constant ``c`` 1e-3; guidance in training ``omega`` 1 and ``kappa`` 0 (none), which needs
    labels dropped with ``label_dropout`` so that the network learns the unconditional velocity too.
    Needs an ``euler_fm`` network. Returns (loss, stats) like ``IMMLoss``: stats ``loss`` [B] weighted
    per-sample loss, ``mse`` [B] its unweighted squared error per dimension, ``t``, ``r``, ``weight`` [B],
    ``nonfinite``.

    ``unwrapped_gradients``: the JVP runs on the unwrapped network (``target_net``; DDP cannot run under a
    forward-mode transform), so its gradient pass bypasses DDP's hooks and the trainer averages the gradients
    over processes itself (``imm.training.step``).
    """

    group_size = 1
    unwrapped_gradients = True

    def __init__(self, r_neq_t_fraction: float = 0.25, P_mean_t: float = -0.4, P_std_t: float = 1.0,
                 P_mean_r: float = -0.4, P_std_r: float = 1.0, p: float = 1.0, c: float = 1e-3,
                 omega: float = 1.0, kappa: float = 0.0, label_dropout: float = 0.0):
        if not 0 <= r_neq_t_fraction <= 1:
            raise InputError(f"r_neq_t_fraction must lie in [0, 1], got {r_neq_t_fraction}")
        if P_std_t <= 0 or P_std_r <= 0:
            raise InputError(f"P_std_t and P_std_r must be positive, got {P_std_t}, {P_std_r}")
        if p < 0 or c <= 0:
            raise InputError(f"the adaptive weight needs p >= 0 and c > 0, got p={p}, c={c}")
        if not 0 <= label_dropout <= 1:
            raise InputError(f"label_dropout must lie in [0, 1], got {label_dropout}")
        self.r_neq_t_fraction = float(r_neq_t_fraction)
        self.P_mean_t, self.P_std_t = float(P_mean_t), float(P_std_t)
        self.P_mean_r, self.P_std_r = float(P_mean_r), float(P_std_r)
        self.p, self.c = float(p), float(c)
        self.omega, self.kappa = float(omega), float(kappa)
        self.label_dropout = float(label_dropout)

    @property
    def guided(self) -> bool:
        return self.omega != 1 or self.kappa != 0

    def set_progress(self, step: int, total_steps: int) -> None:
        """No schedule over training (part of the loss protocol, imm.methods.registry.TrainingLoss)."""

    def sample_times(self, n: int, eps: float, T: float, generator=None, device=None):
        """(t, r) [n] float64 in [eps, T] with t >= r, r = t except in a fraction ``r_neq_t_fraction``."""
        t = logit_normal(n, self.P_mean_t, self.P_std_t, generator, device)
        r = logit_normal(n, self.P_mean_r, self.P_std_r, generator, device)
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        unequal = torch.rand(n, generator=generator, device=device, dtype=torch.float64) < self.r_neq_t_fraction
        r = torch.where(unequal, r, t)
        return eps + (T - eps) * t, eps + (T - eps) * r

    def guided_velocity(self, net, z, t, v, labels, keep) -> torch.Tensor:
        """v~ = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null) where the label is kept,
        v where it was dropped (no gradient)."""
        if labels is None:
            raise InputError("loss.omega / loss.kappa (guidance in training) need a class-conditional network and labels")
        with torch.no_grad():
            mix = (1 - self.omega - self.kappa) * average_velocity(net, z, t, t, torch.zeros_like(labels))
            if self.kappa:
                mix = mix + self.kappa * average_velocity(net, z, t, t, labels)
        guided = self.omega * v + mix.to(v.dtype)
        return guided if keep is None else torch.where(keep.view(-1, *([1] * (v.ndim - 1))), guided, v)

    def __call__(self, net, images, labels=None, target_net=None, generator=None):
        target_net = net if target_net is None else target_net  # the unwrapped network: the JVP runs on it
        meta = _unwrap(target_net)
        if meta.f_type != "euler_fm":
            raise InputError(f"loss.kind=meanflow needs network.f_type=euler_fm (got {meta.f_type}): its output "
                             "sigma_d G is the average velocity u")
        batch, device = images.shape[0], images.device
        dtype = torch.promote_types(images.dtype, torch.float32)
        t, r = (v.to(dtype) for v in self.sample_times(batch, meta.eps, meta.T, generator, device))
        noise = torch.randn(images.shape, generator=generator, device=device, dtype=dtype) * meta.sigma_data
        onehot, dropped, keep = dropped_labels(meta, labels, batch, device, self.label_dropout, generator)
        x = images.to(dtype)
        shape = (-1,) + (1,) * (x.ndim - 1)
        z = schedules.add_noise(x, t.view(shape), noise, "fm")  # (1 - t) x + t e
        v = noise - x
        if self.guided:
            v = self.guided_velocity(target_net, z, t, v, onehot, keep)
        u, dudt = velocity_and_total_derivative(target_net, z, t, r, v, dropped)
        target = v - (t - r).view(shape) * dudt.to(dtype)  # u_tgt, no gradient
        squared = (u.to(dtype) - target).square().flatten(1).sum(1)
        weight = 1 / (squared.detach() + self.c) ** self.p
        loss, nonfinite = finite_mean(squared, weight)
        stats = {"loss": (weight * squared).detach(), "mse": squared.detach() / x[0].numel(), "t": t, "r": r,
                 "weight": weight, "nonfinite": nonfinite}
        if keep is not None:
            stats["label_dropped"] = 1 - keep.float().mean()
        return loss, stats
