"""``imm generate``: sample grids like the release, or N seeded images for evaluation.

Grid mode writes ``OUT/<entry>_samples.png`` for every sampling entry of the config (the release's
output). With ``num_images`` it writes, per entry, ``OUT/<entry>/<index>.png`` and ``OUT/<entry>.npz``
(uint8 NHWC under ``arr_0``, class ids under ``arr_1`` for conditional nets: the ADM evaluator's
layout). Image i always uses seed ``seed + i`` for its label and starting noise, so any subset is
reproducible; under torchrun each rank takes every world_size-th index. An interrupted run continues
where it stopped: PNGs that decode completely are kept, damaged ones are drawn again.
``OUT/<entry>.settings.json`` records what the images of ``OUT/<entry>/`` come from (a digest of the
network's tensors, the network configuration, the seed, the sampling entry, the encoder and the
labels rule); a run with other settings into the same folder is refused instead of mixing the two.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from imm.core import distributed, threads
from imm.core.config import ConfigError, apply_overrides, load_config
from imm.data.encoders import build_encoder
from imm.evaluation.toy_metrics import toy2d_sliced_w2
from imm.io.checkpoint import (
    CheckpointError,
    atomic_write,
    network_from_tensors,
    read_checkpoint,
    read_sampling_settings,
)
from imm.io.images import load_png, save_grid, save_png, save_scatter, to_hwc
from imm.methods import registry as methods
from imm.model.sampling import sample

SAMPLER_NAMES = {"pushforward_generator_fn": "pushforward", "restart_generator_fn": "restart",
                 "pushforward": "pushforward", "restart": "restart"}
ENTRY_KEYS = ("name", "discretization", "num_steps", "mid_nt", "cfg_scale", "cfg_interval")


def sampling_entries(cfg: dict) -> dict[str, dict]:
    """The config's ``sampling:`` section as keyword arguments of :func:`imm.sample`."""
    section = cfg.get("sampling") or {}
    if not isinstance(section, dict) or not section:
        raise ConfigError("the config has no sampling entries (a `sampling:` section of named entries)")
    entries = {}
    for name, entry in section.items():
        entry = dict(entry or {})
        unknown = set(entry) - set(ENTRY_KEYS)
        if unknown:
            raise ConfigError(f"sampling entry {name!r}: unknown keys {sorted(unknown)}; allowed: {', '.join(ENTRY_KEYS)}")
        sampler = entry.pop("name", "pushforward_generator_fn")
        if sampler not in SAMPLER_NAMES:
            raise ConfigError(f"sampling entry {name!r}: unknown sampler {sampler!r}; use pushforward_generator_fn or restart_generator_fn")
        entries[str(name)] = dict(sampler=SAMPLER_NAMES[sampler], **entry)
    return entries


# The network shape (channels, resolution, label_dim) of each preset that samples, for naming the right one.
PRESET_SHAPES = {"cifar10": (3, 32, 0), "imagenet256": (4, 32, 1000), "mnist": (1, 32, 10), "toy2d": (2, 1, 0)}
DEFAULT_CONFIG = "cifar10"  # for files that record no settings (the released cifar10.pt among them)


def sampling_config(config: str | None, checkpoint, overrides: list[str]) -> tuple[dict, str]:
    """The config ``imm generate`` and ``imm eval fid`` sample with, and how to name it in messages:
    ``--config`` when given; else the encoder, sampling entries and eval settings the checkpoint records
    (``imm train`` writes them into its files); else the ``cifar10`` preset. :func:`check_fits` then
    refuses a network that does not fit it, naming the right ``--config``."""
    if config is None and checkpoint:
        settings = read_sampling_settings(checkpoint)
        if settings and settings.get("sampling"):
            settings = {**settings, "eval": {"resume": None, "seed": 0, "batch_size": 64, **(settings.get("eval") or {})}}
            return apply_overrides(settings, overrides), f"the settings recorded in {checkpoint}"
    config = config or DEFAULT_CONFIG
    return apply_overrides(load_config(config), overrides), f"--config {config}"


def training_method(cfg: dict) -> str:
    """The ``loss.method`` the network was trained with (a checkpoint of ``imm train`` records it), ``imm``
    when the config does not say; checked against ``imm.methods.registry.METHODS``."""
    method = (cfg.get("loss") or {}).get("method") or "imm"
    methods.get(method)
    return method


def check_fits(net, encoder, entries: dict, source: str) -> None:
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
    guided = [name for name, entry in entries.items() if entry.get("cfg_scale") is not None]
    if guided and not net.label_dim:
        raise ConfigError(f"{source}: the sampling entries {', '.join(guided)} use guidance (cfg_scale) but {what}: {hint}")


