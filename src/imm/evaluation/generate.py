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
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from imm.core import distributed, threads
from imm.core.config import ConfigError
from imm.core.files import check_subfolders, write_text
from imm.core.release import canonical
from imm.evaluation.sampling_run import SamplingRun, resolve_sampling_run
from imm.evaluation.toy_metrics import toy2d_sliced_w2
from imm.io.arrays import write_npz
from imm.io.images import load_png, save_grid, save_png, save_scatter, to_hwc
from imm.model.sampling import SamplingEntry


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


def draw_samples(net, encoder, sample_fn, kwargs: dict, indices, seed: int, device) -> torch.Tensor:
    """The decoded samples of images ``indices``: image i from seed ``seed + i`` (its label and starting
    noise), the sampler's own randomness from the seed of the first image; ``sample_fn`` has
    :func:`imm.sample`'s call and ``kwargs`` are its sampling arguments."""
    noise, labels = seeded_inputs(net, indices, seed)
    g = torch.Generator(device=device).manual_seed(int(seed) + int(indices[0]))
    x = sample_fn(net, noise.to(device), None if labels is None else labels.to(device), generator=g, **kwargs)
    return encoder.decode(x)


def draw(run: SamplingRun, entry: SamplingEntry, indices) -> torch.Tensor:
    """:func:`draw_samples` of one entry of a resolved sampling run."""
    return draw_samples(run.sampling_net, run.encoder, run.sample_fn, entry.kwargs(), indices, run.eval.seed,
                        run.device)


def generate_grids(run: SamplingRun, out: Path, toy_target: str | None = None) -> list[Path]:
    """One ``<entry>_samples.png`` per entry from the same ``eval.batch_size`` starting points: a grid of
    images, or for a network of 2-D points (the toy2d preset) a scatter plot, over the ``toy_target``
    distribution with the sliced W2 to it when that is named."""
    batch_size = run.eval.batch_size
    paths = []
    for name, entry in run.entries.items():
        decoded = draw(run, entry, range(batch_size)).cpu()
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


def image_settings(net, digest: str, entry: SamplingEntry, seed: int, encoder_cfg, method: str = "imm",
                   precision: str = "fp32") -> dict:
    """What the images of one sampling entry depend on, as plain JSON data."""
    settings = {"weights_sha256": digest, "network": net.config, "seed": int(seed), "sampling": entry.kwargs(),
                "encoder": encoder_cfg, "labels": LABELS_RULE}
    if method != "imm":  # IMM's settings have no method key, so they match files written without one
        settings["method"] = method
    if precision == "bf16":  # fp32 settings have no precision key, as files written before bf16 sampling
        settings["precision"] = precision
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
        if isinstance(recorded, dict) and isinstance(recorded.get("encoder"), dict):  # its encoder in the canonical form
            recorded = {**recorded, "encoder": canonical({"encoder": recorded["encoder"]})["encoder"]}
        differs = _differences(recorded, settings)
        if differs:
            shown = "; ".join(differs[:4]) + (f"; ... ({len(differs)} in all)" if len(differs) > 4 else "")
            raise ConfigError(f"{folder} holds images of other settings ({shown}); {advice}")
    elif any(folder.glob("*.png")):
        raise ConfigError(f"{folder} holds PNGs but there is no {path.name}, so they may come from other settings; "
                          f"{advice}")
    elif distributed.is_main():
        text = json.dumps(settings, indent=1, sort_keys=True) + "\n"
        write_text(path, text)
    distributed.barrier()  # no rank writes images before every rank has checked the folder


def _readable(path: Path) -> bool:
    try:
        load_png(path)
        return True
    except ValueError:
        return False


def generate_images(run: SamplingRun, out: Path, num_images: int, progress: bool = True, encoder_cfg=None) -> list[Path]:
    """``num_images`` seeded images per entry, as PNGs and one ADM-style .npz per entry."""
    net, seed, batch_size = run.net, run.eval.seed, run.eval.batch_size
    rank, world = distributed.rank(), distributed.world_size()
    digest = weights_digest(net)
    npz_paths = []
    for name, entry in run.entries.items():
        check_subfolders(out, [name])
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        claim_folder(folder, image_settings(net, digest, entry, seed, encoder_cfg, run.method, run.fast.precision))
        todo = [i for i in range(rank, num_images, world) if not _readable(folder / f"{i:06d}.png")]
        batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
        bar = tqdm(batches, desc=name, unit="batch", disable=not (progress and distributed.is_main()))
        for indices in bar:
            threads.tick()
            for i, img in zip(indices, to_hwc(draw(run, entry, indices).cpu())):
                save_png(img, folder / f"{i:06d}.png")  # complete or absent (imm.core.files.atomic_write)
        distributed.barrier()
        npz = out / f"{name}.npz"
        if distributed.is_main():
            arrays = {"arr_0": np.stack([load_png(folder / f"{i:06d}.png") for i in range(num_images)])}
            if net.label_dim:
                arrays["arr_1"] = seeded_labels(net, range(num_images), seed)
            write_npz(npz, arrays)
        distributed.barrier()
        npz_paths.append(npz)
    return npz_paths


def seeded_labels(net, indices, seed: int) -> np.ndarray:
    """Class ids of images ``indices`` (the same draw as :func:`seeded_inputs`), without the noise."""
    return np.array([_draw_label(net, torch.Generator().manual_seed(int(seed) + int(i))) for i in indices], dtype=np.int64)


def run(cfg: dict, checkpoint, out, network_overrides: dict, device=None, num_images: int | None = None,
        entries: list[str] | None = None, progress: bool = True, source: str = "the config",
        seed: int | None = None, batch_size: int | None = None, precision: str = "auto",
        memory_format: str = "auto") -> list[Path]:
    """Everything ``imm generate`` does after parsing its arguments."""
    device = distributed.init(device)
    distributed.set_tf32(device)
    if num_images is not None and num_images < 1:
        raise ConfigError("--num-images must be at least 1")
    run = resolve_sampling_run(cfg, checkpoint, device, network_overrides=network_overrides, source=source,
                               names=entries, seed=seed, batch_size=batch_size, precision=precision,
                               memory_format=memory_format)
    if distributed.is_main() and progress:
        print(f"imm generate: sampling in {run.fast.describe()}", file=sys.stderr)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if num_images is None:
        dataset = cfg.get("dataset") or {}
        return generate_grids(run, out, dataset.get("name") if dataset.get("kind") == "toy2d" else None)
    return generate_images(run, out, num_images, progress, cfg.get("encoder"))
