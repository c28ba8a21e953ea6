"""``imm train``: the IMM training loop, from one CPU to many GPUs (torchrun, DDP or FSDP2).

One straight loop in the shape of EDM2's and nanoGPT's: set-up returns one :class:`TrainingState`
(:mod:`imm.training.state`: network, EMAs, post-hoc EMA, optimizer, GradScaler, step), each step is one call of
:class:`imm.training.step.TrainStep` (accumulation, mixed precision, clipping, the non-finite skip, EMA
updates), and everything periodic is a :class:`Tick` run after the steps it is due at, in this order: the log
line, the post-hoc EMA snapshot (before the checkpoint of the same step, which keeps it on resume), the
checkpoint, the sample grids, the periodic FID.

W processes with A accumulation steps train exactly like one process with W*A accumulation steps, and a
resumed run, on any number of processes, gives the weights of an uninterrupted one (bit for bit on one CPU
process; :mod:`imm.training.step` says why). Checkpoints (``RUN/checkpoints/training-state-STEP.pt``) and
which of them a restart resumes from, rotation keeps or a non-finite stop sets aside:
:mod:`imm.training.checkpoints`. ``imm.load_network`` reads them (the first EMA), and the final EMA is also
written as ``RUN/network.safetensors``.

Host syncs and collectives: one host read per step (whether the gradient norm is finite:
:class:`~imm.training.step.TrainStep`), one per log line (:class:`imm.training.logs.StepWindow`), and besides
the gradient reductions of DDP/FSDP2 one all-reduce every :data:`POLL_EVERY` steps with more than one process
(every step with one, where it is free), agreeing on a stop signal and on too many unreadable samples.
Checkpoints, snapshots, sample grids and FID gather and synchronise at their own ticks.

SIGTERM or SIGINT stops the run at the next poll: it writes a checkpoint (none inside a streak of non-finite
steps, whose start is no state to resume from), closes the logs and the loader, and :func:`train` raises
:class:`TrainingStopped`; ``imm train`` then exits with :data:`EXIT_STOPPED`.

The configuration's sections are declared and resolved in :mod:`imm.training.config`; the logs, sample
grids and periodic FID are written by :mod:`imm.training.logs`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from imm.core import distributed, threads
from imm.core.config import ConfigError, flatten
from imm.core.distributed import full_state_dict
from imm.core.files import write_text
from imm.core.release import canonical
from imm.data.datasets import build_dataset
from imm.data.encoders import build_encoder
from imm.data.loader import make_loader
from imm.io.checkpoint import sampling_settings, save_network
from imm.methods.registry import build_loss
from imm.model.backbones import set_activation_checkpointing
from imm.model.network import IMMNetwork
from imm.training.checkpoints import Rotation, TrainingError, resume_state, set_aside_diverged, tidy_run_folder
from imm.training.config import (
    OptimizerSection,
    TrainingSection,
    fast_path,
    network_config,
    resolve_config,
    sections,
    uses_autocast,
    with_fast_path,
)
from imm.training.logs import Logger, PeriodicFID, SampleGrids, StepWindow
from imm.training.phema_files import drop_snapshots_after, save_phema_snapshots
from imm.training.state import TrainingState, parallelize
from imm.training.step import TrainStep

# ``imm train``'s exit status after a stop by SIGTERM/SIGINT (sysexits.h's EX_TEMPFAIL: rerun to resume),
# distinct from success (0) and from errors (2).
EXIT_STOPPED = 75
# Steps between two agreements of more than one process on a stop signal (and unreadable samples).
POLL_EVERY = 10


class TrainingStopped(Exception):
    """A signal stopped the run at ``step``; ``checkpoint``: the state written then, None inside a streak of
    non-finite steps (a rerun resumes from the last checkpoint before it)."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"stopped by signal at step {step}; " + (
            "checkpoint written, rerun to resume" if checkpoint is not None else
            "no checkpoint written (inside a run of non-finite steps), rerun to resume from the last one"))


# ---------------------------------------------------------------------------------------------
# Checks before any compute


def batch_layout(global_batch: int, batch_per_device: int | None, world: int, group_size: int) -> tuple[int, int]:
    """(per-device chunk size, accumulation steps) for a global batch; groups never straddle chunks."""
    if global_batch % (world * group_size):
        raise ConfigError(f"training.batch_size={global_batch} must be divisible by processes x group size "
                          f"({world} x {group_size})")
    per_rank = global_batch // world
    chunk = batch_per_device or per_rank
    if chunk % group_size or per_rank % chunk:
        raise ConfigError(f"training.batch_per_device={chunk} must be a multiple of loss.group_size={group_size} "
                          f"and divide the per-process batch {per_rank}")
    return chunk, per_rank // chunk


