"""The training methods the trainer knows (``loss.kind``): IMM and the baselines it is compared with.

Each :class:`Method` names its loss class (built from the other ``loss.*`` keys), its own sampler (which
samples a sampling entry on the entry's time grid), the entry keys' values that sampler honours, what it needs
of the network and of the trainer, and its training compute per sample in forward-pass equivalents as
``torch.utils.flop_counter`` counts them (:mod:`imm.methods.cost`; a backward pass is 2 forward passes): IMM
and consistency training 4 (the no-grad target pass, the gradient pass and its backward), flow matching 3,
MeanFlow 5 (PyTorch's forward-mode JVP costs 3: the pass itself and a tangent of 2, then the backward 2).
A new baseline is one loss class meeting :class:`TrainingLoss` and one entry in :data:`METHODS`; the
trainer, ``imm generate``, ``imm eval fid`` and the benchmarks read everything else from here, and sample
through :func:`entry_sampler`, which refuses an entry key the method cannot honour.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from imm.core.config import ConfigError, check_kind
from imm.methods.consistency import ConsistencyTrainingLoss
from imm.methods.flow_matching import FLOW_SOLVERS, FlowMatchingLoss, flow_sample
from imm.methods.meanflow import MeanFlowLoss
from imm.methods.moment_matching import IMMLoss
from imm.model.network import IMMNetwork
from imm.model.sampling import SAMPLERS, SamplingEntry, sample, time_grid

NETWORK_DEFAULTS = {name: p.default for name, p in inspect.signature(IMMNetwork.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}


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
    # optional, False when absent: the gradient pass runs on the unwrapped network (``target_net``), outside
    # DDP's hooks, so the trainer averages the gradients over processes itself
    unwrapped_gradients: bool

    def __call__(self, net, x: torch.Tensor, labels, *, target_net, generator) -> tuple[torch.Tensor, dict]: ...

    def set_progress(self, step: int, total_steps: int) -> None: ...


def _consistency_sample(net, x_T, labels=None, *, sampler=None, **grid_and_guidance):
    """The multistep consistency sampler (Song et al., "Consistency Models", ICML 2023, Alg. 1) on the
    entry's time grid: ``imm.sample`` with ``sampler='restart'``. A consistency function jumps only to eps,
    so its one way from t_i to t_{i+1} is to denoise to eps and re-noise to t_{i+1}: an entry's
    ``pushforward`` and ``restart`` are this same walk."""
    return sample(net, x_T, labels, sampler="restart", **grid_and_guidance)


def _flow_matching_sample(net, x_T, labels=None, *, sampler=None, generator=None, num_steps=None,
                          discretization=None, mid_nt=None, **solver_and_guidance):
    """The flow integrated along the entry's time grid (``flow_sample``: Euler, or the entry's ``solver``),
    the flow's pushforward from each grid time to the next; deterministic, so ``generator`` is unused."""
    grid = time_grid(net, num_steps, discretization, mid_nt, device=x_T.device)
    return flow_sample(net, x_T, labels, grid=grid, **solver_and_guidance)


@dataclass(frozen=True)
class Method:
    loss: type  # a TrainingLoss, built from the loss section's other keys
    sample: Callable  # imm.sample's call (net, x_T, labels, *, generator, **sampling entry): the entry's time grid
    forward_equivalents: int  # training compute per sample
    samplers: tuple[str, ...]  # the values of an entry's `sampler` it honours
    solvers: tuple[str, ...] = ()  # the values of an entry's `solver` it honours (none: the key is refused)
    description: str = ""
    network: tuple[tuple[str, object, str], ...] = ()  # (network key, the value it must have, why)
    not_training: tuple[tuple[str, object, str], ...] = ()  # (training key, a value it cannot train with, why)


METHODS: dict[str, Method] = {
    "imm": Method(IMMLoss, sample, 4, SAMPLERS, description="Inductive Moment Matching, pushforward sampling"),
    "flow_matching": Method(FlowMatchingLoss, _flow_matching_sample, 3, ("pushforward",), tuple(FLOW_SOLVERS),
                            description="OT-path flow matching, Euler or Heun sampling"),
    "consistency": Method(ConsistencyTrainingLoss, _consistency_sample, 4, SAMPLERS,
                          description="consistency training (iCT schedule), restart (multistep) sampling"),
    # without guidance in training; loss.omega != 1 adds a forward pass, loss.kappa != 0 another
    "meanflow": Method(MeanFlowLoss, sample, 5, ("pushforward",),
                       description="MeanFlow (average velocity by a forward-mode JVP), pushforward sampling",
                       network=(("f_type", "euler_fm", "its output sigma_d G is the average velocity u, and "
                                 "f_{s,t}(x) = x - (t - s) u is the MeanFlow step"),
                                ("s_embed", True, "u depends on r through the network's second time input")),
                       not_training=(
                           ("parallel", "fsdp", "its forward-mode JVP (torch.func.jvp) runs on the whole unwrapped "
                                                "network, which FSDP2 shards; use training.parallel=ddp"),
                           ("compile", True, "torch.compile runs a compiled network under torch.func.jvp eagerly, "
                                             "and compiling the JVP itself fails on the normalisation layers "
                                             "(torch 2.13); use training.compile=false"),
                           ("memory_format", "channels_last", "PyTorch's forward-mode derivative of GroupNorm fails "
                                                             "on a channels_last input (torch 2.13); use "
                                                             "training.memory_format=contiguous or auto"))),
}


