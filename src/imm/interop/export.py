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
from dataclasses import dataclass
from pathlib import Path

from imm.core.errors import InputError, MissingPackageError
from imm.data.encoders import KNOWN_VAES, StabilityVAEEncoder
from imm.evaluation.sampling_run import SamplingRun, resolve_sampling_run, sampling_config
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


@dataclass
class Source:
    """A checkpoint read as ``imm generate`` reads it: the file (:func:`checkpoint_file`), the sampling config
    (its recorded settings, else ``--config``) and the resolved sampling run (network on the CPU, method,
    entries, encoder not loaded)."""

    path: str
    config: dict
    run: SamplingRun


def read_source(checkpoint, config: str | None = None, overrides=(), network_overrides=None) -> Source:
    """:class:`Source` of ``checkpoint``; ``network_overrides`` as ``imm generate``'s ``network.KEY=VALUE``."""
    path = checkpoint_file(checkpoint)
    cfg, described = sampling_config(config, path, list(overrides))
    run = resolve_sampling_run(cfg, path, "cpu", source=described, network_overrides=network_overrides,
                               load_encoder=False)
    return Source(path, cfg, run)


def build_pipeline(source: Source, copy_vae: bool | None = None):
    """The :class:`IMMPipeline` of ``source`` (fp32, on the CPU), with its sampling entries, method and
    encoder. ``copy_vae``: a latent network's VAE is loaded now and becomes the ``vae`` component; else the
    encoder names it and the pipeline loads it when it decodes, which it does only for a Hub id of
    :data:`imm.data.encoders.KNOWN_VAES` (None, the default: copy any other VAE)."""
    classes = load_pipeline_classes()
    run, net = source.run, source.run.net
    network = classes.IMMNetworkModel(network_config=_plain(net.config))
    network.network.load_state_dict(net.state_dict())
    network.eval()
    scheduler = classes.IMMScheduler(
        method=run.method, entries={name: _plain(entry.kwargs()) for name, entry in run.entries.items()},
        encoder=_plain(dict(source.config.get("encoder") or {})), noise_schedule=net.noise_schedule,
        f_type=net.f_type, temb_type=net.temb_type, T=float(net.T), eps=float(net.eps),
        sigma_data=float(net.sigma_data))
    latent = isinstance(run.encoder, StabilityVAEEncoder)
    if copy_vae and not latent:
        raise InputError(f"--copy-vae: {source.path} is a pixel-space network (encoder {run.encoder!r}); it has no VAE")
    if copy_vae is None:
        copy_vae = latent and run.encoder.vae_name not in KNOWN_VAES
    vae = run.encoder.vae if copy_vae else None
    return classes.IMMPipeline(network=network, scheduler=scheduler, vae=vae)


def write_folder(out, fill, overwrite: bool = False) -> Path:
    """``fill(folder)`` into a temporary folder next to ``out``, renamed to ``out`` when complete (an existing
    ``out`` only with ``overwrite``, or when it is an empty folder); returns ``out``."""
    out = Path(out).expanduser()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.{os.urandom(8).hex()}.tmp"
    try:
        work.mkdir()
        fill(work)
        if out.is_symlink() or out.is_file():
            out.unlink()
        elif out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def export_diffusers(checkpoint, out, config: str | None = None, overrides=(), network_overrides=None,
                     overwrite: bool = False, copy_vae: bool | None = None) -> Path:
    """Write the pipeline of ``checkpoint`` (:func:`read_source`, :func:`build_pipeline`) as a diffusers
    folder ``out``; returns it."""
    pipe = build_pipeline(read_source(checkpoint, config, overrides, network_overrides), copy_vae)
    return write_folder(out, lambda folder: pipe.save_pretrained(folder, safe_serialization=True), overwrite)