def network_from_config(cfg: dict, checkpoint, network_overrides: dict, device) -> torch.nn.Module:
    """Build the network from the checkpoint's own configuration (or the config's ``network:``
    section when the file carries none), with ``network_overrides`` on top, and load its weights."""
    file_config, tensors = read_checkpoint(checkpoint)
    if file_config is None:
        section = {k: v for k, v in (cfg.get("network") or {}).items() if k != "class_name"}
        file_config = {"img_resolution": cfg.get("resolution"), "img_channels": cfg.get("channels"),
                       "label_dim": cfg.get("label_dim", 0), **section}
    config = {**file_config, **{k: v for k, v in network_overrides.items() if k != "class_name"}}
    return network_from_tensors(config, tensors, str(checkpoint), device)


def _draw_label(net, g: torch.Generator) -> int:
    """The first draw of an image's generator: its class id (drawn for unconditional nets too)."""
    return int(torch.randint(0, max(net.label_dim, 1), (), generator=g))


def seeded_inputs(net, indices, seed: int):
    """Starting noise (sigma_data * N(0, I)) and class ids of the images ``indices``, each from seed + index."""
    noises, labels = [], []
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    for i in indices:
        g = torch.Generator().manual_seed(int(seed) + int(i))
        labels.append(_draw_label(net, g))
        noises.append(torch.randn(shape, generator=g) * net.sigma_data)
    labels_t = torch.tensor(labels, dtype=torch.long) if net.label_dim else None
    return torch.stack(noises), labels_t


def generate_grids(net, encoder, entries: dict, out: Path, batch_size: int, seed: int, device,
                   toy_target: str | None = None, sample_fn=sample) -> list[Path]:
    """One ``<entry>_samples.png`` per entry from the same batch of starting points: a grid of images, or
    for a network of 2-D points (the toy2d preset) a scatter plot, over the ``toy_target`` distribution
    with the sliced W2 to it when that is named. ``sample_fn``: :func:`imm.sample` or the network's
    training method's sampler (``imm.methods.registry.entry_sampler``)."""
    noise, labels = seeded_inputs(net, range(batch_size), seed)
    paths = []
    for name, kwargs in entries.items():
        g = torch.Generator(device=device).manual_seed(int(seed))
        x = sample_fn(net, noise.to(device), None if labels is None else labels.to(device), generator=g, **kwargs)
        decoded = encoder.decode(x).cpu()
        path = out / f"{name}_samples.png"
        if decoded.dtype == torch.uint8:
            save_grid(decoded, path, nrow=int(math.sqrt(batch_size)))
        else:
            points = decoded.reshape(batch_size, -1).float()
            title, target = f"{name}: {batch_size} samples", None
            if toy_target:
                sw2, target = toy2d_sliced_w2({name: points}, toy_target)
                title += f", sliced W2 {sw2[name]:.3f}"
            save_scatter({title: points}, path, target)
        paths.append(path)
    return paths


LABELS_RULE = "image i: class id = first torch.randint(0, label_dim) of torch.Generator().manual_seed(seed + i)"


