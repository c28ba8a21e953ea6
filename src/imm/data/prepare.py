"""``imm prepare images`` and ``imm prepare stats``: make and inspect training datasets.

``prepare_images`` turns a folder or a zip archive of images into an EDM-style zip of PNGs:

* items ``00000/img00000000.png``, ``00000/img00000001.png``, ... (1000 per folder), numbered in the
  sorted order of the source paths;
* ``dataset.json`` = ``{"labels": [["00000/img00000000.png", class_id], ...], "class_names": [...]}``
  (``"labels": null`` and no ``class_names`` when unlabelled). The source is read by
  :class:`imm.data.source.Source`, as training reads it: labels from a ``dataset.json`` in the source
  (EDM's format or the others that module lists), else from class folders by the rule of
  :mod:`imm.data.scan` (after dropping the leading folders that all files share, the top-level folder
  of each file is its class when there are at least two such folders; sorted names -> ids ``0 .. K-1``).
* every image is RGB (grayscale, palette, CMYK, alpha ... are converted; 16-bit samples are scaled
  to 8 bits with rounding, see :func:`decode_image`) and ``resolution`` square after one of
  :data:`TRANSFORMS` (or, without a transform, must already be that size);
* files that are not regular files (FIFOs, devices: never opened), unreadable files, images of a bit
  depth :func:`decode_image` cannot scale and images whose shorter side is below ``min_size`` are
  skipped, counted and the first few named per reason;
* the archive is written to a temporary file next to ``dest`` and renamed at the end, so an
  interrupted run never leaves a finished-looking ``dest``.

``dataset_stats`` describes any dataset the trainer reads and writes a preview grid.
``imm prepare latents`` lives in :mod:`imm.data.latents`.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from imm.core.errors import InputError
from imm.core.files import atomic_write
from imm.data import scan
from imm.data.source import Source
from imm.io.images import open_image

TRANSFORMS = ("center-crop", "center-crop-dhariwal", "center-crop-wide")
ITEMS_PER_FOLDER = 1000
SHOWN_SKIPPED = 5  # file names per skip reason in the summary


def default_min_size(resolution: int) -> int:
    """Images whose shorter side is below this are skipped: ``resolution // 16``, at least 8 px."""
    return max(8, int(resolution) // 16)


def item_name(index: int, ext: str = "png") -> str:
    """EDM's archive layout: ``00000/img00000000.png``, 1000 items per folder."""
    return f"{index // ITEMS_PER_FOLDER:05d}/img{index:08d}.{ext}"


# --------------------------------------------------------------------------------------------------
# Transforms (PIL image in, RGB ``resolution`` x ``resolution`` PIL image out)


def center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Crop the largest centred square, resize it to ``resolution`` (LANCZOS)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    return img.resize((resolution, resolution), Image.LANCZOS)


def center_crop_dhariwal(img: Image.Image, resolution: int) -> Image.Image:
    """The ADM / DiT ImageNet crop: halve with BOX while the shorter side is >= 2 * resolution, resize
    (BICUBIC) so the shorter side is ``resolution``, then crop the centred ``resolution`` square."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(v // 2 for v in img.size), Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(v * scale) for v in img.size), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def center_crop_wide(img: Image.Image, resolution: int) -> Image.Image:
    """Crop the largest centred 2:1 (width:height) region, resize it to ``resolution x resolution/2``
    (LANCZOS) and paste it centred on a black ``resolution`` square."""
    w, h = img.size
    cw, ch = min(w, 2 * h), min(w, 2 * h) // 2
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.crop((left, top, left + cw, top + ch)).resize((resolution, resolution // 2), Image.LANCZOS)
    canvas = Image.new("RGB", (resolution, resolution))
    canvas.paste(img, (0, (resolution - resolution // 2) // 2))
    return canvas


_TRANSFORM_FNS = {"center-crop": center_crop, "center-crop-dhariwal": center_crop_dhariwal,
                  "center-crop-wide": center_crop_wide}


# Pillow decodes 16-bit-per-sample colour PNGs to the high byte of each sample (raw mode RGB;16B);
# the same data read as little-endian samples (RGB;16L) gives the low bytes.
_LOW_BYTES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}


def scale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 rounded to nearest (``v * 255 / 65535`` is never exactly ``k + 1/2``)."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def decode_image(data: bytes, name: str = "image") -> Image.Image | None:
    """An encoded image, decoded completely, as an 8-bit Pillow image; None for a bit depth with no
    exact 8-bit scaling here. 16-bit samples are scaled with :func:`scale_16bit`: grayscale (Pillow's
    ``I;16*`` modes, or ``I`` holding 0..65535) and 16-bit RGB/RGBA PNGs (both bytes of each sample).
    Other images with more than 8 bits per sample (16-bit gray+alpha PNGs, other formats' 16-bit
    colour, float or 32-bit images) give None. Truncated or corrupt data raise."""
    with open_image(io.BytesIO(data), name) as im:
        rawmode = im.tile[0][3] if im.tile else None
        im.load()
        if im.mode.startswith("I"):
            values = np.asarray(im)
            if values.size and (values.min() < 0 or values.max() > 65535):
                return None
            return Image.fromarray(scale_16bit(values), "L")
        if im.format == "PNG" and rawmode in _LOW_BYTES:
            high = np.asarray(im).astype(np.uint16)
            with open_image(io.BytesIO(data), name) as low:
                low.tile = [(t[0], t[1], t[2], _LOW_BYTES[rawmode]) for t in low.tile]
                low.load()
                return Image.fromarray(scale_16bit(high * 256 + np.asarray(low)), im.mode)
        if im.mode == "F" or ";16" in str(rawmode):
            return None
        return im.copy()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any 8-bit Pillow image as RGB (alpha is dropped, i.e. composited on black)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def apply_transform(img: Image.Image, transform: str | None, resolution: int, name: str = "image") -> Image.Image:
    """``img`` as an RGB ``resolution`` square; without ``transform`` it must have that size already."""
    img = to_rgb(img)
    if transform is None:
        if img.size != (resolution, resolution):
            raise InputError(f"{name} is {img.size[0]}x{img.size[1]}, not {resolution}x{resolution}; pass "
                             f"--transform ({' or '.join(TRANSFORMS)}) to crop and resize")
        return img
    try:
        fn = _TRANSFORM_FNS[transform]
    except KeyError:
        raise InputError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}") from None
    return fn(img, resolution)


# --------------------------------------------------------------------------------------------------
# imm prepare images

SKIP_REASONS = ("not a regular file", "unreadable", "unsupported bit depth", "too small")


def _process(source: Source, name: str, transform: str | None, resolution: int, min_size: int):
    """One source file -> ``(png bytes, None)`` or ``(None, skip reason)``; wrong size raises."""
    try:
        img = decode_image(source.read(name), name)  # decoded now: truncated and corrupt files fail here
        if img is None:
            return None, "unsupported bit depth"
        img = to_rgb(img)
    except Exception:
        return None, "unreadable"
    if min(img.size) < min_size:
        return None, "too small"
    out = apply_transform(img, transform, resolution, name)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue(), None


_WORKER_STATE = {}


def _worker_init(source, transform, resolution, min_size):
    _WORKER_STATE.update(source=source, args=(transform, resolution, min_size))


def _worker(name):
    return _process(_WORKER_STATE["source"], name, *_WORKER_STATE["args"])


def prepare_images(source, dest, resolution: int = 256, transform: str | None = None,
                   max_images: int | None = None, min_size: int | None = None, use_labels: bool = True,
                   workers: int = 1, progress: bool = True, overwrite: bool = False) -> dict:
    """Write the EDM-style PNG zip ``dest`` from ``source`` (see the module docstring).

    Returns ``{"path", "count", "skipped": {reason: [source names]}, "label_dim", "class_names"}``.
    """
    resolution = int(resolution)
    if resolution < 8:
        raise InputError(f"--resolution must be at least 8 pixels, got {resolution}")
    if transform is not None and transform not in TRANSFORMS:
        raise InputError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    if max_images is not None and int(max_images) < 1:
        raise InputError(f"--max-images must be at least 1, got {max_images}")
    min_size = default_min_size(resolution) if min_size is None else int(min_size)
    dest = Path(os.path.expanduser(os.fspath(dest)))
    if dest.suffix.lower() != ".zip":
        raise InputError(f"--dest must end with .zip, got {dest}")
    if dest.exists() and not overwrite:
        raise InputError(f"{dest} already exists (delete it, or pass --overwrite)")
    src = Source(source, use_labels=use_labels)
    if not src.files:
        raise InputError(f"source {src.path} holds no images (looked for {', '.join(scan.image_extensions())})")
    if src.path.resolve() == dest.resolve():
        raise InputError("--source and --dest are the same file")

    from tqdm import tqdm

    skipped = {"not a regular file": list(src.not_regular)} if src.not_regular else {}
    labels_out = []
    names = src.files
    label_of = None if src.labels is None else dict(zip(src.names, src.labels))
    pool, count = None, 0

    def write_zip(tmp) -> None:
        nonlocal pool, count
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            if workers > 1:
                import multiprocessing

                pool = multiprocessing.get_context("fork" if os.name == "posix" else "spawn").Pool(
                    workers, _worker_init, (src, transform, resolution, min_size))
                results = pool.imap(_worker, names, chunksize=16)
            else:
                results = (_process(src, n, transform, resolution, min_size) for n in names)
            bar = tqdm(total=len(names), unit="img", disable=not progress, desc="images")
            for i, (png, reason) in enumerate(results):
                bar.update(1)
                if reason is not None:
                    skipped.setdefault(reason, []).append(names[i])
                    bar.set_postfix(skipped=sum(map(len, skipped.values())))
                    continue
                arcname = item_name(count)
                zf.writestr(arcname, png)
                if label_of is not None:
                    labels_out.append([arcname, label_of[names[i]]])
                count += 1
                if max_images is not None and count >= int(max_images):
                    break
            bar.close()
            if count == 0:
                raise InputError(f"no usable image in {src.path} ({skip_summary(skipped)})")
            meta = {"labels": labels_out if src.labels is not None else None}
            if src.labels is not None and src.class_names:
                meta["class_names"] = list(src.class_names)
            zf.writestr("dataset.json", json.dumps(meta))

    try:
        atomic_write(dest, write_zip)  # a temporary file next to dest, renamed when complete
    finally:
        if pool is not None:
            pool.terminate()
    label_dim = 0
    if labels_out:
        label_dim = len(src.class_names) if src.class_names else max(lab for _, lab in labels_out) + 1
    return {"path": str(dest), "count": count, "skipped": {r: skipped[r] for r in SKIP_REASONS if r in skipped},
            "label_dim": label_dim, "class_names": src.class_names if src.labels is not None else None}


def skip_summary(skipped: dict) -> str:
    """``skipped N: n1 reason1, n2 reason2 (reason1: first names ...; reason2: ...)`` from
    ``{reason: [names]}`` in :data:`SKIP_REASONS` order."""
    groups = [(r, skipped[r]) for r in SKIP_REASONS if skipped.get(r)]
    if not groups:
        return "none skipped"
    counts = ", ".join(f"{len(names)} {r}" for r, names in groups)
    shown = "; ".join(f"{r}: " + ", ".join(names[:SHOWN_SKIPPED]) + (", ..." if len(names) > SHOWN_SKIPPED else "")
                      for r, names in groups)
    return f"skipped {sum(len(names) for _, names in groups)}: {counts} ({shown})"


# --------------------------------------------------------------------------------------------------
# imm prepare stats


def label_summary(histogram: list[int]) -> dict:
    """Compact view of a label histogram: classes, min/max/mean per class, empty class ids."""
    if not histogram:
        return {"classes": 0}
    h = np.asarray(histogram)
    empty = np.flatnonzero(h == 0).tolist()
    return {"classes": len(h), "min_per_class": int(h.min()), "max_per_class": int(h.max()),
            "mean_per_class": round(float(h.mean()), 2), "empty_classes": empty}


def _open_dataset(source, config):
    from imm.core.config import load_config
    from imm.data.datasets import open_dataset

    cfg = load_config(config) if config else {}
    section = cfg.get("dataset") or {}
    if source is None and not section:
        raise InputError("give --source PATH (or a --config with a dataset section)")
    return open_dataset(source, section), cfg


def _latent_encoder(cfg: dict, vae, channels: int):
    """A StabilityVAEEncoder to decode raw latent means (from --vae or the config's encoder), or None."""
    from imm.data.encoders import StabilityVAEEncoder, build_encoder

    if vae is None:
        enc_cfg = cfg.get("encoder") or {}
        if enc_cfg.get("kind") != "sd_vae":
            return None
        vae = build_encoder(enc_cfg).vae_name
    n = channels // 2  # identity whitening: decode(encode_latents(cat[mean, 0])) decodes the mean
    return StabilityVAEEncoder(vae_name=str(vae), raw_mean=[0.0] * n, raw_std=[1.0] * n, final_std=1.0)


def preview_images(dataset, n: int, cfg: dict | None = None, vae=None, device="cpu"):
    """uint8 NCHW previews of ``n`` evenly spaced items (None for 1x1 toy points); also the method used."""
    import torch

    idx = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int))
    x = torch.stack([dataset[int(i)][0] for i in idx])
    if dataset.resolution == 1:
        return None, "none (1x1 items)"
    if x.dtype == torch.uint8:
        c = x.shape[1]
        return (x[:, :3] if c >= 3 else x[:, :1]), "pixels"
    encoder = _latent_encoder(cfg or {}, vae, x.shape[1]) if x.shape[1] % 2 == 0 else None
    if encoder is not None:
        mean = x[:, : x.shape[1] // 2].float()
        z = encoder.encode_latents(torch.cat([mean, torch.zeros_like(mean)], dim=1))
        return encoder.decode(z.to(device)).cpu(), f"decoded the posterior mean with {encoder.vae_name}"
    m = x[:, :3].float() if x.shape[1] >= 3 else x[:, :1].float()
    lo = m.amin(dim=(0, 2, 3), keepdim=True)
    hi = m.amax(dim=(0, 2, 3), keepdim=True)
    img = ((m - lo) / (hi - lo).clamp_min(1e-8) * 255).round().to(torch.uint8)
    factor = max(1, 64 // dataset.resolution)
    img = img.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    return img, "first 3 latent channels, normalised per channel (no VAE given)"


def dataset_stats(source=None, config: str | None = None, grid=None, vae=None, num_images: int = 64,
                  device: str | None = None) -> dict:
    """Describe a dataset (count, resolution, channels, dtype, labels) and optionally write a grid."""
    dataset, cfg = _open_dataset(source, config)
    info = dataset.describe()
    info["labels"] = label_summary(info.pop("label_histogram"))
    if grid is not None:
        from imm.io.images import save_grid

        images, how = preview_images(dataset, int(num_images), cfg, vae, device or "cpu")
        if images is not None:
            save_grid(images, grid)
            info["grid"] = {"path": str(grid), "images": len(images), "how": how}
        else:
            info["grid"] = {"path": None, "how": how}
    return info


def format_stats(info: dict) -> str:
    """The stats as a few human-readable lines."""
    lines = [f"dataset:    {info.get('path') or info.get('name')} ({info['kind']})",
             f"items:      {info['count']:,}" + (" (with x-flips)" if info.get("xflip") else ""),
             f"shape:      {info['channels']} x {info['resolution']} x {info['resolution']} ({info['dtype']})"]
    lab = info["labels"]
    if lab["classes"]:
        empty = lab["empty_classes"]
        empty_text = (f"{len(empty)} empty: {empty[:10]}{' ...' if len(empty) > 10 else ''}" if empty
                      else "no empty class")
        lines.append(f"labels:     {lab['classes']} classes, {lab['min_per_class']}..{lab['max_per_class']} "
                     f"per class (mean {lab['mean_per_class']}), {empty_text}")
    else:
        lines.append("labels:     none (unlabelled)")
    if info.get("class_names"):
        names = info["class_names"]
        lines.append(f"classes:    {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    if "grid" in info:
        g = info["grid"]
        lines.append(f"grid:       {g['path']} ({g['images']} items, {g['how']})" if g["path"]
                     else f"grid:       {g['how']}")
    return "\n".join(lines)