DEFAULT_METHOD = "imm"  # the method of a config or checkpoint that names none


def get(method: str) -> Method:
    """The method a ``loss.kind`` names; an unknown one is a ConfigError naming the nearest."""
    return METHODS[check_kind("loss", method, METHODS)]


def build_loss(cfg: dict):
    """The loss of a canonical ``loss`` section's ``kind`` (default :data:`DEFAULT_METHOD`) with the other keys as
    its arguments."""
    cfg = dict(cfg)
    return get(cfg.pop("kind", DEFAULT_METHOD)).loss(**cfg)


def check_training(method: str, network: Mapping, training: Mapping) -> None:
    """A one-line ConfigError when ``method`` cannot train the ``network`` section (canonical; a key it leaves
    unset has :class:`imm.model.network.IMMNetwork`'s default, or its backbone's, which every method can train)
    or with a setting of the ``training`` section."""
    spec = get(method)
    for key, value, why in spec.network:
        got = network.get(key, NETWORK_DEFAULTS.get(key, value))
        if got != value:
            raise ConfigError(f"loss.kind={method} needs network.{key}={_shown(value)} (got {_shown(got)}): {why}")
    for key, value, why in spec.not_training:
        if training.get(key) == value:
            raise ConfigError(f"loss.kind={method} cannot train with training.{key}={_shown(value)}: {why}")


def cannot_train_with(method: str, key: str, value) -> bool:
    """Whether ``method`` refuses ``training.<key>=<value>`` (:attr:`Method.not_training`), e.g. a layout that
    ``training.memory_format=auto`` must then not choose."""
    return any((k, v) == (key, value) for k, v, _ in get(method).not_training)


def _shown(value) -> str:
    """A value as it is written in a config (true/false)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_entry(method: str, entry: SamplingEntry, name: str | None = None) -> None:
    """A one-line ConfigError when the sampler of ``method`` cannot honour a key of ``entry`` (``name``: the
    entry's name in the config, for the message). Every method samples the entry's time grid and its
    guidance (``cfg_scale``, ``cfg_interval``); ``sampler`` and ``solver`` take the values of
    :class:`Method`."""
    spec, where = get(method), f"sampling entry {name!r}" if name else "a sampling entry"
    if entry.sampler not in spec.samplers:
        raise ConfigError(f"{where}: loss.kind={method} cannot honour sampler={entry.sampler} (its networks "
                          f"sample with {' or '.join(spec.samplers)})")
    if entry.solver is not None and entry.solver not in spec.solvers:
        can = f"solver is one of {', '.join(spec.solvers)}" if spec.solvers else "no solver key"
        raise ConfigError(f"{where}: loss.kind={method} cannot honour solver={entry.solver} ({can})")


def check_entries(method: str, entries: Mapping[str, SamplingEntry]) -> None:
    """:func:`check_entry` of every named entry, before anything is sampled."""
    for name, entry in entries.items():
        check_entry(method, entry, name)


def entry_sampler(method: str) -> Callable:
    """The sampler of a network trained by ``method``, with :func:`imm.sample`'s call (``net, x_T, labels,
    generator=..., **sampling entry``): it samples the entry's time grid (:func:`imm.model.sampling.time_grid`
    of ``num_steps``, ``discretization``, ``mid_nt``) and guidance with the method's own sampler (IMM: the
    entry's pushforward or restart, exactly as :func:`imm.sample`; flow matching: Euler or the entry's
    ``solver`` along the grid; consistency training: the multistep consistency sampler restarting at the
    grid's times) after :func:`check_entry`. ``imm generate``, ``imm eval fid``, the trainer's sample grids
    and periodic FID and the benchmarks all sample through it."""
    spec = get(method)

    def sample_entry(net, x_T, labels=None, *, generator=None, **entry):
        check_entry(method, SamplingEntry(**entry))
        return spec.sample(net, x_T, labels, generator=generator, **entry)

    return sample_entry
