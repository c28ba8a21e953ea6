"""``imm train``: the IMM training loop, from one CPU to many GPUs (torchrun, DDP or FSDP2).

One straight loop (nanoGPT/EDM2 style). Per optimizer step the global batch is split into chunks of
``batch_per_device`` samples: each process takes its contiguous share of the step's global batch
(:func:`imm.data.loader.make_loader`) and runs ``accumulation`` chunks; chunk ``c`` of the whole step is
``rank * accumulation + micro``. Everything random in a chunk (times, noise, label dropout, flips,
VAE latent draws, dropout masks) comes from a generator seeded by ``(seed, step, c)``, so:

* W processes with A accumulation steps train exactly like one process with W*A accumulation steps
  (same chunks, same draws; DDP averages what accumulation would have averaged);
* resuming from a checkpoint gives the same weights, bit for bit, as an uninterrupted run (CPU).

Checkpoints (``RUN/checkpoints/training-state-STEP.pt``, their format in :mod:`imm.io.checkpoint`) hold
the online network, every EMA, the optimizer, the step and the config; they are written atomically and
the last ``keep_last`` good ones are kept (:func:`imm.io.checkpoint.rotate_checkpoints`). Restarting the
same command resumes from the latest readable one (:func:`resume_state`); a run stopped by non-finite
steps writes none (:func:`_diverged`). ``imm.load_network`` reads them (the first EMA), and the final
EMA is also written as ``RUN/network.safetensors``.

The configuration's sections are declared and resolved in :mod:`imm.training.config`; the logs, sample
grids and periodic FID are written by :mod:`imm.training.logs`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import signal
from pathlib import Path

import numpy as np
import torch

from imm.core import distributed, threads
from imm.core.config import ConfigError, flatten
from imm.core.distributed import full_state_dict
from imm.core.errors import StateError
from imm.data.datasets import build_dataset, random_xflip
from imm.data.encoders import build_encoder
from imm.data.loader import make_loader
from imm.io.checkpoint import (
    CheckpointError,
    checkpoint_paths,
    checkpoint_step,
    load_latest_state,
    remove_orphans,
    rotate_checkpoints,
    sampling_settings,
    save_network,
    save_training_state,
    set_aside,
)
from imm.methods.registry import build_loss
from imm.model.backbones import set_activation_checkpointing
from imm.model.network import IMMNetwork
from imm.training import phema
from imm.training.config import network_config, resolve_config
from imm.training.logs import Logger, PeriodicFID, SampleGrids, StepWindow
from imm.training.phema_files import drop_snapshots_after, save_phema_snapshots


class TrainingError(StateError):
    """The run cannot start or cannot go on; the message says why."""


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
# Pieces of the loop


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_optimizer(params, opt: dict) -> torch.optim.Optimizer:
    kwargs = dict(lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"], weight_decay=opt["weight_decay"])
    return (torch.optim.RAdam if opt["name"] == "radam" else torch.optim.AdamW)(params, **kwargs)


def learning_rate(step: int, opt: dict) -> float:
    warmup = opt["warmup_steps"] or 0
    return opt["lr"] * min(1.0, (step + 1) / warmup) if warmup else opt["lr"]


def resume_state(run_dir: Path, start_over: bool = False):
    """:func:`load_latest_state`, with the unreadable checkpoints newer than the one it found renamed
    ``*.corrupt`` (rotation by step number would otherwise keep them and delete readable ones). When
    there are checkpoints but none is readable, refuse, unless ``start_over`` (set them all aside and
    train from step 0)."""
    paths = checkpoint_paths(run_dir)
    path, state = load_latest_state(run_dir)
    unreadable = paths[paths.index(path) + 1:] if path is not None else paths
    if path is None and unreadable and not start_over:
        raise TrainingError(f"no readable checkpoint in {run_dir / 'checkpoints'} "
                            f"({', '.join(p.name for p in unreadable)} cannot be read); rerun with --start-over "
                            "(train(..., start_over=True)) to set them aside as *.corrupt and train from step 0")
    distributed.barrier()  # every rank has read before any file moves
    set_aside(unreadable, ".corrupt")
    return path, state


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


def _diverged(run_dir: Path, step: int, streak: int, lr: float) -> str:
    """Set aside the checkpoints that lead into a streak of non-finite steps (their next step is the
    streak's first whatever the learning rate) and say where a rerun resumes."""
    first = step - streak
    doomed = [p for p in checkpoint_paths(run_dir) if checkpoint_step(p) >= first]
    set_aside(doomed, ".diverged")
    left = checkpoint_paths(run_dir)
    aside = f"; {', '.join(p.name for p in doomed)}, which they start from, is renamed *.diverged" if doomed else ""
    resume = f"{left[-1].name} (step {checkpoint_step(left[-1])})" if left else "step 0 (no earlier checkpoint)"
    return (f"{streak} steps in a row had non-finite gradients (steps {first + 1}-{step}); stopped without "
            f"writing a checkpoint{aside}. A rerun resumes from {resume}: lower the learning rate "
            f"(e.g. optimizer.lr={lr / 10:g}), use fp32/bf16, or check the data.")


# Sections whose change makes a resumed run another experiment: refused unless allowed (--allow-changes).
PROTECTED_SECTIONS = ("network", "loss", "dataset", "encoder")


def check_resumed_config(state_path: Path, old: dict, new: dict, allow_changes: bool) -> None:
    """Say what a resumed run changes against the configuration its checkpoint was trained with; refuse
    changes to the network, loss, data and encoder (one TrainingError line) unless ``allow_changes``. Keys
    the checkpoint's configuration lacks (settings newer than it) are not changes."""
    before, after = flatten(old), flatten(new)
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
    path.write_text(text)


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits at the end of the step."""

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


def train(cfg: dict, run_dir, device=None, progress: bool | None = None, start_over: bool = False,
          allow_changes: bool = False) -> Path:
    """Train (or resume) the run in ``run_dir``; returns the path of the final EMA network.

    ``start_over``: when the run has checkpoints but none is readable, set them aside (``*.corrupt``)
    and train from step 0 instead of refusing (``imm train --start-over``). ``allow_changes``: resume even
    when the network, loss, data or encoder settings differ from the checkpoint's (``--allow-changes``).
    """
    cfg = resolve_config(cfg)
    tcfg, ocfg, log = cfg["training"], cfg["optimizer"], cfg["logging"]
    run_dir = Path(run_dir)
    device = distributed.init(device)
    rank, world = distributed.rank(), distributed.world_size()
    distributed.set_tf32(device, tcfg["precision"] != "fp32")

    # -- data, network, loss: every check before any compute ---------------------------------------
    if "path" in cfg["dataset"] and not cfg["dataset"]["path"]:
        raise ConfigError("dataset.path is not set: pass dataset.path=/path/to/data (a folder, .zip or .npz)")
    dataset = build_dataset(cfg["dataset"])
    encoder = build_encoder(cfg.get("encoder"))
    net_cfg = network_config(cfg, dataset, encoder)
    check_data(dataset, encoder, net_cfg)
    loss_fn = build_loss(cfg["loss"])
    chunk, accumulation = batch_layout(int(tcfg["batch_size"]), tcfg["batch_per_device"], world, loss_fn.group_size)
    try:
        torch.manual_seed(int(tcfg["seed"]))
        net = IMMNetwork(**net_cfg).to(device).train()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad network configuration: {e}") from None
    encoder.init(device)
    if log["fid_every"] and world > 1 and tcfg["parallel"] == "fsdp":
        raise ConfigError("logging.fid_every is not supported with training.parallel=fsdp yet")
    periodic_fid = PeriodicFID(log, int(tcfg["seed"]), device) if log["fid_every"] else None
    toy = cfg["dataset"].get("name") if cfg["dataset"].get("kind") == "toy2d" else None
    sample_grids = SampleGrids(log, int(tcfg["seed"]), cfg["loss"]["method"], toy2d=toy)
    emas = {float(d): copy.deepcopy(net).eval().requires_grad_(False) for d in tcfg["ema_decays"]}
    if not emas:
        raise ConfigError("training.ema_decays must list at least one decay")
    try:
        phema_tracker = phema.PowerEMA(net, tcfg["phema_sigma_rels"]) if tcfg["phema"] else None
    except ValueError as e:
        raise ConfigError(f"training.phema_sigma_rels: {e}") from None
    if tcfg["activation_checkpointing"] and not set_activation_checkpointing(net, True):
        raise ConfigError(f"training.activation_checkpointing needs a DiT or SongUNet network, not {net_cfg.get('model_type')}")

    # -- resume ---------------------------------------------------------------------------------------
    start_step = 0
    remove_orphans(run_dir)
    state_path, state = resume_state(run_dir, start_over)
    if state is not None:
        check_resumed_config(state_path, state.get("config") or {}, cfg, allow_changes)
        net.load_state_dict(state["model"])
        for d, e in emas.items():
            if str(d) not in state["ema"]:
                raise TrainingError(f"{state_path}: has no EMA with decay {d} (it has {', '.join(state['ema'])})")
            e.load_state_dict(state["ema"][str(d)])
        if phema_tracker is not None:
            if "phema" not in state:
                raise TrainingError(f"{state_path}: has no post-hoc EMA state (written with training.phema=false); "
                                    "resume with training.phema=false or train in a new run directory")
            try:
                phema_tracker.load_state_dict(state["phema"])
            except ValueError as e:
                raise TrainingError(f"{state_path}: {e}") from None
        start_step = int(state["step"])
    elif tcfg["init_from"]:
        warm_start(tcfg["init_from"], net, emas.values())
    drop_snapshots_after(run_dir, start_step)

    # -- parallelism --------------------------------------------------------------------------------
    model = net
    if world > 1 and tcfg["parallel"] == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = getattr(net.model, "blocks", None)
        for block in blocks if blocks is not None else []:
            fully_shard(block)
        fully_shard(net)
        for e in [*emas.values(), *(phema_tracker.emas.values() if phema_tracker else ())]:
            for block in getattr(e.model, "blocks", None) or []:
                fully_shard(block)
            fully_shard(e)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(net.parameters(), ocfg)
    if state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(net, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        del state
    forward = torch.compile(model) if tcfg["compile"] else model
    target = torch.compile(net) if tcfg["compile"] else net  # the no-grad pass, outside DDP's wrapper
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10) if tcfg["precision"] == "fp16" else None

    total = int(tcfg["total_steps"])
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        keep_earlier_config(run_dir, _to_yaml(cfg), start_step)
        n_params = sum(p.numel() for p in net.parameters())
        what = f"resuming at step {start_step}" if start_step else "starting"
        on = f"cpu ({threads.describe()})" if device.type == "cpu" else device.type
        print(f"imm train: {what}; {n_params / 1e6:.2f}M parameters, {world} process(es) on {on}, "
              f"global batch {tcfg['batch_size']} = {world} x {accumulation} x {chunk}, run dir {run_dir}")
    if start_step >= total:
        return _finish(run_dir, emas, encoder, cfg, sample_grids, total, Logger(run_dir, log, start_step, cfg), device)
    max_unreadable = int(tcfg["max_unreadable_fraction"] * len(dataset))
    loader = make_loader(dataset, chunk * accumulation, int(tcfg["batch_size"]), rank, world,
                         seed=int(tcfg["seed"]), start_step=start_step, num_workers=int(tcfg["num_workers"]),
                         max_unreadable=max_unreadable)
    logger = Logger(run_dir, log, start_step, cfg)
    show = log["progress"] if progress is None else progress
    bar = None
    if show and distributed.is_main():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True)

    params = [p for p in net.parameters() if p.requires_grad]
    nonfinite_in_a_row = 0
    good, pending = [], state_path  # checkpoints whose next step was finite; the newest, until its next step
    n_unreadable = 0  # samples the loader skipped so far
    window = StepWindow(device)
    step = start_step
    with _StopFlag() as stop:
        while step < total:
            threads.tick()
            raw, labels = next(loader)
            n_unreadable = _check_unreadable(loader.unreadable, n_unreadable, max_unreadable, len(dataset),
                                             tcfg["max_unreadable_fraction"], device)
            loss_fn.set_progress(step, total)  # iCT's N(k) curriculum, IMM's gap annealing
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, ocfg)
            for micro in range(accumulation):
                c = rank * accumulation + micro
                seed = chunk_seed(int(tcfg["seed"]), step, c)
                torch.manual_seed(seed)  # dropout masks of this chunk
                gen = torch.Generator(device).manual_seed(seed)
                x = raw[micro * chunk:(micro + 1) * chunk].to(device, non_blocking=True)
                y = labels[micro * chunk:(micro + 1) * chunk].to(device)
                x = encoder.encode_latents(x, generator=gen)
                if tcfg["xflip"]:
                    x = random_xflip(x, gen)
                y = y if net.label_dim else None
                sync = micro == accumulation - 1
                ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
                ctx = model.no_sync() if (ddp and not sync) else contextlib.nullcontext()
                with ctx:
                    loss, stats = loss_fn(forward, x, y, target_net=target, generator=gen)
                    scaled = loss / accumulation
                    (scaler.scale(scaled) if scaler else scaled).backward()
                window.add(loss.detach(), stats)
            if scaler:
                scaler.unscale_(optimizer)
            max_norm = float(ocfg["grad_clip"]) if ocfg["grad_clip"] else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if isinstance(grad_norm, torch.Tensor) and hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            finite = bool(torch.isfinite(grad_norm))
            if finite:
                (scaler.step(optimizer) if scaler else optimizer.step())
                for d, e in emas.items():
                    phema.update_ema(e, net, phema.ema_decay(d, step, tcfg["ema_warmup"]))
                nonfinite_in_a_row = 0
                if pending is not None:
                    good.append(pending)
                    pending = None
                    rotate_checkpoints(run_dir, good, int(log["keep_last"]))
            else:
                nonfinite_in_a_row += 1
                logger.scalars(step + 1, {"train/nonfinite_step": 1.0})
            if phema_tracker is not None:  # skipped steps too: the profile is over steps, the weights stayed put
                phema_tracker.update(net, step + 1)
            if scaler:
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            window.grad_norm(grad_norm)
            step += 1
            if bar is not None:
                bar.update(1)
            if nonfinite_in_a_row >= int(tcfg["max_nonfinite_steps"]):  # diverged: no checkpoint of it
                raise TrainingError(_diverged(run_dir, step, nonfinite_in_a_row, float(ocfg["lr"])))
            if step % int(log["log_every"]) == 0 or step == total:
                values = window.flush(tcfg["batch_size"], optimizer.param_groups[0]["lr"])
                if loader.unreadable:
                    values["data/unreadable_samples"] = len(loader.unreadable)
                logger.scalars(step, values)
                if bar is not None:
                    bar.set_postfix(loss=f"{values['train/loss']:.4g}", img_s=f"{values['train/images_per_s']:.0f}")
            if phema_tracker is not None and step % int(tcfg["phema_snapshot_every"]) == 0:  # before the checkpoint
                save_phema_snapshots(run_dir, step, phema_tracker)  # of this step, which keeps them on resume
            if step % int(log["checkpoint_every"]) == 0 and step < total and not nonfinite_in_a_row:
                pending = save_training_state(run_dir, step, cfg, net, emas, optimizer, phema_tracker)
            if step % int(log["sample_every"]) == 0 and step < total:
                sample_grids(next(iter(emas.values())), encoder, run_dir, step, logger, device)
            if periodic_fid is not None and step % int(log["fid_every"]) == 0:
                periodic_fid(next(iter(emas.values())), encoder, step, logger)
            if _agree(stop.raised, device):
                if not nonfinite_in_a_row:  # the state the non-finite steps started from is no checkpoint
                    save_training_state(run_dir, step, cfg, net, emas, optimizer, phema_tracker)
                if bar is not None:
                    bar.close()
                logger.close()
                loader.close()
                raise KeyboardInterrupt(f"stopped by signal at step {step}; " + (
                    "checkpoint written, rerun to resume" if not nonfinite_in_a_row else
                    "no checkpoint written (inside a run of non-finite steps), rerun to resume from the last one"))
    if bar is not None:
        bar.close()
    loader.close()
    good.append(save_training_state(run_dir, step, cfg, net, emas, optimizer, phema_tracker))
    rotate_checkpoints(run_dir, good, int(log["keep_last"]))
    return _finish(run_dir, emas, encoder, cfg, sample_grids, step, logger, device)


def _finish(run_dir: Path, emas: dict, encoder, cfg: dict, sample_grids: SampleGrids, step: int, logger, device) -> Path:
    ema = next(iter(emas.values()))
    full = IMMNetwork(**ema.config)
    full.load_state_dict(full_state_dict(ema))
    path = run_dir / "network.safetensors"
    if distributed.is_main():
        save_network(full, path, sampling_settings(cfg))  # imm generate's defaults
        sample_grids(full.to(device), encoder, run_dir, step, logger, device)
    logger.close()
    distributed.barrier()
    return path


def _check_unreadable(unreadable: dict, reported: int, limit: int, size: int, fraction: float, device) -> int:
    """Print the first few unreadable samples the loader skipped (``unreadable``: index -> message);
    refuse, on every rank, once more than ``limit`` are. Returns how many there are now."""
    for message in itertools.islice(unreadable.values(), reported, 5):
        print(f"imm train: skipping an unreadable sample, the next readable one is used instead ({message})")
    if _agree(len(unreadable) > limit, device):
        first = next(iter(unreadable.values()), "seen by another process")
        raise TrainingError(f"{len(unreadable)} of the {size} samples are unreadable, more than "
                            f"training.max_unreadable_fraction={fraction} allows (fix or remove the files, or "
                            f"raise it); first: {first}")
    return len(unreadable)


def _agree(flag: bool, device) -> bool:
    """True on every rank when any rank saw the flag."""
    if distributed.world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _to_yaml(cfg: dict) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)


__all__ = ["train", "TrainingError", "CheckpointError"]
