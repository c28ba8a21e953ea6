"""``imm train``: the IMM training loop, from one CPU to many GPUs (torchrun, DDP or FSDP2).

One straight loop (nanoGPT/EDM2 style). Per optimizer step the global batch is split into chunks of
``batch_per_device`` samples: each process takes its contiguous share of the step's global batch
(:func:`imm.data.make_loader`) and runs ``accumulation`` chunks; chunk ``c`` of the whole step is
``rank * accumulation + micro``. Everything random in a chunk (times, noise, label dropout, flips,
VAE latent draws, dropout masks) comes from a generator seeded by ``(seed, step, c)``, so:

* W processes with A accumulation steps train exactly like one process with W*A accumulation steps
  (same chunks, same draws; DDP averages what accumulation would have averaged);
* resuming from a checkpoint gives the same weights, bit for bit, as an uninterrupted run (CPU).

Checkpoints (``RUN/checkpoints/training-state-STEP.pt``) hold the online network, every EMA, the
optimizer, the step and the config; they are written atomically and the last ``keep_last`` good ones
are kept (:func:`rotate_checkpoints`). Restarting the same command resumes from the latest readable
one (:func:`resume_state`); a run stopped by non-finite steps writes none (:func:`_diverged`).
``imm.load_network`` reads them (the first EMA), and the final EMA is also written as
``RUN/network.safetensors``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import math
import os
import re
import signal
from pathlib import Path

import numpy as np
import torch

from . import distributed, methods, phema, threads
from .checkpoint import CheckpointError, atomic_write, sampling_settings, save_network, save_weights
from .config import ConfigError, did_you_mean
from .data import build_dataset, make_loader, random_xflip
from .encoders import build_encoder
from .errors import StateError
from .methods import build_loss
from .networks import set_activation_checkpointing
from .precond import IMMNetwork
from .train_log import Logger, PeriodicFID, StepWindow, sample_grids

SECTIONS = ("resolution", "channels", "label_dim", "dataset", "encoder", "network", "loss", "optimizer",
            "training", "logging", "sampling", "eval")
OPTIMIZER_DEFAULTS = dict(name="radam", lr=1e-4, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0,
                          warmup_steps=0, grad_clip=None)
# phema_snapshot_every=10_000: 40 snapshots per profile over the cifar10 preset's 400k steps, which fit every
# width between the tracked 0.05 and 0.10 to < 0.1 % (L2 error of the profile, phema.reconstruction_weights),
# 0.03 and 0.2 to < 1 %; one snapshot is one EMA network (DDPM++ 224 MB, DiT-XL/2 2.7 GB).
TRAINING_DEFAULTS = dict(total_steps=400_000, batch_size=4096, batch_per_device=None, seed=0,
                         ema_decays=[0.9999], ema_warmup=False, precision="tf32", compile=False, xflip=False,
                         num_workers=2, parallel="ddp", max_nonfinite_steps=20, init_from=None,
                         max_unreadable_fraction=0.01, activation_checkpointing=False,
                         phema=False, phema_sigma_rels=[0.05, 0.10], phema_snapshot_every=10_000)
LOGGING_DEFAULTS = dict(log_every=100, checkpoint_every=10_000, keep_last=3, sample_every=10_000,
                        sample_steps=[1, 2, 4], sample_count=64, tensorboard=True, wandb=False, progress=True,
                        fid_every=0, fid_ref=None, fid_num_images=1000, fid_steps=[1, 2, 4], fid_metrics=["fid"],
                        fid_dinov2="facebook/dinov2-large")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
# What each numeric key must be (a "?" allows null); the list keys apply it to every element.
NUMBER_KINDS = {
    "count": (lambda v: v >= 1 and float(v).is_integer(), "a positive integer"),
    "index": (lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
    "positive": (lambda v: v > 0, "a number > 0"),
    "nonneg": (lambda v: v >= 0, "a number >= 0"),
    "fraction": (lambda v: 0 <= v <= 1, "a number between 0 and 1"),
    "beta": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "sigma_rel": (lambda v: 0 < v <= phema.SIGMA_REL_MAX, f"a number in (0, {phema.SIGMA_REL_MAX:.4f}]"),
}
NUMBER_KEYS = {
    "training.total_steps": "count", "training.batch_size": "count", "training.batch_per_device": "count?",
    "training.seed": "index", "training.num_workers": "index", "training.max_nonfinite_steps": "count",
    "training.max_unreadable_fraction": "fraction", "training.ema_decays": "[fraction]",
    "training.phema_sigma_rels": "[sigma_rel]", "training.phema_snapshot_every": "count",
    "optimizer.lr": "positive", "optimizer.eps": "nonneg", "optimizer.weight_decay": "nonneg",
    "optimizer.warmup_steps": "index", "optimizer.grad_clip": "nonneg?", "optimizer.betas": "[beta]",
    "logging.log_every": "count", "logging.checkpoint_every": "count", "logging.keep_last": "index",
    "logging.sample_every": "count", "logging.sample_count": "count", "logging.sample_steps": "[count]",
    "logging.fid_every": "index", "logging.fid_num_images": "count", "logging.fid_steps": "[count]",
}


class TrainingError(StateError):
    """The run cannot start or cannot go on; the message says why."""


# ---------------------------------------------------------------------------------------------
# Configuration


def _check_keys(section: str, given: dict, allowed) -> None:
    unknown = [k for k in given if k not in allowed]
    if unknown:
        hint = did_you_mean(unknown[0], allowed, prefix=f"{section}.")
        raise ConfigError(f"unknown config key '{section}.{unknown[0]}'{hint}")


def _init_defaults(cls) -> dict:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_numbers(cfg: dict) -> None:
    """Each key of NUMBER_KEYS holds what it must, else a one-line ConfigError; integral floats become ints."""
    for key, kind in NUMBER_KEYS.items():
        section, name = key.split(".")
        value = cfg[section][name]
        if kind.endswith("?") and value is None:
            continue
        base = kind.strip("[]?")
        test, what = NUMBER_KINDS[base]
        integral = base in ("count", "index")
        if kind.startswith("["):
            length = 2 if name == "betas" else None
            if not (isinstance(value, (list, tuple)) and len(value) == (length or len(value))
                    and all(_is_number(v) and test(v) for v in value)):
                raise ConfigError(f"{key} must be a list of {f'{length} ' if length else ''}numbers, each {what}; "
                                  f"got {value!r}")
            cfg[section][name] = [int(v) if integral else v for v in value]
        elif not (_is_number(value) and test(value)):
            raise ConfigError(f"{key} must be {what}, got {value!r}")
        elif integral:
            cfg[section][name] = int(value)


def resolve_config(cfg: dict) -> dict:
    """Fill defaults into the training sections and reject unknown keys (naming the nearest valid one)."""
    cfg = copy.deepcopy(cfg)
    _check_keys("config", {k: 1 for k in cfg}, SECTIONS)
    for name, defaults in (("optimizer", OPTIMIZER_DEFAULTS), ("training", TRAINING_DEFAULTS),
                           ("logging", LOGGING_DEFAULTS)):
        given = cfg.get(name) or {}
        _check_keys(name, given, defaults)
        cfg[name] = {**copy.deepcopy(defaults), **given}
    given = dict(cfg.get("loss") or {})
    method = given.pop("method", "imm")
    if method not in methods.METHODS:
        raise ConfigError(f"loss.method must be one of {', '.join(methods.METHODS)}, got {method!r}")
    loss_defaults = _init_defaults(methods.METHODS[method].loss)
    if method != "imm":  # a preset's IMM keys (group_size, k, a, b...) do not apply to a baseline
        imm_only = set(_init_defaults(methods.METHODS["imm"].loss)) - set(loss_defaults)
        given = {k: v for k, v in given.items() if k not in imm_only}
    _check_keys("loss", given, loss_defaults)
    cfg["loss"] = {"method": method, **loss_defaults, **given}
    if not cfg.get("dataset"):
        raise ConfigError("the config has no dataset: section (e.g. dataset.path=/data/cifar10.zip)")
    _check_numbers(cfg)
    if cfg["training"]["precision"] not in PRECISIONS:
        raise ConfigError(f"training.precision must be one of {', '.join(PRECISIONS)}")
    if cfg["optimizer"]["name"] not in ("radam", "adamw"):
        raise ConfigError("optimizer.name must be radam or adamw")
    if cfg["training"]["parallel"] not in ("ddp", "fsdp"):
        raise ConfigError("training.parallel must be ddp or fsdp")
    if cfg["logging"]["fid_every"] and method != "imm":
        raise ConfigError("logging.fid_every supports loss.method=imm only (benchmarks/quality.py evaluates baselines)")
    if cfg["logging"]["fid_every"] and not cfg["logging"]["fid_ref"]:
        raise ConfigError("logging.fid_every needs logging.fid_ref=REF.npz (imm eval ref makes one)")
    return cfg


def load_train_config(name_or_path: str, overrides=()) -> dict:
    """A preset or YAML file with the trainer's defaults filled in, then dotted overrides applied.

    A ``loss.method`` override is applied first, so that the loss defaults filled in are that method's.
    """
    from .config import apply_overrides, load_config

    overrides = list(overrides)
    method = [o.lstrip("+") for o in overrides if o.lstrip("+").split("=", 1)[0] == "loss.method"]
    cfg = apply_overrides(load_config(name_or_path), ["+" + o for o in method])
    return resolve_config(apply_overrides(resolve_config(cfg), overrides))


def network_config(cfg: dict, dataset, encoder) -> dict:
    """IMMNetwork arguments: the config's network section with the data's shape filled in."""
    net = {k: v for k, v in (cfg.get("network") or {}).items() if k != "class_name"}
    net.setdefault("img_resolution", cfg.get("resolution") or dataset.resolution)
    net.setdefault("img_channels", cfg.get("channels") or encoder.channels)
    net.setdefault("label_dim", cfg.get("label_dim", dataset.label_dim) or 0)
    if cfg["training"]["precision"] in ("bf16", "fp16"):
        net["mixed_precision"] = cfg["training"]["precision"]
    return net


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


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    ema_params = [p for p in ema.parameters()]
    net_params = [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(ema_params, net_params, 1 - decay)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


def ema_decay(decay: float, step: int, warmup: bool) -> float:
    """The EMA decay at ``step``; with warm-up, min(decay, (1 + step) / (10 + step)) so early EMAs track."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def _state_dict(module) -> dict:
    """A full, CPU state_dict (gathers FSDP2 shards)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in module.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().to("cpu").clone()
    return out


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """The run's checkpoints, ``training-state-STEP.pt``, oldest first."""
    paths = (run_dir / "checkpoints").glob("training-state-*.pt")
    return sorted((p for p in paths if re.fullmatch(r"training-state-[0-9]+\.pt", p.name)), key=_step_of)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("training-state-").removesuffix(".pt"))


