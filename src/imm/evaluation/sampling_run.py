"""What a sampling run is made of, resolved in one place for ``imm generate``, ``imm eval fid`` and the
trainer's periodic FID: the config to sample with, its ``sampling:`` entries and ``eval:`` settings as
typed objects, the network, its encoder and the sampler of the method it was trained with.

A sampling entry names its sampler ``kind`` (``pushforward``, ``restart``; the release's ``name:
pushforward_generator_fn`` is translated where the config is read, :mod:`imm.core.release`); the ``eval:``
section keeps the release's keys (``eval.resume``/``seed``/``batch_size``; lumalabs/imm ``configs/*.yaml``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch

from imm.core import distributed, fastpath
from imm.core.config import ConfigError, apply_overrides, check_keys, check_kind, fill_section, load_config
from imm.core.errors import printable
from imm.core.fastpath import FastPath
from imm.data.encoders import KNOWN_VAES, build_encoder
from imm.io.checkpoint import (
    CheckpointError,
    network_from_tensors,
    read_checkpoint_and_settings,
    read_sampling_settings,
)
from imm.methods import registry as methods
from imm.model.backbones import backbone_family
from imm.model.network import network_arguments
from imm.model.precision import sampling_network
from imm.model.sampling import SAMPLERS, SamplingEntry

# The network shape (channels, resolution, label_dim) of each preset that samples, for naming the right one.
PRESET_SHAPES = {"cifar10": (3, 32, 0), "imagenet256": (4, 32, 1000), "mnist": (1, 32, 10), "toy2d": (2, 1, 0)}
DEFAULT_CONFIG = "cifar10"  # for files that record no settings (the released cifar10.pt among them)


EVAL_BOUNDS = {"seed": (0, 2**63 - 1), "batch_size": (1, 65536)}


@dataclass(frozen=True)
class EvalSection:
    """The ``eval:`` section: which checkpoint (``resume``, when ``--checkpoint`` is not given), the seed of
    image 0 (image i uses ``seed + i``) and the images per batch."""

    resume: str | None = None
    seed: int = 0
    batch_size: int = 64

    @classmethod
    def from_config(cls, section: Mapping | None) -> EvalSection:
        defaults = cls()
        values = fill_section("eval", section, cls)
        for key in ("seed", "batch_size"):
            if values[key] is None:  # eval.seed=null: the default, as in the release's configs
                values[key] = getattr(defaults, key)
            value, (low, high) = values[key], EVAL_BOUNDS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"eval.{key} must be an integer from {low} to {high}, got {value!r:.40}")
        return cls(**values)


def sampling_entry(name: str, section: Mapping | None) -> SamplingEntry:
    """One entry of a ``sampling:`` section (canonical form); its ``kind`` is the entry's sampler."""
    values = dict(section or {})
    check_keys(f"sampling.{name}", values, ["kind", *(f for f in SamplingEntry.__dataclass_fields__ if f != "sampler")])
    sampler = check_kind(f"sampling.{name}", values.pop("kind", "pushforward"), SAMPLERS)
    try:
        return SamplingEntry(sampler=sampler, **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sampling entry {name!r}: {e}") from None


def sampling_entries(cfg: Mapping) -> dict[str, SamplingEntry]:
    """The config's ``sampling:`` section, entry by entry."""
    section = cfg.get("sampling") or {}
    if not isinstance(section, Mapping) or not section:
        raise ConfigError("the config has no sampling entries (a `sampling:` section of named entries)")
    return {check_entry_name(name): sampling_entry(name, entry) for name, entry in section.items()}


ENTRY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,63}")


def check_entry_name(name) -> str:
    """An entry's name, which names the files ``imm generate`` writes: letters, digits and ``_ . = + -``,
    not starting with a dot, at most 64 characters (no path separator, so it stays inside ``--out``)."""
    if not isinstance(name, str) or not ENTRY_NAME.fullmatch(name):
        raise ConfigError(f"sampling entry name {str(name)[:40]!a}: use letters, digits and _ . = + - "
                          "(at most 64, not starting with a dot)")
    return name