def check_data(dataset, encoder, net_cfg: dict) -> None:
    """Fail before any compute when data and network disagree."""
    if len(dataset) == 0:
        raise ConfigError("the dataset is empty")
    if dataset.num_channels != encoder.raw_channels:
        raise ConfigError(f"the dataset has {dataset.num_channels} channels but the encoder "
                          f"({type(encoder).__name__}) expects {encoder.raw_channels}")
    if net_cfg["img_channels"] != encoder.channels:
        raise ConfigError(f"network.img_channels={net_cfg['img_channels']} but the encoder gives {encoder.channels} channels")
    if net_cfg["img_resolution"] != dataset.resolution:
        raise ConfigError(f"the dataset's resolution is {dataset.resolution} but the network's is "
                          f"{net_cfg['img_resolution']}")
    if net_cfg.get("label_dim", 0) and dataset.label_dim == 0:
        raise ConfigError(f"network.label_dim={net_cfg['label_dim']} but the dataset has no labels")
    if dataset.label_dim > net_cfg.get("label_dim", 0) > 0:
        raise ConfigError(f"the dataset has {dataset.label_dim} classes but network.label_dim={net_cfg['label_dim']}")


# ---------------------------------------------------------------------------------------------
# Set-up


def warm_start(path, net: IMMNetwork, emas) -> None:
    """``training.init_from``: a fresh run starts from the weights of a trained network of the same
    architecture (any file ``imm.load_network`` reads; of a trainer checkpoint, its first EMA), copied
    into the online network and every EMA. A flow-matching baseline's network is a warm start for IMM:
    with ``f_type='euler_fm'`` it already is the Euler sampler of f_{s,t} (App. C.5)."""
    from imm.io.checkpoint import check_state_dict, read_checkpoint

    _, tensors = read_checkpoint(path)
    check_state_dict(net, tensors, source=f"training.init_from={path}")
    for module in (net, *emas):
        module.load_state_dict(tensors, strict=True)


# Sections whose change makes a resumed run another experiment: refused unless allowed (--allow-changes).
PROTECTED_SECTIONS = ("network", "loss", "dataset", "encoder")


def check_resumed_config(state_path: Path, old: dict, new: dict, allow_changes: bool) -> None:
    """Say what a resumed run changes against the configuration its checkpoint was trained with; refuse
    changes to the network, loss, data and encoder (one TrainingError line) unless ``allow_changes``. Keys
    the checkpoint's configuration lacks (settings newer than it) are not changes; the checkpoint's keys are
    read in the canonical form (a run trained with ``loss.method`` resumes with ``loss.kind`` unchanged)."""
    before, after = flatten(canonical(old)), flatten(new)
    changed = [k for k in before if after.get(k, "(unset)") != before[k]]
    if not changed:
        return
    protected = [k for k in changed if k.split(".")[0] in PROTECTED_SECTIONS]
    if protected and not allow_changes:
        raise TrainingError(f"{state_path}: resuming would change {', '.join(protected)} (trained with other "
                            "values): train in a new --run-dir, or pass --allow-changes to resume anyway")
    if distributed.is_main():
        print("imm train: resuming with changed settings: "
              + ", ".join(f"{k} {before[k]!r} -> {after.get(k, '(unset)')!r}" for k in changed))


def keep_earlier_config(run_dir: Path, text: str, start_step: int) -> None:
    """Write ``RUN/config.yaml``; a different one already there is kept as ``config-until-STEP.yaml``."""
    path = run_dir / "config.yaml"
    if path.is_file() and path.read_text() != text:
        os.replace(path, run_dir / f"config-until-{start_step:08d}.yaml")
    write_text(path, text)


def set_up_state(cfg: dict, training: TrainingSection, opt: OptimizerSection, net_cfg: dict, run_dir: Path,
                 device, start_over: bool, allow_changes: bool) -> tuple[TrainingState, torch.nn.Module, Path | None]:
    """The run's :class:`TrainingState`, fresh, warm-started (``training.init_from``) or resumed from the newest
    readable checkpoint, wrapped for the processes at hand; also the module the gradient pass runs and the
    checkpoint resumed from."""
    try:
        torch.manual_seed(training.seed)
        net = IMMNetwork(**net_cfg).to(device).train()
        net = net.to(memory_format=training.layout)  # the EMAs, copies of it, too
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad network configuration: {e}") from None
    state = TrainingState.create(net, training)
    if training.activation_checkpointing and not set_activation_checkpointing(net, True):
        raise ConfigError(f"training.activation_checkpointing needs a DiT or SongUNet network, not {net_cfg.get('model_type')}")
    tidy_run_folder(run_dir)
    source, saved = resume_state(run_dir, start_over)
    if saved is not None:
        check_resumed_config(source, saved.get("config") or {}, cfg, allow_changes)
        state.load_modules(saved, source)
    elif training.init_from:
        warm_start(training.init_from, net, state.emas.values())
    drop_snapshots_after(run_dir, state.step)
    if training.precision == "bf16" and not uses_autocast(training.precision, training.parallel):
        state.add_working_copy(torch.bfloat16, training.layout)
    model = parallelize(state, training.parallel, device)
    state.attach_optimizer(opt, training.precision, device, saved)
    return state, model, source