def save_training_state(run_dir: Path, step: int, cfg: dict, net, emas: dict, optimizer,
                        phema_tracker: phema.PowerEMA | None = None) -> Path:
    """Write ``training-state-STEP.pt`` atomically; with ``phema_tracker`` its profiles go under ``phema``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model_sd = _state_dict(net)
    ema_sd = {str(d): _state_dict(e) for d, e in emas.items()}
    phema_sd = phema_tracker.state_dict() if phema_tracker is not None else None
    opt_sd = get_optimizer_state_dict(net, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = run_dir / "checkpoints" / f"training-state-{step:08d}.pt"
    if distributed.is_main():
        state = {"format": "imm-training", "version": 1, "step": step, "config": cfg,
                 "network_config": net.config, "model": model_sd, "ema": ema_sd, "optimizer": opt_sd}
        if phema_sd is not None:
            state["phema"] = phema_sd
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    distributed.barrier()
    return path


def rotate_checkpoints(run_dir: Path, good: list[Path], keep_last: int) -> None:
    """Delete the checkpoints older than the ``keep_last``-th newest *good* one.

    ``good`` (oldest first) holds the checkpoints this run resumed from or wrote whose next step had
    finite gradients. Anything else (a checkpoint that led into non-finite steps, older files from
    before this start, never read and perhaps unreadable) counts for nothing, so rotation never
    deletes a good checkpoint in favour of them; older files go once ``keep_last`` good ones are newer.
    """
    if not keep_last or len(good) < keep_last or not distributed.is_main():
        return
    oldest_kept = _step_of(good[-keep_last])
    for path in checkpoint_paths(run_dir):
        if _step_of(path) < oldest_kept:
            path.unlink(missing_ok=True)


def _set_aside(paths: list[Path], suffix: str) -> None:
    """Rename checkpoints to NAME.pt + suffix (kept for inspection; no longer resumed or rotated)."""
    if distributed.is_main():
        for path in paths:
            path.replace(path.with_name(path.name + suffix))
    distributed.barrier()


def remove_orphans(run_dir: Path) -> None:
    """Delete the temporary files (``.NAME.*.tmp``) that a kill during :func:`atomic_write` left behind."""
    if distributed.is_main():
        for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples", run_dir / "phema"):
            for path in folder.glob(".*.tmp"):
                if path.is_file():
                    path.unlink(missing_ok=True)


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
    _set_aside(unreadable, ".corrupt")
    return path, state


def warm_start(path, net: IMMNetwork, emas) -> None:
    """``training.init_from``: a fresh run starts from the weights of a trained network of the same
    architecture (any file ``imm.load_network`` reads; of a trainer checkpoint, its first EMA), copied
    into the online network and every EMA. A flow-matching baseline's network is a warm start for IMM:
    with ``f_type='euler_fm'`` it already is the Euler sampler of f_{s,t} (App. C.5)."""
    from .checkpoint import check_state_dict, read_checkpoint

    _, tensors = read_checkpoint(path)
    check_state_dict(net, tensors, source=f"training.init_from={path}")
    for module in (net, *emas):
        module.load_state_dict(tensors, strict=True)


def _diverged(run_dir: Path, step: int, streak: int, lr: float) -> str:
    """Set aside the checkpoints that lead into a streak of non-finite steps (their next step is the
    streak's first whatever the learning rate) and say where a rerun resumes."""
    first = step - streak
    doomed = [p for p in checkpoint_paths(run_dir) if _step_of(p) >= first]
    _set_aside(doomed, ".diverged")
    left = checkpoint_paths(run_dir)
    aside = f"; {', '.join(p.name for p in doomed)}, which they start from, is renamed *.diverged" if doomed else ""
    resume = f"{left[-1].name} (step {_step_of(left[-1])})" if left else "step 0 (no earlier checkpoint)"
    return (f"{streak} steps in a row had non-finite gradients (steps {first + 1}-{step}); stopped without "
            f"writing a checkpoint{aside}. A rerun resumes from {resume}: lower the learning rate "
            f"(e.g. optimizer.lr={lr / 10:g}), use fp32/bf16, or check the data.")


# ---------------------------------------------------------------------------------------------
# Post-hoc EMA (training.phema; the math is in imm.phema)

_PHEMA_SNAPSHOT = re.compile(r"phema-([0-9]+)-([0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?)\.safetensors")


def phema_snapshot_path(run_dir: Path, step: int, sigma_rel: float) -> Path:
    """``RUN/phema/phema-STEP-SIGMA_REL.safetensors``; the width is written as Python's round-trip repr."""
    return run_dir / "phema" / f"phema-{step:08d}-{float(sigma_rel)!r}.safetensors"


def phema_snapshots(run_dir: Path) -> list[tuple[int, float, Path]]:
    """The run's post-hoc EMA snapshots as (step, sigma_rel, path), oldest first."""
    found = []
    for path in (run_dir / "phema").glob("phema-*.safetensors"):
        match = _PHEMA_SNAPSHOT.fullmatch(path.name)
        if match:
            found.append((int(match[1]), float(match[2]), path))
    return sorted(found)


def save_phema_snapshots(run_dir: Path, step: int, tracker: phema.PowerEMA) -> None:
    """Write each profile of ``tracker`` after ``step`` steps as an ordinary network file (atomically)."""
    for sigma_rel, ema in tracker.emas.items():
        tensors = _state_dict(ema)  # on every rank: gathers FSDP2 shards
        if distributed.is_main():
            save_weights(tensors, ema.config, phema_snapshot_path(run_dir, step, sigma_rel))


def _drop_phema_after(run_dir: Path, step: int) -> None:
    """Delete the snapshots after ``step`` that a run stopped past its last checkpoint left: the resumed run
    writes them again, from the profiles as they were at ``step``."""
    if distributed.is_main():
        for snapshot_step, _, path in phema_snapshots(run_dir):
            if snapshot_step > step:
                path.unlink(missing_ok=True)


# Sections whose change makes a resumed run another experiment: refused unless allowed (--allow-changes).
PROTECTED_SECTIONS = ("network", "loss", "dataset", "encoder")


def _flat(cfg, prefix: str = "") -> dict:
    if not isinstance(cfg, dict):
        return {prefix[:-1]: cfg}
    return {k: v for key, value in cfg.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def check_resumed_config(state_path: Path, old: dict, new: dict, allow_changes: bool) -> None:
    """Say what a resumed run changes against the configuration its checkpoint was trained with; refuse
    changes to the network, loss, data and encoder (one TrainingError line) unless ``allow_changes``. Keys
    the checkpoint's configuration lacks (settings newer than it) are not changes."""
    before, after = _flat(old), _flat(new)
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


def _sampling_settings_of_run(run_dir: Path) -> dict | None:
    """The encoder/sampling/eval sections of ``RUN/config.yaml`` (None when it is missing or unreadable)."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return sampling_settings(cfg)


def reconstruct_run(run_dir, sigma_rels, out, progress: bool = True) -> list[Path]:
    """``imm ema reconstruct``: the EMA of each relative width in ``sigma_rels`` at the run's newest snapshot,
    combined from all its snapshots with the weights of :func:`imm.phema.reconstruction_weights`, written as
    ``OUT/phema-SIGMA_REL.safetensors`` (networks that ``imm.load_network`` and ``imm generate`` read).

    Parameters are summed in float64 and stored in the snapshots' dtype; buffers (which EMAs copy rather
    than average) come from the newest snapshot. Bad input is one CheckpointError or ConfigError line."""
    from tqdm import tqdm

    from .checkpoint import build_network, check_state_dict, read_checkpoint

    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    snapshots = phema_snapshots(run_dir)
    if not snapshots:
        raise CheckpointError(f"{run_dir / 'phema'}: no post-hoc EMA snapshots (they are written every "
                              "training.phema_snapshot_every steps of a run with training.phema=true)")
    sigma_rels = [float(s) for s in sigma_rels]
    if not sigma_rels:
        raise ConfigError("give at least one sigma_rel to reconstruct")
    try:
        gammas = [phema.sigma_rel_to_gamma(s) for _, s, _ in snapshots]
        weights = {s: phema.reconstruction_weights([t for t, _, _ in snapshots], gammas, s) for s in sigma_rels}
    except ValueError as e:
        raise ConfigError(str(e)) from None
    settings = _sampling_settings_of_run(run_dir)  # so that imm generate / eval fid need no --config
    config = sums = buffers = None
    for i, (step, _, path) in enumerate(tqdm(snapshots, desc="imm ema reconstruct", unit="snapshot",
                                             disable=not progress)):
        file_config, tensors = read_checkpoint(path)
        if config is None:
            if file_config is None:
                raise CheckpointError(f"{path}: carries no network configuration")
            config = file_config
            with torch.device("meta"):
                meta_net = build_network(config, source=str(path))
            params = {name for name, _ in meta_net.named_parameters()}
            dtypes = {k: tensors[k].dtype for k in tensors}
            sums = {s: {k: torch.zeros(tensors[k].shape, dtype=torch.float64) for k in params} for s in sigma_rels}
        elif file_config != config:
            raise CheckpointError(f"{path}: a different network configuration than {snapshots[0][2].name}")
        check_state_dict(meta_net, tensors, source=str(path))
        for s in sigma_rels:
            for k in params:
                sums[s][k].add_(tensors[k].to(torch.float64), alpha=float(weights[s][i]))
        if step == snapshots[-1][0]:
            buffers = {k: v for k, v in tensors.items() if k not in params}
    paths = []
    for s in sigma_rels:
        path = out / f"phema-{s!r}.safetensors"
        save_weights({**{k: v.to(dtypes[k]) for k, v in sums[s].items()}, **buffers}, config, path, settings)
        paths.append(path)
    return paths


def load_latest_state(run_dir: Path):
    """The newest readable training state (an unreadable newest one falls back to the one before)."""
    from .checkpoint import read_training_state

    for path in reversed(checkpoint_paths(run_dir)):
        try:
            state = read_training_state(path)
            if isinstance(state, dict) and state.get("format") == "imm-training":
                return path, state
        except Exception as e:  # noqa: BLE001 - a torn or corrupt file: try the previous one
            if distributed.is_main():
                print(f"imm train: skipping unreadable checkpoint {path.name} ({type(e).__name__})")
    return None, None


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
    if device.type == "cuda":
        tf32 = tcfg["precision"] != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32

    # -- data, network, loss: every check before any compute ---------------------------------------
    if "path" in cfg["dataset"] and not cfg["dataset"]["path"]:
        raise ConfigError("dataset.path is not set: pass dataset.path=/path/to/data (a folder, .zip or .npz)")
    dataset = build_dataset(cfg["dataset"])
    encoder = build_encoder(cfg.get("encoder"))
    net_cfg = network_config(cfg, dataset, encoder)
    check_data(dataset, encoder, net_cfg)
    loss_fn = build_loss(cfg["loss"])
    set_progress = getattr(loss_fn, "set_progress", None)  # iCT's N(k) curriculum, IMM's gap annealing
    chunk, accumulation = batch_layout(int(tcfg["batch_size"]), tcfg["batch_per_device"], world, loss_fn.group_size)
    try:
        torch.manual_seed(int(tcfg["seed"]))
        net = IMMNetwork(**net_cfg).to(device).train()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad network configuration: {e}") from None
    encoder.init(device)
    if log["fid_every"] and world > 1 and tcfg["parallel"] == "fsdp":
        raise ConfigError("logging.fid_every is not supported with training.parallel=fsdp yet")
    periodic_fid = PeriodicFID(cfg, device) if log["fid_every"] else None
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
    _drop_phema_after(run_dir, start_step)

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
        return _finish(run_dir, emas, encoder, cfg, total, Logger(run_dir, cfg, start_step), device)
    max_unreadable = int(tcfg["max_unreadable_fraction"] * len(dataset))
    loader = make_loader(dataset, chunk * accumulation, int(tcfg["batch_size"]), rank, world,
                         seed=int(tcfg["seed"]), start_step=start_step, num_workers=int(tcfg["num_workers"]),
                         max_unreadable=max_unreadable)
    logger = Logger(run_dir, cfg, start_step)
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
            if set_progress is not None:
                set_progress(step, total)
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
                    update_ema(e, net, ema_decay(d, step, tcfg["ema_warmup"]))
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
                sample_grids(next(iter(emas.values())), encoder, cfg, run_dir, step, logger, device)
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
    return _finish(run_dir, emas, encoder, cfg, step, logger, device)


def _finish(run_dir: Path, emas: dict, encoder, cfg: dict, step: int, logger, device) -> Path:
    ema = next(iter(emas.values()))
    full = IMMNetwork(**ema.config)
    full.load_state_dict(_state_dict(ema))
    path = run_dir / "network.safetensors"
    if distributed.is_main():
        save_network(full, path, sampling_settings(cfg))  # imm generate's defaults
        sample_grids(full.to(device), encoder, cfg, run_dir, step, logger, device)
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


__all__ = ["train", "resolve_config", "TrainingError", "CheckpointError"]
