"""``imm prepare latents``: encode an image archive into an EDM2-style latent archive with the SD VAE.

Output (a folder, or a zip built from a work folder ``DEST.zip.work`` next to it):

* per image ``SSSSS/imgIIIIIIII.npy``: float32 (or float16) ``[2C, h, w]``, the VAE posterior's mean
  and standard deviation concatenated on channels (``imm.data.encoders.StabilityVAEEncoder.encode_pixels``:
  8 x 32 x 32 for the SD VAE at 256 px). Item ``i`` is the ``i``-th image of the source in sorted
  order; folder ``SSSSS`` is shard ``i // shard_size`` (1000 per shard/folder by default, i.e.
  EDM's ``00000/img00000000.npy`` layout);
* ``dataset.json``: ``{"labels": [["00000/img00000000.npy", class_id], ...] | null}`` (plus
  ``class_names`` when the source has them);
* ``DEST_STEM.stats.json`` next to the archive: the per-channel mean and standard deviation of raw
  latent samples ``z = mean + std * eps`` (what ``encoder.raw_mean`` / ``encoder.raw_std`` whiten),
  computed from **exact moments**, not from samples: ``E[z] = mean`` and ``E[z^2] = mean^2 + std^2``
  per pixel, averaged over every pixel of every image, ``raw_std = sqrt(E[z^2] - E[z]^2)``.

Work is split into fixed shards; ranks under ``torchrun`` take every ``world``-th unfinished shard.
A shard is encoded into a hidden temporary folder, finished with its statistics file
(``.shard.json``: count, shape, dtype, per-channel sums, number of non-finite values) and renamed
into place, so an interrupted run keeps every finished shard and a rerun skips them. After a
barrier, rank 0 checks the shards (item counts, shapes, finiteness), writes ``dataset.json`` and the
statistics, and for a ``.zip`` destination packs the work folder into the zip atomically and removes
the work folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from imm.core import distributed
from imm.core.errors import InputError, MissingError, StateError
from imm.core.files import atomic_write, write_text
from imm.data.encoders import SD_VAE_NAME, SD_VAE_RAW_MEAN, SD_VAE_RAW_STD, StabilityVAEEncoder

SHARD_META = ".shard.json"
RUN_META = ".latents.json"
DTYPES = ("float32", "float16")


def latent_name(index: int, shard_size: int = 1000) -> str:
    return f"{index // shard_size:05d}/img{index:08d}.npy"


def stats_path_for(dest) -> Path:
    """``/data/in256-latents(.zip)`` -> ``/data/in256-latents.stats.json``."""
    dest = Path(dest)
    stem = dest.name[:-4] if dest.name.lower().endswith(".zip") else dest.name
    return dest.with_name(f"{stem}.stats.json")


def _write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def _encode_shard(ds, encoder, work: Path, k: int, shard_size: int, batch_size: int, dtype: str,
                  device, workers: int, bar) -> int:
    """Encode shard ``k`` into ``work/.tmp-k-rank`` and rename it to ``work/k``; returns its count."""
    lo, hi = k * shard_size, min(len(ds), (k + 1) * shard_size)
    tmp = work / f".tmp-{k:05d}-{distributed.rank()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(lo, hi)), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    sum_mean = sum_sq = sum_std = None
    nonfinite, shape, i = 0, None, lo
    for x, _ in loader:
        raw = encoder.encode_pixels(x.to(device, non_blocking=True)).cpu().numpy().astype(dtype)
        shape = shape or list(raw.shape[1:])
        for item in raw:
            np.save(tmp / f"img{i:08d}.npy", item)
            i += 1
        v = raw.astype(np.float64)
        mean, std = np.split(v, 2, axis=1)
        nonfinite += int((~np.isfinite(v)).sum())
        parts = (mean.sum(axis=(0, 2, 3)), (mean**2 + std**2).sum(axis=(0, 2, 3)), std.sum(axis=(0, 2, 3)))
        if sum_mean is None:
            sum_mean, sum_sq, sum_std = parts
        else:
            sum_mean, sum_sq, sum_std = sum_mean + parts[0], sum_sq + parts[1], sum_std + parts[2]
        bar.update(len(raw))
    meta = {"shard": k, "start": lo, "count": hi - lo, "shape": shape, "dtype": dtype,
            "pixels": (hi - lo) * shape[1] * shape[2], "sum_mean": sum_mean.tolist(), "sum_sq": sum_sq.tolist(),
            "sum_std": sum_std.tolist(), "nonfinite": nonfinite}
    (tmp / SHARD_META).write_text(json.dumps(meta) + "\n")
    final = work / f"{k:05d}"
    if final.exists():  # an unfinished leftover (no .shard.json): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)  # the shard is finished exactly when this rename happened
    return hi - lo


def write_latent_archive(source, dest, vae: str = SD_VAE_NAME, batch_size: int = 64, dtype: str = "float32",
                   shard_size: int = 1000, device=None, use_fp16: bool = True, workers: int | None = None,
                   progress: bool = True, max_shards: int | None = None, log=print) -> dict | None:
    """Encode the image archive ``source`` into the latent archive ``dest`` (see the module docstring).

    Call it in every ``torchrun`` rank. Returns the result (statistics, paths) on rank 0 and None on
    the others. ``max_shards`` stops each rank after encoding that many shards (a test hook: the run
    is then unfinished and is completed by calling again); the result then has ``finished: False``.
    """
    from tqdm import tqdm

    from imm.data.datasets import ImageFolderDataset

    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if int(batch_size) < 1 or int(shard_size) < 1:
        raise InputError("--batch-size and --shard-size must be at least 1")
    if not os.path.exists(os.path.expanduser(os.fspath(source))):
        raise MissingError(f"source {source} does not exist (make it with `imm prepare images`)")
    dest = Path(os.path.expanduser(os.fspath(dest)))
    is_zip = dest.name.lower().endswith(".zip")
    work = dest.with_name(dest.name + ".work") if is_zip else dest
    if is_zip and dest.exists():
        raise InputError(f"{dest} already exists (delete it to encode again)")
    if work.exists() and not work.is_dir():
        raise InputError(f"{work} exists and is not a folder")
    device = distributed.init(device)
    rank, world = distributed.rank(), distributed.world_size()

    ds = ImageFolderDataset(source)
    if ds.dtype != torch.uint8 or ds.num_channels != 3:
        raise InputError(f"{source} holds {ds.num_channels}-channel {str(ds.dtype).replace('torch.', '')} items; "
                         "the VAE needs RGB images (make them with `imm prepare images`)")
    n = len(ds)
    num_shards = math.ceil(n / shard_size)
    run_meta = {"source": str(Path(ds.path).resolve()), "count": n, "resolution": ds.resolution, "vae": str(vae),
                "dtype": dtype, "shard_size": int(shard_size)}
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        for stale in work.glob(".tmp-*"):  # shards a killed run was writing
            shutil.rmtree(stale, ignore_errors=True)
        if not (work / RUN_META).exists():
            _write_json(work / RUN_META, run_meta)
    distributed.barrier()
    previous = json.loads((work / RUN_META).read_text())
    if previous != run_meta:
        diff = ", ".join(f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in run_meta.items() if previous.get(k) != v)
        raise InputError(f"{work} holds shards of a run with other settings ({diff}); delete it or choose "
                         "another --dest")
    todo = [k for k in range(num_shards) if not (work / f"{k:05d}" / SHARD_META).exists()]
    if rank == 0:
        log(f"{n:,} images in {num_shards} shards of {shard_size}; {num_shards - len(todo)} already done "
            f"(skipped), {len(todo)} to encode on {world} process(es)")
    mine = todo[rank::world]
    if max_shards is not None:
        mine = mine[: int(max_shards)]

    encoded, start = 0, time.perf_counter()
    if mine:
        encoder = StabilityVAEEncoder(vae_name=str(vae), batch_size=int(batch_size), use_fp16=use_fp16)
        encoder.init(device)
        start = time.perf_counter()  # throughput without loading the VAE
        workers = (4 if device.type == "cuda" else 0) if workers is None else int(workers)
        total = sum(min(n, (k + 1) * shard_size) - k * shard_size for k in mine)
        with tqdm(total=total, unit="img", desc=f"encode (rank {rank})", disable=not progress,
                  position=rank) as bar:
            for k in mine:
                encoded += _encode_shard(ds, encoder, work, k, int(shard_size), int(batch_size), dtype, device,
                                         workers, bar)
    seconds = time.perf_counter() - start
    distributed.barrier()
    if rank != 0:
        return None
    rate = encoded / seconds if encoded and seconds > 0 else None
    if encoded:
        log(f"rank 0 encoded {encoded:,} images in {seconds:.1f} s ({rate:.1f} img/s on {device})")
    missing = [k for k in range(num_shards) if not (work / f"{k:05d}" / SHARD_META).exists()]
    if missing:
        if max_shards is None:
            raise StateError(f"shards {missing[:5]} of {work} were not written; rerun to finish")
        return {"finished": False, "remaining_shards": len(missing), "work": str(work), "encoded": encoded}
    result = _finalize(ds, work, num_shards, int(shard_size), run_meta, stats_path_for(dest), log)
    if is_zip:
        _pack(work, dest, num_shards, progress)
        shutil.rmtree(work)
    result.update(finished=True, path=str(dest), encoded=encoded, seconds=round(seconds, 3),
                  images_per_second=None if rate is None else round(rate, 2))
    return result


def _finalize(ds, work: Path, num_shards: int, shard_size: int, run_meta: dict, stats_path: Path, log) -> dict:
    """Check every shard, write dataset.json and the statistics file; return the statistics."""
    n = len(ds)
    shape = dtype = None
    sum_mean = sum_sq = sum_std = 0.0
    pixels = count = 0
    for k in range(num_shards):
        folder = work / f"{k:05d}"
        m = json.loads((folder / SHARD_META).read_text())
        expected = min(n, (k + 1) * shard_size) - k * shard_size
        files = sum(1 for f in os.listdir(folder) if f.endswith(".npy"))
        where = f"shard {folder}"
        if m["count"] != expected or files != expected:
            raise StateError(f"{where} has {files} files ({m['count']} recorded) but should have {expected}; "
                               "delete that folder and rerun to encode it again")
        if shape is None:
            shape, dtype = m["shape"], m["dtype"]
        if m["shape"] != shape or m["dtype"] != dtype:
            raise StateError(f"{where} holds {m['dtype']} {m['shape']} latents, shard 00000 {dtype} {shape}")
        if m["nonfinite"]:
            raise StateError(f"{where} holds {m['nonfinite']} non-finite values (NaN/inf from the VAE); "
                               "delete that folder and rerun (with --no-fp16 if it persists)")
        sum_mean = sum_mean + np.asarray(m["sum_mean"])
        sum_sq = sum_sq + np.asarray(m["sum_sq"])
        sum_std = sum_std + np.asarray(m["sum_std"])
        pixels += m["pixels"]
        count += m["count"]
    if count != n:
        raise StateError(f"{work} holds {count} latents but the source has {n} images")

    labels = None
    if ds.label_dim:
        labels = [[latent_name(i, shard_size), int(ds.labels[i])] for i in range(n)]
    meta = {"labels": labels}
    if labels is not None and ds.class_names:
        meta["class_names"] = list(ds.class_names)
    _write_json(work / "dataset.json", meta)

    raw_mean = sum_mean / pixels
    raw_std = np.sqrt(np.maximum(sum_sq / pixels - raw_mean**2, 0.0))
    fmt = lambda v: "[" + ",".join(f"{x:.8g}" for x in v) + "]"
    overrides = f"encoder.raw_mean={fmt(raw_mean)} encoder.raw_std={fmt(raw_std)}"
    stats = {
        "count": count, "shape": shape, "dtype": dtype, "channels": len(raw_mean), "label_dim": int(ds.label_dim),
        "raw_mean": raw_mean.tolist(), "raw_std": raw_std.tolist(),
        "posterior_std_mean": (sum_std / pixels).tolist(),
        "method": "exact moments of z = mean + std * eps: E[z] = mean, E[z^2] = mean^2 + std^2, averaged "
                  "over all pixels of all images; raw_std = sqrt(E[z^2] - E[z]^2)",
        "vae": run_meta["vae"], "source": run_meta["source"], "shard_size": shard_size,
        "overrides": overrides,
    }
    _write_json(stats_path, stats)
    log(f"checked {num_shards} shards: {count:,} latents of shape {'x'.join(map(str, shape))} ({dtype}), all finite")
    log(f"wrote {stats_path}")
    log("per-channel statistics of raw latent samples (paste as overrides):")
    log(f"  {overrides}")
    if len(raw_mean) == len(SD_VAE_RAW_MEAN):
        log(f"  release (presets/imagenet256.yaml, sd-vae-ft-ema on ImageNet): raw_mean={fmt(SD_VAE_RAW_MEAN)} "
            f"raw_std={fmt(SD_VAE_RAW_STD)}")
    stats["stats_path"] = str(stats_path)
    return stats


def _pack(work: Path, dest: Path, num_shards: int, progress: bool) -> None:
    """Zip the finished work folder (dataset.json + shard folders, no hidden files) atomically."""
    from tqdm import tqdm

    def write_zip(tmp) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.write(work / "dataset.json", "dataset.json")
            for k in tqdm(range(num_shards), unit="shard", desc="zip", disable=not progress):
                folder = work / f"{k:05d}"
                for f in sorted(os.listdir(folder)):
                    if f.endswith(".npy"):
                        zf.write(folder / f, f"{k:05d}/{f}")

    atomic_write(dest, write_zip)