def step_entries(steps, cfg_scale: float | None = None, cfg_interval=None) -> dict[str, SamplingEntry]:
    """One uniform-grid entry per step count, named as ``imm generate`` names them (``1_step``, ``2_steps``)."""
    return {("1_step" if s == 1 else f"{s}_steps"): SamplingEntry.uniform(s).with_guidance(cfg_scale, cfg_interval)
            for s in steps}


def sampling_config(config: str | None, checkpoint, overrides: list[str]) -> tuple[dict, str]:
    """The config to sample with, and how to name it in messages: ``--config`` when given; else the encoder,
    sampling entries and eval settings the checkpoint records (``imm train`` writes them into its files);
    else the ``cifar10`` preset. :func:`resolve_sampling_run` then refuses a network that does not fit it,
    naming the right ``--config``."""
    if config is None and checkpoint:
        settings = read_sampling_settings(checkpoint)
        if settings and settings.get("sampling"):  # eval's keys stated, so that eval.KEY= overrides apply
            settings = {**settings, "eval": {**asdict(EvalSection()), **(settings.get("eval") or {})}}
            check_recorded_vae(settings, overrides, checkpoint)
            return apply_overrides(settings, overrides), f"the settings recorded in {checkpoint}"
    config = config or DEFAULT_CONFIG
    return apply_overrides(load_config(config), overrides), f"--config {config}"


def check_recorded_vae(recorded: Mapping, overrides: list[str], checkpoint) -> None:
    """A VAE a checkpoint's recorded settings name is loaded only when it is one of
    :data:`imm.data.encoders.KNOWN_VAES` or the user chooses one (an ``encoder.vae_name=`` override): a file
    cannot choose which folder or Hub repository is read."""
    named = (recorded.get("encoder") or {}).get("vae_name")
    chosen = any(item.lstrip("+").split("=", 1)[0].strip() == "encoder.vae_name" for item in overrides)
    if named is None or named in KNOWN_VAES or chosen:
        return
    raise ConfigError(f"the settings recorded in {checkpoint} name the VAE {printable(named)[:200]!r}, which is "
                      f"not one of {', '.join(KNOWN_VAES)}; pass encoder.vae_name=... to choose the VAE yourself")


def training_method(settings: Mapping | None) -> str | None:
    """The ``loss.kind`` a config or a checkpoint's recorded settings name (a known method), None when they
    name none."""
    method = ((settings or {}).get("loss") or {}).get("kind")
    if method:
        methods.get(method)
    return method


def check_fits(net, encoder, entries: Mapping[str, SamplingEntry], source: str) -> None:
    """Before any sampling: the config's encoder takes the network's channels and its guided entries have a
    class-conditional network; otherwise one ConfigError naming the preset that fits."""
    shape = (net.img_channels, net.img_resolution, net.label_dim)
    fits = [name for name, preset in PRESET_SHAPES.items() if preset == shape]
    hint = (f"use --config {fits[0]}" if fits else "pass --config with a YAML file whose encoder and sampling "
            "entries fit it")
    what = f"the network makes {net.img_channels}-channel {net.img_resolution}x{net.img_resolution} samples" + (
        f" of {net.label_dim} classes" if net.label_dim else ", unconditional")
    if getattr(encoder, "channels", net.img_channels) != net.img_channels:
        raise ConfigError(f"{source} decodes {encoder.channels}-channel samples but {what}: {hint}")
    guided = [name for name, entry in entries.items() if entry.cfg_scale is not None]
    if guided and not net.label_dim:
        raise ConfigError(f"{source}: the sampling entries {', '.join(guided)} use guidance (cfg_scale) but {what}: {hint}")


def network_from_config(cfg: Mapping, checkpoint, file_config: dict | None, tensors: dict,
                        network_overrides: Mapping, device) -> torch.nn.Module:
    """The network of ``checkpoint`` (read as ``file_config``, ``tensors``) built from the file's own
    configuration (or the config's ``network:`` section when the file carries none), with
    ``network_overrides`` (``network.KEY`` overrides, canonical keys) on top, its weights loaded."""
    if file_config is None:
        file_config = {"label_dim": 0, **network_arguments(cfg.get("network"))}
    config = {**file_config, **network_arguments(network_overrides)}
    return network_from_tensors(config, tensors, str(checkpoint), device)


