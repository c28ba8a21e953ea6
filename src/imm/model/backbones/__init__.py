"""Backbones G: the DDPM++/NCSN++ UNet (``unet.py``) and DiT (``dit.py``), by the names of the official
release (github.com/lumalabs/imm),
and a small MLP (``mlp.py``) for toy 2-D data."""

from __future__ import annotations

import importlib

import torch
from torch.utils.checkpoint import checkpoint

from imm.core.config import check_keys, declared_keys
from imm.core.errors import InputError

# model_type (as the release's configs spell it) -> (module, constructor)
_BACKBONES = {"SongUNet": ("unet", "SongUNet"), "DiT": ("dit", "DiT"), "MLP": ("mlp", "MLP")}
for _size in ("S", "B", "L", "XL"):
    for _patch in (2, 4, 8):
        _BACKBONES[f"DiT_{_size}_{_patch}"] = ("dit", f"DiT_{_size}_{_patch}")
BACKBONES = tuple(_BACKBONES)


def backbone_keys(model_type: str) -> frozenset[str]:
    """The keyword arguments the backbone ``model_type`` declares (the DiT_{S,B,L,XL}_{2,4,8} sizes: DiT's)."""
    module, name = _backbone(model_type)
    constructor = getattr(importlib.import_module(f"{__name__}.{module}"), "DiT" if name.startswith("DiT_") else name)
    return frozenset(declared_keys(constructor))


def _backbone(model_type: str) -> tuple[str, str]:
    if model_type not in _BACKBONES:
        raise InputError(f"unknown model_type {model_type!r}; choose one of {', '.join(BACKBONES)}")
    return _BACKBONES[model_type]


def backbone_family(model_type: str) -> str:
    """The block :mod:`imm.core.fastpath` times for ``model_type``: ``'conv'`` for the UNet (convolutions and
    GroupNorm take its time), ``'matmul'`` for DiT and the MLP."""
    return "conv" if _backbone(model_type)[0] == "unet" else "matmul"


def build_backbone(model_type: str, **kwargs):
    """Construct the backbone the release calls ``model_type`` with its constructor kwargs. Every backbone
    declares what ``IMMNetwork`` passes it (``img_resolution``, ``img_channels``, ``in_channels``,
    ``out_channels``, ``label_dim``); any key it does not declare (a typo in ``network.*``, which the
    release's backbones ignore) is a ConfigError (a ValueError) naming the nearest declared one."""
    module, name = _backbone(model_type)
    check_keys("network", kwargs, backbone_keys(model_type), f" for model_type {model_type}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)(**kwargs)


def call_block(owner, block, *args):
    """``block(*args)``; when ``owner.activation_checkpointing`` is set and gradients are on, its
    activations are not kept but recomputed in the backward pass (``torch.utils.checkpoint``, non-reentrant,
    with the RNG state restored so dropout draws the same masks). The backbones call their blocks through
    this; ``imm.training.loop`` sets the flag for ``training.activation_checkpointing``."""
    if owner.activation_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def set_activation_checkpointing(model, enabled: bool) -> int:
    """Turn activation checkpointing on or off in every backbone inside ``model`` that supports it
    (those with an ``activation_checkpointing`` class attribute: DiT, SongUNet); returns how many."""
    owners = [m for m in model.modules() if hasattr(type(m), "activation_checkpointing")]
    for m in owners:
        m.activation_checkpointing = bool(enabled)
    return len(owners)
