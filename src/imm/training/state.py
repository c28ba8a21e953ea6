"""What a training run carries from step to step, in one object (:class:`TrainingState`): the online network,
its fixed-decay EMAs, the post-hoc EMA profiles (:class:`imm.training.phema.PowerEMA`), the optimizer, the fp16
GradScaler and the step; it saves itself as ``RUN/checkpoints/training-state-STEP.pt`` and restores itself from
one. Also the parallel wrapping of its modules (:func:`parallelize`: DDP or FSDP2).

A training state file is a ``torch.save`` dict of plain data, read back through the restricted unpickler
(:func:`imm.io.checkpoint.read_training_state`): ``format`` (``"imm-training"``), ``version`` (1), ``step``,
``config`` (the resolved run config), ``network_config``, ``model`` (online state_dict), ``ema`` ({str(decay):
state_dict}), ``optimizer`` (a full optimizer state_dict keyed by parameter names, so any number of processes,
with or without FSDP2, reads it), and when present ``phema`` (:meth:`PowerEMA.state_dict`) and ``scaler``
(the GradScaler's state, fp16 runs). Every tensor is gathered in full on the CPU: a state written by N
processes resumes on M.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from imm.core import distributed
from imm.core.config import ConfigError
from imm.core.distributed import full_state_dict
from imm.core.files import atomic_write
from imm.io.checkpoint import TRAINING_STATE_FORMAT, check_state_dict
from imm.model.network import IMMNetwork
from imm.model.precision import working_copy
from imm.training import phema
from imm.training.checkpoints import TrainingError, checkpoint_path
from imm.training.config import OptimizerSection, TrainingSection


def make_optimizer(params, opt: OptimizerSection) -> torch.optim.Optimizer:
    kwargs = dict(lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
    return (torch.optim.RAdam if opt.name == "radam" else torch.optim.AdamW)(params, **kwargs)


@dataclass
class TrainingState:
    """The network, its EMAs (decay -> copy), the post-hoc EMA tracker (None unless ``training.phema``), the
    optimizer, the GradScaler (fp16 only), the number of optimizer steps taken (skipped ones included) and,
    for bf16 training, the network's bf16 working copy (:mod:`imm.model.precision`; rebuilt from ``net``
    at every step, never saved)."""

    net: IMMNetwork
    emas: dict
    phema: phema.PowerEMA | None
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    step: int = 0
    working: IMMNetwork | None = None

    @classmethod
    def create(cls, net: IMMNetwork, training: TrainingSection) -> TrainingState:
        """EMAs and post-hoc EMA profiles start as copies of ``net``; the optimizer comes with
        :meth:`attach_optimizer`, after :func:`parallelize` (FSDP2 replaces the parameters)."""
        # keyed by float: a decay written 1 or 1.0 is the same EMA, saved under the same name
        emas = {float(d): copy.deepcopy(net).eval().requires_grad_(False) for d in training.ema_decays}
        if not emas:
            raise ConfigError("training.ema_decays must list at least one decay")
        try:
            tracker = phema.PowerEMA(net, training.phema_sigma_rels) if training.phema else None
        except ValueError as e:
            raise ConfigError(f"training.phema_sigma_rels: {e}") from None
        return cls(net, emas, tracker)

    def load_modules(self, saved: dict, source: Path) -> None:
        """The weights, EMAs, post-hoc EMA profiles and step of a saved state (before :func:`parallelize`); a
        network that does not fit them (``--allow-changes`` across a changed architecture) is one error line."""
        check_state_dict(self.net, saved["model"], str(source))
        self.net.load_state_dict(saved["model"])
        for d, e in self.emas.items():
            if str(d) not in saved["ema"]:
                raise TrainingError(f"{source}: has no EMA with decay {d} (it has {', '.join(saved['ema'])})")
            e.load_state_dict(saved["ema"][str(d)])
        if self.phema is not None:
            if "phema" not in saved:
                raise TrainingError(f"{source}: has no post-hoc EMA state (written with training.phema=false); "
                                    "resume with training.phema=false or train in a new run directory")
            try:
                self.phema.load_state_dict(saved["phema"])
            except ValueError as e:
                raise TrainingError(f"{source}: {e}") from None
        self.step = saved["step"]

    def add_working_copy(self, dtype: torch.dtype, memory_format: torch.memory_format) -> None:
        """The network's working copy (before :func:`parallelize`)."""
        self.working = working_copy(self.net, dtype, memory_format)

    @property
    def compute_net(self) -> IMMNetwork:
        """The network the passes run: the working copy when there is one, else the network itself."""
        return self.working if self.working is not None else self.net

    def attach_optimizer(self, opt: OptimizerSection, precision: str, device, saved: dict | None = None) -> None:
        """The optimizer over the (wrapped) network's parameters and, for fp16, the GradScaler; both continue
        from ``saved`` when given (a state without a scaler entry starts the scale afresh)."""
        self.optimizer = make_optimizer(self.net.parameters(), opt)
        if precision == "fp16":
            self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
        if saved is None:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.net, self.optimizer, saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        if self.scaler is not None and "scaler" in saved:
            self.scaler.load_state_dict(saved["scaler"])

    @property
    def ema_networks(self) -> list[torch.nn.Module]:
        """Every averaged copy of the network: the fixed-decay EMAs, then the post-hoc EMA profiles."""
        return [*self.emas.values(), *(self.phema.emas.values() if self.phema is not None else ())]

    def update_emas(self, warmup: bool) -> None:
        """Fold the network's weights after an applied optimizer step into the fixed-decay EMAs, with the decay
        of :attr:`step` before it counts that step (the warm-up of :func:`imm.training.phema.ema_decay`)."""
        for d, e in self.emas.items():
            phema.update_ema(e, self.net, phema.ema_decay(d, self.step, warmup))

    def save(self, run_dir: Path, cfg: dict) -> Path:
        """Write ``training-state-STEP.pt`` atomically (every rank gathers, the main process writes)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = {"format": TRAINING_STATE_FORMAT, "version": 1, "step": self.step, "config": cfg,
                 "network_config": self.net.config, "model": full_state_dict(self.net),
                 "ema": {str(d): full_state_dict(e) for d, e in self.emas.items()},
                 "optimizer": get_optimizer_state_dict(self.net, self.optimizer,
                                                       options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))}
        if self.phema is not None:
            state["phema"] = self.phema.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        path = checkpoint_path(run_dir, self.step)
        if distributed.is_main():
            atomic_write(path, lambda tmp: torch.save(state, tmp))
        distributed.barrier()
        return path


def parallelize(state: TrainingState, parallel: str, device) -> torch.nn.Module:
    """Wrap the state's modules for more than one process and return the module the gradient pass runs.

    ``ddp``: the network in DistributedDataParallel (gradients averaged over processes in the backward pass);
    the EMAs stay whole on every process. ``fsdp``: FSDP2 (``fully_shard``) shards each backbone block, then
    the rest, of the network and of every EMA alike, so that EMA updates pair shards with shards. One process:
    the network itself."""
    if distributed.world_size() == 1:
        return state.compute_net
    if parallel == "ddp":  # a bf16 working copy averages its bf16 gradients
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(state.compute_net, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for module in (state.net, *state.ema_networks):
        for block in getattr(module.model, "blocks", None) or []:
            fully_shard(block)
        fully_shard(module)
    return state.net
