"""Backbones G: the DDPM++/NCSN++ UNet (``unet.py``) and DiT (``dit.py``), by the release's names,
and a small MLP (``mlp.py``) for toy 2-D data."""

from __future__ import annotations

import importlib

# model_type (as the release's configs spell it) -> (module, constructor)
_BACKBONES = {"SongUNet": ("unet", "SongUNet"), "DiT": ("dit", "DiT"), "MLP": ("mlp", "MLP")}
for _size in ("S", "B", "L", "XL"):
    for _patch in (2, 4, 8):
        _BACKBONES[f"DiT_{_size}_{_patch}"] = ("dit", f"DiT_{_size}_{_patch}")
BACKBONES = tuple(_BACKBONES)


def build_backbone(model_type: str, **kwargs):
    """Construct the backbone the release calls ``model_type`` with its constructor kwargs."""
    if model_type not in _BACKBONES:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(BACKBONES)}")
    module, name = _BACKBONES[model_type]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)(**kwargs)
