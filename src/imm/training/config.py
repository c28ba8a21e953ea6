"""The training configuration: what each section of an ``imm train`` config holds, its defaults and checks.

Every section is declared once, and :func:`imm.core.config.fill_section` fills it in and refuses unknown keys
(naming the nearest declared one) for all of them:

* ``optimizer``, ``training``, ``logging``: the dataclasses below (their fields are the keys and
  defaults; a field's ``check`` says what its value must be);
* ``loss``: the constructor of the ``loss.kind``'s loss class (:mod:`imm.methods.registry`);
* ``network``: the ``network.kind`` backbone's constructor, via :class:`imm.model.network.IMMNetwork`
  (``imm.model.backbones``);
* ``dataset`` and ``encoder``: the classes their ``kind`` names (``imm.data.datasets.build_dataset``,
  ``imm.data.encoders.build_encoder``), checked when they are built, before any compute.

A config is read in the canonical form (:mod:`imm.core.release`: one key, ``kind``, chooses what a section
builds; the release's ``loss.method``, ``encoder.class_name``, ``network.model_type``, top-level
``resolution`` ... are translated), which :func:`resolve_config` also applies to a dict it is handed.

:func:`load_train_config` applies the command line's overrides to the preset and resolves the result
once (:func:`resolve_config`); ``imm.training.loop.train`` resolves what it is given, which leaves a resolved
config as it is, and works with the section instances of :func:`sections`. The resolved dict is what
``RUN/config.yaml`` and the checkpoints record.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace

import torch

from imm.core import fastpath
from imm.core.config import ConfigError, apply_overrides, check_keys, declared_keys, fill_section, load_config
from imm.core.release import canonical
from imm.evaluation.sampling_run import EvalSection, sampling_entries
from imm.methods import registry as methods
from imm.model.backbones import backbone_family
from imm.model.network import DEFAULT_MODEL_TYPE, network_arguments
from imm.training import phema

SECTIONS = ("dataset", "encoder", "network", "loss", "optimizer", "training", "logging", "sampling", "eval")
# Sections whose keys their builder checks; a command-line override may set any key in them.
BUILT_SECTIONS = ("dataset", "encoder", "network", "loss", "optimizer", "training", "logging")

# What a numeric key must be: check name -> (test, description); "?" after a check allows null, and a
# list-valued key applies the test to every element.
NUMBER_CHECKS = {
    "count": (lambda v: v >= 1 and float(v).is_integer(), "a positive integer"),
    "index": (lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
    "positive": (lambda v: v > 0, "a number > 0"),
    "nonneg": (lambda v: v >= 0, "a number >= 0"),
    "fraction": (lambda v: 0 <= v <= 1, "a number between 0 and 1"),
    "beta": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "sigma_rel": (lambda v: 0 < v <= phema.SIGMA_REL_MAX, f"a number in (0, {phema.SIGMA_REL_MAX:.4f}]"),
}


def _key(default, check: str | None = None, choices: tuple | None = None, length: int | None = None):
    """A section field: its default (lists copied per use), the number check or the allowed values."""
    factory = (lambda: list(default)) if isinstance(default, list) else None
    meta = {"check": check, "choices": choices, "length": length}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


@dataclass
class OptimizerSection:
    name: str = _key("radam", choices=("radam", "adamw"))
    lr: float = _key(1e-4, "positive")
    betas: list = _key([0.9, 0.999], "beta", length=2)
    eps: float = _key(1e-8, "nonneg")
    weight_decay: float = _key(0.0, "nonneg")
    warmup_steps: int = _key(0, "index")
    grad_clip: float | None = _key(None, "nonneg?")


@dataclass
class TrainingSection:
    total_steps: int = _key(400_000, "count")
    batch_size: int = _key(4096, "count")
    batch_per_device: int | None = _key(None, "count?")
    seed: int = _key(0, "index")
    ema_decays: list = _key([0.9999], "fraction")
    ema_warmup: bool = _key(False)
    # auto: this machine's fast path (imm.core.fastpath; on CUDA tf32). bf16: fp32 master weights and a bf16
    # working copy (imm.model.precision), autocast with FSDP; fp16: autocast with a GradScaler.
    precision: str = _key("tf32", choices=("auto", "fp32", "tf32", "bf16", "fp16"))
    memory_format: str = _key("auto", choices=fastpath.MEMORY_FORMATS)  # auto: the probe's choice on a CPU
    compile: bool = _key(False)
    xflip: bool = _key(False)
    num_workers: int = _key(2, "index")
    parallel: str = _key("ddp", choices=("ddp", "fsdp"))
    max_nonfinite_steps: int = _key(20, "count")
    init_from: str | None = _key(None)
    max_unreadable_fraction: float = _key(0.01, "fraction")
    activation_checkpointing: bool = _key(False)
    phema: bool = _key(False)
    phema_sigma_rels: list = _key([0.05, 0.10], "sigma_rel")
    # 10_000: 40 snapshots per profile over the cifar10 preset's 400k steps, which fit every width between
    # the tracked 0.05 and 0.10 to < 0.1 % (L2 error of the profile, phema.reconstruction_weights), 0.03
    # and 0.2 to < 1 %; one snapshot is one EMA network (DDPM++ 224 MB, DiT-XL/2 2.7 GB).
    phema_snapshot_every: int = _key(10_000, "count")

    @property
    def layout(self) -> torch.memory_format:
        """``memory_format`` (once resolved from auto) as torch's memory format."""
        return fastpath.torch_memory_format(self.memory_format)