def weights_digest(net) -> str:
    """sha256 over the network's tensors (names, dtypes, shapes, bytes): the same for the same weights
    in any file format."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name} {t.dtype} {t.numel()}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def image_settings(net, digest: str, entry: dict, seed: int, encoder_cfg, method: str = "imm") -> dict:
    """What the images of one sampling entry depend on, as plain JSON data."""
    settings = {"weights_sha256": digest, "network": net.config, "seed": int(seed), "sampling": entry,
                "encoder": encoder_cfg, "labels": LABELS_RULE}
    if method != "imm":  # (IMM's settings files stay as they were)
        settings["method"] = method
    return json.loads(json.dumps(settings, sort_keys=True))


def _differences(recorded, settings: dict) -> list[str]:
    """``key: old there, new now`` for each differing top-level key (or sub-key of a dict)."""
    if not isinstance(recorded, dict):
        return [f"the file holds {type(recorded).__name__}, not settings"]

    def shown(value) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    out = []
    for key in sorted(set(recorded) | set(settings)):
        old, new = recorded.get(key), settings.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += [f"{key}.{k}: {shown(old.get(k))} there, {shown(new.get(k))} now"
                    for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            out.append(f"{key}: {shown(old)} there, {shown(new)} now")
    return out


def claim_folder(folder: Path, settings: dict) -> None:
    """Make sure ``folder`` holds images of ``settings`` only: rank 0 records them in
    ``<folder>.settings.json`` on first use; every rank refuses (ConfigError naming the folder and what
    differs) a folder of other images."""
    path = folder.with_name(folder.name + ".settings.json")
    advice = "pass another --out (or delete the folder)"
    if path.exists():
        if not path.is_file():  # a FIFO would block the read
            raise ConfigError(f"{path}: not a regular file; {advice}")
        try:
            recorded = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"{path}: unreadable settings ({e}); {advice}") from None
        differs = _differences(recorded, settings)
        if differs:
            shown = "; ".join(differs[:4]) + (f"; ... ({len(differs)} in all)" if len(differs) > 4 else "")
            raise ConfigError(f"{folder} holds images of other settings ({shown}); {advice}")
    elif any(folder.glob("*.png")):
        raise ConfigError(f"{folder} holds PNGs but there is no {path.name}, so they may come from other settings; "
                          f"{advice}")
    elif distributed.is_main():
        text = json.dumps(settings, indent=1, sort_keys=True) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    distributed.barrier()  # no rank writes images before every rank has checked the folder


def _readable(path: Path) -> bool:
    try:
        load_png(path)
        return True
    except ValueError:
        return False


def generate_images(net, encoder, entries: dict, out: Path, num_images: int, batch_size: int, seed: int,
                    device, progress: bool = True, encoder_cfg=None, method: str = "imm") -> list[Path]:
    """``num_images`` seeded images per entry, as PNGs and one ADM-style .npz per entry, sampled by the
    sampler of the network's training ``method`` (``imm.methods.registry.entry_sampler``)."""
    sample_fn = methods.entry_sampler(method)
    rank, world = distributed.rank(), distributed.world_size()
    digest = weights_digest(net)
    npz_paths = []
    for name, kwargs in entries.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        claim_folder(folder, image_settings(net, digest, kwargs, seed, encoder_cfg, method))
        todo = [i for i in range(rank, num_images, world) if not _readable(folder / f"{i:06d}.png")]
        batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
        bar = tqdm(batches, desc=name, unit="batch", disable=not (progress and distributed.is_main()))
        for indices in bar:
            threads.tick()
            noise, labels = seeded_inputs(net, indices, seed)
            g = torch.Generator(device=device).manual_seed(int(seed) + indices[0])
            x = sample_fn(net, noise.to(device), None if labels is None else labels.to(device), generator=g, **kwargs)
            for i, img in zip(indices, to_hwc(encoder.decode(x).cpu())):
                tmp = folder / f".{i:06d}.png.tmp"
                save_png(img, tmp)
                os.replace(tmp, folder / f"{i:06d}.png")
        distributed.barrier()
        npz = out / f"{name}.npz"
        if distributed.is_main():
            arrays = {"arr_0": np.stack([load_png(folder / f"{i:06d}.png") for i in range(num_images)])}
            if net.label_dim:
                arrays["arr_1"] = seeded_labels(net, range(num_images), seed)
            atomic_write(npz, lambda tmp: _save_npz(tmp, arrays))
        distributed.barrier()
        npz_paths.append(npz)
    return npz_paths


def _save_npz(path, arrays: dict) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
        np.savez(f, **arrays)


def seeded_labels(net, indices, seed: int) -> np.ndarray:
    """Class ids of images ``indices`` (the same draw as :func:`seeded_inputs`), without the noise."""
    return np.array([_draw_label(net, torch.Generator().manual_seed(int(seed) + int(i))) for i in indices], dtype=np.int64)


def run(cfg: dict, checkpoint, out, network_overrides: dict, device=None, num_images: int | None = None,
        entries: list[str] | None = None, progress: bool = True, source: str = "the config") -> list[Path]:
    """Everything ``imm generate`` does after parsing its arguments."""
    device = distributed.init(device)
    distributed.set_tf32(device)
    eval_cfg = cfg.get("eval") or {}
    checkpoint = checkpoint or eval_cfg.get("resume")
    if not checkpoint:
        raise CheckpointError("no checkpoint given: pass --checkpoint PATH (or eval.resume=PATH)")
    all_entries = sampling_entries(cfg)
    if entries:
        missing = [e for e in entries if e not in all_entries]
        if missing:
            raise ConfigError(f"unknown sampling entries {missing}; the config has {', '.join(all_entries)}")
        all_entries = {e: all_entries[e] for e in entries}
    batch_size = int(eval_cfg.get("batch_size") or 64)
    seed = int(eval_cfg.get("seed") or 0)
    method = training_method(cfg)
    net = network_from_config(cfg, checkpoint, network_overrides, device)
    encoder = build_encoder(cfg.get("encoder"))
    check_fits(net, encoder, all_entries, source)
    encoder.init(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if num_images is None:
        dataset = cfg.get("dataset") or {}
        toy_target = dataset.get("name") if dataset.get("kind") == "toy2d" else None
        return generate_grids(net, encoder, all_entries, out, batch_size, seed, device, toy_target,
                              methods.entry_sampler(method))
    if num_images < 1:
        raise ConfigError("--num-images must be at least 1")
    return generate_images(net, encoder, all_entries, out, num_images, batch_size, seed, device, progress,
                           cfg.get("encoder"), method)