class StopSignal:
    """SIGTERM/SIGINT set :attr:`raised`; the loop stops at its next poll."""

    def __init__(self):
        self.raised = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class Tick:
    """``action(step)`` after every ``every``-th step. At the run's last step: also when ``at_end`` is True,
    never when it is False (the end of the run does it), as the multiple says when it is None."""

    every: int
    action: Callable[[int], None]
    at_end: bool | None = None

    def due(self, step: int, total: int) -> bool:
        if step == total and self.at_end is not None:
            return self.at_end
        return step % self.every == 0


def agree(flags: list[bool], device) -> list[bool]:
    """Each flag True on every process when any process saw it (one all-reduce for all of them)."""
    if distributed.world_size() == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def train(cfg: dict, run_dir, device=None, progress: bool | None = None, start_over: bool = False,
          allow_changes: bool = False) -> Path:
    """Train (or resume) the run in ``run_dir``; returns the path of the final EMA network. Raises
    :class:`TrainingStopped` when SIGTERM/SIGINT stopped it (after writing a checkpoint).

    ``start_over``: when the run has checkpoints but none is readable, set them aside (``*.corrupt``)
    and train from step 0 instead of refusing (``imm train --start-over``). ``allow_changes``: resume even
    when the network, loss, data or encoder settings differ from the checkpoint's (``--allow-changes``).
    """
    cfg = resolve_config(cfg)
    opt, training, log = sections(cfg)
    run_dir = Path(run_dir)
    device = distributed.init(device)
    world = distributed.world_size()

    # -- data, network, loss: every check before any compute ---------------------------------------
    if "path" in cfg["dataset"] and not cfg["dataset"]["path"]:
        raise ConfigError("dataset.path is not set: pass dataset.path=/path/to/data (a folder, .zip or .npz)")
    dataset = build_dataset(cfg["dataset"])
    encoder = build_encoder(cfg.get("encoder"))
    net_cfg = network_config(cfg, dataset, encoder)
    check_data(dataset, encoder, net_cfg)
    loss_fn = build_loss(cfg["loss"])
    chunk, accumulation = batch_layout(training.batch_size, training.batch_per_device, world, loss_fn.group_size)
    if log.fid_every and world > 1 and training.parallel == "fsdp":
        raise ConfigError("logging.fid_every is not supported with training.parallel=fsdp")

    # -- precision and layout (auto: the main process's probe, for every process), then the compute ----
    method = cfg["loss"]["kind"]
    fast = distributed.from_main(fast_path(training, net_cfg, device, method) if distributed.is_main() else None)
    training, net_cfg = with_fast_path(training, net_cfg, fast)
    distributed.set_tf32(device, training.precision != "fp32")
    if distributed.is_main():
        print(f"imm train: computing in {fast.describe()}")
    encoder.init(device)
    periodic_fid = (PeriodicFID(cfg["logging"], training.seed, cfg["loss"]["kind"], device, fast)
                    if log.fid_every else None)
    toy = cfg["dataset"].get("name") if cfg["dataset"].get("kind") == "toy2d" else None
    sample_grids = SampleGrids(cfg["logging"], training.seed, cfg["loss"]["kind"], toy2d=toy, fast=fast)

    state, model, resumed_from = set_up_state(cfg, training, opt, net_cfg, run_dir, device, start_over,
                                              allow_changes)
    total, start_step = training.total_steps, state.step
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        keep_earlier_config(run_dir, _to_yaml(cfg), start_step)
        n_params = sum(p.numel() for p in state.net.parameters())
        what = f"resuming at step {start_step}" if start_step else "starting"
        on = f"cpu ({threads.describe()})" if device.type == "cpu" else device.type
        print(f"imm train: {what}; {n_params / 1e6:.2f}M parameters, {world} process(es) on {on}, "
              f"global batch {training.batch_size} = {world} x {accumulation} x {chunk}, run dir {run_dir}")
    with contextlib.ExitStack() as cleanup:
        logger = Logger(run_dir, log, start_step, cfg)
        cleanup.callback(logger.close)
        if start_step >= total:
            return _finish(run_dir, state, encoder, cfg, sample_grids, logger, device, total)
        max_unreadable = int(training.max_unreadable_fraction * len(dataset))
        loader = make_loader(dataset, chunk * accumulation, training.batch_size, distributed.rank(), world,
                             seed=training.seed, start_step=start_step, num_workers=training.num_workers,
                             max_unreadable=max_unreadable)
        cleanup.callback(loader.close)
        bar = None
        if (log.progress if progress is None else progress) and distributed.is_main():
            from tqdm import tqdm

            bar = cleanup.enter_context(tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True))
        window = StepWindow(device)
        train_step = TrainStep(state, model, loss_fn, encoder, training, opt, chunk, accumulation, device, window)
        rotation = Rotation(run_dir, log.keep_last, resumed_from)
        streak = 0  # non-finite steps in a row
        reported = 0  # unreadable samples printed so far

        def log_line(step: int) -> None:
            values = window.flush(training.batch_size, state.optimizer.param_groups[0]["lr"])
            if loader.unreadable:
                values["data/unreadable_samples"] = len(loader.unreadable)
            logger.scalars(step, values)
            if bar is not None:
                bar.set_postfix(loss=f"{values['train/loss']:.4g}", img_s=f"{values['train/images_per_s']:.0f}")

        def checkpoint(step: int) -> None:
            if not streak:  # the state a streak of non-finite steps started from is no checkpoint
                rotation.written(state.save(run_dir, cfg))

        first_ema = next(iter(state.emas.values()))
        ticks = [Tick(log.log_every, log_line, at_end=True)]
        if state.phema is not None:
            ticks.append(Tick(training.phema_snapshot_every, lambda s: save_phema_snapshots(run_dir, s, state.phema)))
        ticks += [Tick(log.checkpoint_every, checkpoint, at_end=False),
                  Tick(log.sample_every, lambda s: sample_grids(first_ema, encoder, run_dir, s, logger, device),
                       at_end=False)]
        if periodic_fid is not None:
            ticks.append(Tick(log.fid_every, lambda s: periodic_fid(first_ema, encoder, s, logger)))

        poll_every = 1 if world == 1 else POLL_EVERY
        with StopSignal() as stop:
            while state.step < total:
                threads.tick()
                raw, labels = next(loader)
                reported = _report_unreadable(loader.unreadable, reported)
                if state.step % poll_every == 0 and _poll(stop, loader.unreadable, max_unreadable, len(dataset),
                                                          training.max_unreadable_fraction, device):
                    raise TrainingStopped(state.step, None if streak else state.save(run_dir, cfg))
                if train_step(raw, labels):
                    streak = 0
                    rotation.finite_step()
                else:
                    streak += 1
                    logger.scalars(state.step, {"train/nonfinite_step": 1.0})
                if bar is not None:
                    bar.update(1)
                if streak >= training.max_nonfinite_steps:  # diverged: no checkpoint of it
                    raise TrainingError(set_aside_diverged(run_dir, state.step, streak, opt.lr))
                for tick in ticks:
                    if tick.due(state.step, total):
                        tick.action(state.step)
        loader.close()
        rotation.final(state.save(run_dir, cfg))
        return _finish(run_dir, state, encoder, cfg, sample_grids, logger, device, state.step)