@dataclass
class LoggingSection:
    log_every: int = _key(100, "count")
    checkpoint_every: int = _key(10_000, "count")
    keep_last: int = _key(3, "index")
    sample_every: int = _key(10_000, "count")
    sample_steps: list = _key([1, 2, 4], "count")
    sample_count: int = _key(64, "count")
    tensorboard: bool = _key(True)
    wandb: bool = _key(False)
    progress: bool = _key(True)
    fid_every: int = _key(0, "index")
    fid_ref: str | None = _key(None)
    fid_num_images: int = _key(1000, "count")
    fid_steps: list = _key([1, 2, 4], "count")
    fid_metrics: list = _key(["fid"])
    fid_dinov2: str = _key("facebook/dinov2-large")


DATACLASS_SECTIONS = {"optimizer": OptimizerSection, "training": TrainingSection, "logging": LoggingSection}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_values(section: str, values: dict, schema) -> dict:
    """Each field of ``schema`` with a check or choices holds what it must, else a one-line ConfigError;
    integral floats of integer keys become ints."""
    for f in fields(schema):
        key, value, check, choices = f"{section}.{f.name}", values[f.name], f.metadata["check"], f.metadata["choices"]
        if choices is not None and value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
        if check is None or (check.endswith("?") and value is None):
            continue
        name = check.rstrip("?")
        test, what = NUMBER_CHECKS[name]
        integral = name in ("count", "index")
        if f.default_factory is not MISSING:  # a list-valued key
            length = f.metadata["length"]
            if not (isinstance(value, (list, tuple)) and len(value) == (length or len(value))
                    and all(_is_number(v) and test(v) for v in value)):
                raise ConfigError(f"{key} must be a list of {f'{length} ' if length else ''}numbers, each {what}; "
                                  f"got {value!r}")
            values[f.name] = [int(v) if integral else v for v in value]
        elif not (_is_number(value) and test(value)):
            raise ConfigError(f"{key} must be {what}, got {value!r}")
        elif integral:
            values[f.name] = int(value)
    return values


def _imm_only_loss_keys(method: str) -> set[str]:
    """The IMM loss's keys that the ``method``'s loss does not take (none for IMM itself)."""
    return set(declared_keys(methods.METHODS["imm"].loss)) - set(declared_keys(methods.METHODS[method].loss))


