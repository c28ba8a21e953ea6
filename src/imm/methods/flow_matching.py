# Copyright 2025 The imm authors.
# SPDX-License-Identifier: Apache-2.0
"""Flow matching on IMM's own networks, data and trainer (``loss.kind=flow_matching``), the baseline IMM is
compared with at equal compute. Pure math.

Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023, on the OT path (the paper's ``fm``
schedule): x_t = (1 - t) x + t z with z ~ N(0, sigma_d^2 I), velocity target v = z - x. The backbone output
G (read with ``IMMNetwork(..., backbone_only=True)``, so the c_in / c_noise preconditioning is shared and
``f_type`` does not matter) is trained so that sigma_d G(x_t, t, t) is the velocity: the loss is
||G - v / sigma_d||^2, and :func:`flow_sample` runs Euler or Heun on dx/dt = sigma_d G(x, t, t). The second
time input is always s = t (t - s = 0 for ``temb_type='stride'``), in training and in sampling. (With
``f_type='euler_fm'``, f_{s,t} = x_t - (t - s) sigma_d G of App. C.5 is the same Euler step, so a flow-matching
network is a warm start for IMM.)
"""

from __future__ import annotations

import torch

from imm.core.errors import InputError
from imm.methods.moment_matching import _unwrap, dropped_labels, finite_mean
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
