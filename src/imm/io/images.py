"""Image files: sample grids like the ``<key>_samples.png`` of the official release's ``generate_images.py``
(github.com/lumalabs/imm), single PNGs, and scatter plots of 2-D toy samples."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imm.core.errors import InputError
from imm.core.files import atomic_write

# File name endings read as images, and the Pillow formats they name: the only decoders an image file is
# offered to (a file is not opened by whatever its content claims to be: a PostScript file named .png would
# start Ghostscript).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi")
MAX_IMAGE_PIXELS = 64_000_000  # above this an image is refused before it is decoded (8000 x 8000)
MAX_BATCH_VALUES = 2**28  # the most pixel values a batch of images handed to a network holds (1 GiB as float32)


def images_per_batch(batch_size: int, image_shape) -> int:
    """``batch_size``, or fewer for large images (at least 1): a batch of ``image_shape`` images (any
    order of C, H, W) holds at most :data:`MAX_BATCH_VALUES` values."""
    return max(1, min(int(batch_size), MAX_BATCH_VALUES // max(1, math.prod(image_shape))))


def image_formats() -> tuple[str, ...]:
    """The Pillow formats of :data:`IMAGE_EXTENSIONS` that this Pillow opens."""
    Image.init()
    registered = Image.registered_extensions()
    return tuple(dict.fromkeys(registered[e] for e in IMAGE_EXTENSIONS if registered.get(e) in Image.OPEN))


def open_image(source, name) -> Image.Image:
    """``source`` (a path or a binary file) opened as an image of one of :func:`image_formats`, its header
    read and its size checked against :data:`MAX_IMAGE_PIXELS`, not yet decoded; anything else is one
    InputError naming ``name``. Use it as a context manager, as ``Image.open``'s result."""
    try:
        with warnings.catch_warnings():  # Pillow's own, larger bound warns; the bound below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source, formats=image_formats())
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InputError(f"{name}: not a readable image ({e})") from None
    width, height = im.size
    if width * height > MAX_IMAGE_PIXELS:
        im.close()
        raise InputError(f"{name}: {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS:,} an image may have")
    return im


def to_hwc(images: torch.Tensor) -> np.ndarray:
    """uint8 NCHW tensor -> uint8 NHWC array."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise InputError(f"expected uint8 images of shape [N, C, H, W]; got {images.dtype} {list(images.shape)}")
    return images.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(array: np.ndarray) -> Image.Image:
    """A uint8 HWC array (1 or 3 channels) as a PIL image (L or RGB)."""
    return Image.fromarray(array[:, :, 0], "L") if array.shape[2] == 1 else Image.fromarray(array, "RGB")


def grid_array(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 NCHW images as one uint8 HWC grid, ``nrow`` images per row (default: square-ish)."""
    arr = to_hwc(images)
    n, h, w, c = arr.shape
    nrow = nrow or max(1, int(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    grid = np.zeros((ncol * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        y, x = divmod(i, nrow)
        top, left = padding + y * (h + padding), padding + x * (w + padding)
        grid[top:top + h, left:left + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor, path, nrow: int | None = None, padding: int = 2) -> None:
    """Save uint8 NCHW images as one grid PNG (:func:`grid_array`)."""
    grid = grid_array(images, nrow, padding)
    atomic_write(path, lambda tmp: to_pil(grid).save(tmp, format="PNG"))


def save_png(image_hwc: np.ndarray, path) -> None:
    atomic_write(path, lambda tmp: to_pil(image_hwc).save(tmp, format="PNG"))


def load_png(path) -> np.ndarray:
    """A PNG as HWC array (grayscale gets a channel axis), decoded completely. Anything but a regular
    file (a FIFO would block the read) and any file that does not decode raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    with open_image(path, path) as im:
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise InputError(f"{path}: not a readable image ({e})") from None
        arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def save_scatter(panels: dict[str, torch.Tensor], path, target: torch.Tensor | None = None, limit: float = 3.0) -> None:
    """2-D points (toy runs) as one PNG of scatter plots side by side (:func:`scatter_figure`) at ``path``."""
    atomic_write(path, lambda tmp: scatter_figure(panels, tmp, target, limit))


def scatter_figure(panels: dict[str, torch.Tensor], out, target: torch.Tensor | None = None, limit: float = 3.0) -> None:
    """Scatter plots side by side, one per ``{title: [N, 2] points}``, each over the ``target`` points in grey
    when given, written as PNG to ``out`` (a path or a binary file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    try:
        for ax, (title, x) in zip(axes[0], panels.items()):
            if target is not None:
                ax.scatter(*target.T, s=2, c="0.8", label="target")
            ax.scatter(*x.T, s=2, c="C0", label="samples")
            ax.set_title(title, fontsize=9)
            ax.set_aspect("equal")
            ax.set_xlim(-limit, limit)
            ax.set_ylim(-limit, limit)
        if target is not None:
            axes[0][0].legend(fontsize=7, loc="lower left", markerscale=4)
        fig.tight_layout()
        fig.savefig(out, format="png", dpi=100)
    finally:
        plt.close(fig)