def resolve_config(cfg: dict) -> dict:
    """``cfg`` in the canonical form (:func:`imm.core.release.canonical`) with the training sections' defaults
    filled in and every key checked (an unknown one names the nearest valid one); a resolved config comes back
    unchanged. A baseline's loss section drops the IMM-only keys (group_size, k, a, b ...) that a preset
    written for IMM carries."""
    cfg = canonical(cfg)
    check_keys("", cfg, SECTIONS)
    for name, schema in DATACLASS_SECTIONS.items():
        cfg[name] = check_values(name, fill_section(name, cfg.get(name), schema), schema)
    loss = dict(cfg.get("loss") or {})
    method = loss.pop("kind", methods.DEFAULT_METHOD)
    methods.get(method)
    loss = {k: v for k, v in loss.items() if k not in _imm_only_loss_keys(method)}
    cfg["loss"] = {"kind": method, **fill_section("loss", loss, methods.METHODS[method].loss)}
    methods.check_training(method, cfg.get("network") or {}, cfg["training"])
    if cfg.get("sampling") is not None:  # what imm generate and imm eval fid read from the run's files
        sampling_entries(cfg)
    EvalSection.from_config(cfg.get("eval"))
    network_arguments(cfg.get("network"))  # its kind names a backbone
    if not cfg.get("dataset"):
        raise ConfigError("the config has no dataset: section (e.g. dataset.path=/data/cifar10.zip)")
    if cfg["logging"]["fid_every"] and not cfg["logging"]["fid_ref"]:
        raise ConfigError("logging.fid_every needs logging.fid_ref=REF.npz (imm eval ref makes one)")
    return cfg


def load_train_config(name_or_path: str, overrides=()) -> dict:
    """A preset or YAML file with dotted overrides applied, resolved (:func:`resolve_config`).

    An override of an IMM-only loss key (``loss.k=5``) with a baseline ``loss.kind`` is refused: it
    would be dropped with the preset's IMM keys and change nothing.
    """
    cfg = apply_overrides(load_config(name_or_path), list(overrides), open_sections=BUILT_SECTIONS)
    method = (cfg.get("loss") or {}).get("kind", methods.DEFAULT_METHOD)
    if method in methods.METHODS:
        for item in overrides:
            key = item.lstrip("+").split("=", 1)[0].strip()
            if key.startswith("loss.") and key[len("loss."):] in _imm_only_loss_keys(method):
                raise ConfigError(f"override {item!r}: {key} applies to loss.kind=imm, not {method}")
    return resolve_config(cfg)


def sections(cfg: dict) -> tuple[OptimizerSection, TrainingSection, LoggingSection]:
    """The optimizer, training and logging sections of a resolved config (:func:`resolve_config`) as instances:
    built once, the loop reads checked, typed fields."""
    return (OptimizerSection(**cfg["optimizer"]), TrainingSection(**cfg["training"]),
            LoggingSection(**cfg["logging"]))


def fast_path(training: TrainingSection, net_cfg: dict, device, method: str = methods.DEFAULT_METHOD
              ) -> fastpath.FastPath:
    """The precision and memory layout a run trains in: ``training.precision`` and ``training.memory_format``
    with ``auto`` chosen for the network's family on this machine (:func:`imm.core.fastpath.choose`), among the
    layouts the training ``method`` can train in."""
    family = backbone_family(net_cfg.get("model_type", DEFAULT_MODEL_TYPE))
    memory_format = training.memory_format
    if memory_format == "auto" and methods.cannot_train_with(method, "memory_format", "channels_last"):
        memory_format = "contiguous"
    return fastpath.choose(family, device, training.precision, memory_format)


def uses_autocast(precision: str, parallel: str) -> bool:
    """fp16 (with its GradScaler) and bf16 under FSDP2 train with autocast; bf16 otherwise with a working copy."""
    return precision == "fp16" or (precision == "bf16" and parallel == "fsdp")


def with_fast_path(training: TrainingSection, net_cfg: dict,
                   fast: fastpath.FastPath) -> tuple[TrainingSection, dict]:
    """The training section with ``fast``'s precision and layout in place of ``auto``, and the network arguments
    with the autocast that precision trains with (:func:`uses_autocast`)."""
    training = replace(training, precision=fast.precision, memory_format=fast.memory_format)
    if uses_autocast(training.precision, training.parallel):
        net_cfg = {**net_cfg, "mixed_precision": training.precision}
    return training, net_cfg


def network_config(cfg: dict, dataset, encoder) -> dict:
    """IMMNetwork arguments: the config's network section (:func:`imm.model.network.network_arguments`) with
    the data's shape filled in where it is unset."""
    net = network_arguments(cfg.get("network"))
    for key, value in (("img_resolution", dataset.resolution), ("img_channels", encoder.channels),
                       ("label_dim", dataset.label_dim)):
        if net.get(key) is None:
            net[key] = value
    return net
