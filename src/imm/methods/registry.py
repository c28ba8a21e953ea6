"""The training methods the trainer knows (``loss.kind``): IMM and the baselines it is compared with.

Each :class:`Method` names its loss class (built from the other ``loss.*`` keys), its own sampler and
its training compute per sample in forward-pass equivalents (a backward pass ~ 2 forward passes: IMM and
consistency training 4, the no-grad target pass + the gradient pass and its backward; flow matching 3).
A new baseline is one loss class meeting :class:`TrainingLoss` and one entry in :data:`METHODS`; the
trainer, ``imm generate``, ``imm eval fid`` and ``benchmarks/quality.py`` read everything else from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from imm.core.config import check_kind
from imm.methods.baselines import ConsistencyTrainingLoss, FlowMatchingLoss, flow_sample
from imm.methods.moment_matching import IMMLoss
from imm.model.sampling import sample


class TrainingLoss(Protocol):
    """What the trainer relies on in a loss (``imm.training.loop``).

    ``group_size``: samples that must stay together in one chunk on one device (IMM's M particles; 1
    for losses without groups). Calling it with ``(net, x, labels, target_net=..., generator=...)``
    returns the scalar loss to minimise and a dict of per-group tensors with at least ``loss`` [G],
    ``t`` [G] (the time of each group, for the loss-per-t log) and ``nonfinite`` (number of dropped
    groups). ``set_progress(step, total_steps)`` is called before every step: a loss with a schedule over
    training (iCT's N(k) curriculum, IMM's gap annealing) sets it there, the others do nothing.
    """

    group_size: int

    def __call__(self, net, x: torch.Tensor, labels, *, target_net, generator) -> tuple[torch.Tensor, dict]: ...

    def set_progress(self, step: int, total_steps: int) -> None: ...


def _pushforward(net, x_T, labels=None, *, nfe, solver="euler", cfg_scale=None, generator=None):
    return sample(net, x_T, labels, sampler="pushforward", num_steps=nfe, discretization="uniform",
                  cfg_scale=cfg_scale, generator=generator)


def _restart(net, x_T, labels=None, *, nfe, solver="euler", cfg_scale=None, generator=None):
    return sample(net, x_T, labels, sampler="restart", num_steps=nfe, discretization="uniform",
                  cfg_scale=cfg_scale, generator=generator)


def _flow(net, x_T, labels=None, *, nfe, solver="euler", cfg_scale=None, generator=None):
    return flow_sample(net, x_T, labels, nfe=nfe, solver=solver, cfg_scale=cfg_scale)


@dataclass(frozen=True)
class Method:
    loss: type  # a TrainingLoss, built from the loss section's other keys
    sample: Callable  # (net, x_T, labels, *, nfe, solver, cfg_scale, generator) -> samples, uniform time grid
    forward_equivalents: int  # training compute per sample
    solvers: tuple[str, ...] = ("-",)  # the sampler's variants ('-': one)
    description: str = ""


METHODS: dict[str, Method] = {
    "imm": Method(IMMLoss, _pushforward, 4, description="Inductive Moment Matching, pushforward sampling"),
    "flow_matching": Method(FlowMatchingLoss, _flow, 3, ("euler", "heun"),
                            description="OT-path flow matching, Euler or Heun sampling"),
    "consistency": Method(ConsistencyTrainingLoss, _restart, 4,
                          description="consistency training (iCT schedule), restart (multistep) sampling"),
}


def get(method: str) -> Method:
    """The method a ``loss.kind`` names; an unknown one is a ConfigError naming the nearest."""
    return METHODS[check_kind("loss", method, METHODS)]


def build_loss(cfg: dict):
    """The loss of a canonical ``loss`` section's ``kind`` (default ``imm``) with the other keys as its arguments."""
    cfg = dict(cfg)
    return get(cfg.pop("kind", "imm")).loss(**cfg)


@torch.no_grad()
def generate(net, x_T, labels=None, *, method: str, nfe: int, solver: str = "euler",
             cfg_scale: float | None = None, generator=None):
    """Samples with ``nfe`` network evaluations by the method's own sampler on a uniform time grid."""
    return get(method).sample(net, x_T, labels, nfe=nfe, solver=solver, cfg_scale=cfg_scale, generator=generator)


def entry_sampler(method: str) -> Callable:
    """A sampler with :func:`imm.sample`'s call (``net, x_T, labels, generator=..., **sampling entry``) for
    ``imm generate`` and ``imm eval fid``: IMM samples each entry as it is; another method takes the
    entry's step count (``num_steps``, or one more than its ``mid_nt`` points) on its own sampler's
    uniform grid."""
    get(method)  # a known method
    if method == "imm":
        return sample

    def sample_entry(net, x_T, labels=None, *, generator=None, num_steps=None, mid_nt=None, cfg_scale=None,
                     **unused_entry_keys):
        nfe = int(num_steps) if num_steps else len(mid_nt or []) + 1
        return generate(net, x_T, labels, method=method, nfe=nfe, cfg_scale=cfg_scale, generator=generator)

    return sample_entry