def _finish(run_dir: Path, state: TrainingState, encoder, cfg: dict, sample_grids: SampleGrids, logger, device,
            step: int) -> Path:
    """The first EMA as ``RUN/network.safetensors`` (with the settings ``imm generate`` reads) and its
    sample grids, named after ``step`` (``training.total_steps`` for a run resumed past its end)."""
    ema = next(iter(state.emas.values()))
    full = IMMNetwork(**ema.config)
    full.load_state_dict(full_state_dict(ema))
    path = run_dir / "network.safetensors"
    if distributed.is_main():
        save_network(full, path, sampling_settings(cfg))  # imm generate's defaults
        sample_grids(full.to(device), encoder, run_dir, step, logger, device)
    distributed.barrier()
    return path


def _poll(stop: StopSignal, unreadable: dict, limit: int, size: int, fraction: float, device) -> bool:
    """Whether any process was signalled to stop; refuse, on every process, once more than ``limit`` samples
    of ``size`` are unreadable on any (``unreadable``: this process's, index -> message). One collective."""
    stopped, too_many = agree([stop.raised, len(unreadable) > limit], device)
    if too_many:
        first = next(iter(unreadable.values()), "seen by another process")
        raise TrainingError(f"{len(unreadable)} of the {size} samples are unreadable, more than "
                            f"training.max_unreadable_fraction={fraction} allows (fix or remove the files, or "
                            f"raise it); first: {first}")
    return stopped


def _report_unreadable(unreadable: dict, reported: int) -> int:
    """Print the first few unreadable samples the loader skipped (``unreadable``: index -> message) that are not
    ``reported`` yet; returns how many there are now."""
    for message in itertools.islice(unreadable.values(), reported, 5):
        print(f"imm train: skipping an unreadable sample, the next readable one is used instead ({message})")
    return len(unreadable)


def _to_yaml(cfg: dict) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)


__all__ = ["train", "TrainingError", "TrainingStopped", "EXIT_STOPPED"]
