"""``imm export diffusers``: a checkpoint as a diffusers pipeline folder (:mod:`imm.interop.diffusers_pipeline`).

The checkpoint is read as ``imm generate`` reads it (:func:`imm.evaluation.sampling_run.resolve_sampling_run`:
a run folder's network, a ``.safetensors``, a training state, a release ``.pkl`` / ``.pt``, an ``hf://``
path; the settings it records, else ``--config``), so the pipeline samples what ``imm generate`` samples.
The folder is written next to ``OUT`` under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

from imm.core.errors import InputError, MissingPackageError
from imm.data.encoders import KNOWN_VAES, StabilityVAEEncoder
from imm.evaluation.sampling_run import resolve_sampling_run, sampling_config
from imm.training.checkpoints import checkpoint_paths

DIFFUSERS_HINT = 'pip install "imm[diffusers]" (diffusers >= 0.27)'


def load_pipeline_classes():
    """The module of :class:`IMMPipeline` and its components; one line naming the extra without diffusers."""
    try:
        return importlib.import_module("imm.interop.diffusers_pipeline")
    except ImportError as e:
        if "diffusers" not in str(e):
            raise
        raise MissingPackageError(f"exporting to and sampling with diffusers needs diffusers: {DIFFUSERS_HINT}") from None


def _plain(value):
    """``value`` as JSON data (tuples as lists), as a diffusers config holds it."""
    return json.loads(json.dumps(value))


def checkpoint_file(checkpoint) -> str:
    """``checkpoint``, or for a run folder its final network (``network.safetensors``), else its newest
    training state."""
    path = Path(str(checkpoint)).expanduser()
    if not path.is_dir():
        return str(checkpoint)
    if (path / "network.safetensors").is_file():
        return str(path / "network.safetensors")
    states = checkpoint_paths(path)
    if not states:
        raise InputError(f"{path} is a folder with no network.safetensors and no checkpoints/training-state-*.pt")
    return str(states[-1])


def build_pipeline(checkpoint, config: str | None = None, overrides=(), network_overrides=None,
                   copy_vae: bool | None = None):
    """The :class:`IMMPipeline` of ``checkpoint`` (:func:`checkpoint_file`; on the CPU, fp32), with its
    recorded (or ``config``'s) sampling entries, method and encoder; ``network_overrides`` as ``imm
    generate``'s ``network.KEY=VALUE``. ``copy_vae``: a latent network's VAE is loaded now and becomes the
    ``vae`` component; else the encoder names it and the pipeline loads it when it decodes, which it does
    only for a Hub id of :data:`imm.data.encoders.KNOWN_VAES` (None, the default: copy any other VAE)."""
    classes = load_pipeline_classes()
    checkpoint = checkpoint_file(checkpoint)
    cfg, source = sampling_config(config, checkpoint, list(overrides))
    run = resolve_sampling_run(cfg, checkpoint, "cpu", source=source, network_overrides=network_overrides,
                               load_encoder=False)
    net = run.net
    network = classes.IMMNetworkModel(network_config=_plain(net.config))
    network.network.load_state_dict(net.state_dict())
    network.eval()
    scheduler = classes.IMMScheduler(
        method=run.method, entries={name: _plain(entry.kwargs()) for name, entry in run.entries.items()},
        encoder=_plain(dict(cfg.get("encoder") or {})), noise_schedule=net.noise_schedule, f_type=net.f_type,
        temb_type=net.temb_type, T=float(net.T), eps=float(net.eps), sigma_data=float(net.sigma_data))
    latent = isinstance(run.encoder, StabilityVAEEncoder)
    if copy_vae and not latent:
        raise InputError(f"--copy-vae: {checkpoint} is a pixel-space network (encoder {run.encoder!r}); it has no VAE")
    if copy_vae is None:
        copy_vae = latent and run.encoder.vae_name not in KNOWN_VAES
    vae = run.encoder.vae if copy_vae else None
    return classes.IMMPipeline(network=network, scheduler=scheduler, vae=vae)


def export_diffusers(checkpoint, out, config: str | None = None, overrides=(), network_overrides=None,
                     overwrite: bool = False, copy_vae: bool | None = None) -> Path:
    """Write the pipeline of ``checkpoint`` (:func:`build_pipeline`) as a diffusers folder ``out``; returns it."""
    out = Path(out).expanduser()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it")
    pipe = build_pipeline(checkpoint, config, overrides, network_overrides, copy_vae)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.{os.urandom(8).hex()}.tmp"
    try:
        pipe.save_pretrained(work, safe_serialization=True)
        if out.is_symlink() or out.is_file():
            out.unlink()
        elif out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