@dataclass
class SamplingRun:
    """Everything a sampling run needs: the network (eval mode, on ``device``), the encoder that decodes its
    samples, the entries to sample, ``sample_fn`` (``imm.sample``'s call, with the sampler of the network's
    training method), the ``eval`` settings, and the precision and layout it samples in (``fast``) with the
    network that computes so (``sampling_net``: ``net`` itself, or its working copy)."""

    net: torch.nn.Module
    encoder: object
    entries: dict[str, SamplingEntry]
    sample_fn: Callable
    method: str
    eval: EvalSection
    checkpoint: str
    device: torch.device
    fast: FastPath = FastPath()
    sampling_net: torch.nn.Module | None = None

    def __post_init__(self):
        if self.sampling_net is None:
            self.sampling_net = sampling_network(self.net, self.fast.dtype, self.fast.torch_memory_format)


def resolve_sampling_run(cfg: Mapping, checkpoint, device, *, network_overrides: Mapping | None = None,
                         source: str = "the config", names: list[str] | None = None, steps=None,
                         cfg_scale: float | None = None, cfg_interval=None, seed: int | None = None,
                         batch_size: int | None = None, precision: str = "fp32",
                         memory_format: str = "contiguous", load_encoder: bool = True) -> SamplingRun:
    """The sampling run of ``cfg`` for ``checkpoint`` (else ``eval.resume``): the config's sampling entries
    (only ``names`` when given), or a uniform-grid entry per step count of ``steps``; ``cfg_scale`` and
    ``cfg_interval`` replace the entries' guidance, ``seed`` and ``batch_size`` the ``eval`` section's;
    ``precision`` and ``memory_format`` (``auto``: :func:`imm.core.fastpath.choose`) what it samples in. Every
    check (entries, eval settings, the network against the encoder and the guidance) runs before the encoder
    is loaded (``load_encoder=False``: not at all, for a run that only reads the settings)."""
    try:  # the settings may come from a file (a checkpoint records them): errors name where they came from
        settings = EvalSection.from_config(cfg.get("eval"))
        entries = None if steps else sampling_entries(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    settings = EvalSection(resume=settings.resume, seed=settings.seed if seed is None else int(seed),
                           batch_size=settings.batch_size if batch_size is None else int(batch_size))
    checkpoint = checkpoint or settings.resume
    if not checkpoint:
        raise CheckpointError("no checkpoint given: pass --checkpoint PATH (or eval.resume=PATH)")
    if steps:
        entries = step_entries(steps)
    elif names:
        missing = [n for n in names if n not in entries]
        if missing:
            raise ConfigError(f"unknown sampling entries {missing}; the config has {', '.join(entries)}")
        entries = {n: entries[n] for n in names}
    entries = {n: e.with_guidance(cfg_scale, cfg_interval) for n, e in entries.items()}
    method = training_method(cfg)
    if method:  # refused before the checkpoint is read
        methods.check_entries(method, entries)
    file_config, tensors, recorded = read_checkpoint_and_settings(checkpoint)
    if not method:  # a config that names no method (a preset): the one the checkpoint records, else IMM
        method = training_method(recorded) or methods.DEFAULT_METHOD
        methods.check_entries(method, entries)
    net = network_from_config(cfg, checkpoint, file_config, tensors, network_overrides or {}, device)
    if cfg_scale is not None and not net.label_dim:
        raise ConfigError("--cfg-scale needs a class-conditional network (label_dim > 0)")
    encoder = build_encoder(cfg.get("encoder"))
    check_fits(net, encoder, entries, source)
    if load_encoder:
        encoder.init(device)
    family = backbone_family(net.config["model_type"])
    fast = distributed.from_main(fastpath.choose(family, device, precision, memory_format)
                                 if distributed.is_main() else None)  # one choice for every process
    return SamplingRun(net=net, encoder=encoder, entries=entries, sample_fn=methods.entry_sampler(method),
                       method=method, eval=settings, checkpoint=str(checkpoint), device=device, fast=fast)
