"""Hostile files, small and built at test time: one builder per class of file a user may be handed (zip
and ``.npz`` archives, ``.npy`` arrays, images, YAML configs). Each builder writes into a folder and returns
the path it wrote; tests/unit/test_security.py runs the commands on them.

``python -m tests.hostile_files OUT`` writes every one of them into the folder OUT, to try them by hand.
"""

from __future__ import annotations

import io
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

# --- .npy / .npz -------------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray, header_shape: tuple | None = None, version: tuple[int, int] = (1, 0)) -> bytes:
    """``array`` as .npy bytes, with a header that claims ``header_shape`` instead of its own shape."""
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
              "shape": tuple(array.shape if header_shape is None else header_shape)}
    buffer = io.BytesIO()
    write = np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0
    write(buffer, header)
    if version not in ((1, 0), (2, 0)):
        data = bytearray(buffer.getvalue())
        data[6:8] = bytes(version)
        buffer = io.BytesIO(bytes(data))
        buffer.seek(0, io.SEEK_END)
    buffer.write(np.ascontiguousarray(array).tobytes())
    return buffer.getvalue()


def _npz(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as z:
        for name, data in members.items():
            z.writestr(f"{name}.npy", data)
    return path


def npz_shape_lie(folder: Path) -> Path:
    """Samples whose header declares 10^12 images of 32 x 32 x 3 in a 3 KB member."""
    images = np.zeros((1, 32, 32, 3), np.uint8)
    return _npz(folder / "shape-lie.npz", {"arr_0": npy_bytes(images, (10**12, 32, 32, 3))})


def npz_bomb(folder: Path) -> Path:
    """A deflated member of 64 MiB of zeros (about 64 KB in the file): honest, but larger than a bound the
    test sets; a real bomb is the same file at a size beyond memory."""
    zeros = np.zeros((64, 1024, 1024), np.uint8)
    return _npz(folder / "bomb.npz", {"arr_0": npy_bytes(zeros)}, zipfile.ZIP_DEFLATED)


def npz_objects(folder: Path) -> Path:
    """Statistics whose mu is an array of Python objects (reading it would unpickle)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array([None, 1], dtype=object), allow_pickle=True)
    return _npz(folder / "objects.npz", {"mu": buffer.getvalue(), "sigma": npy_bytes(np.eye(2))})


def npz_version_3(folder: Path) -> Path:
    """A format-3.0 header (structured dtypes with UTF-8 field names), which no data array needs."""
    return _npz(folder / "version3.npz", {"arr_0": npy_bytes(np.zeros((2, 4, 4, 3), np.uint8), version=(3, 0))})


def npz_sigma_mismatch(folder: Path) -> Path:
    """Statistics with a 4-d mu and a sigma declared 100000 x 100000 (80 GB) in a small member."""
    return _npz(folder / "sigma.npz", {"mu": npy_bytes(np.zeros(4)), "sigma": npy_bytes(np.eye(2), (10**5, 10**5))})


def npz_bzip2(folder: Path) -> Path:
    """A bzip2-compressed member (bzip2 inflates far beyond deflate's ratio)."""
    return _npz(folder / "bzip2.npz", {"arr_0": npy_bytes(np.zeros((2, 4, 4, 3), np.uint8))}, zipfile.ZIP_BZIP2)


def npz_labels_mismatch(folder: Path) -> Path:
    """A dataset .npz with 4 images and 10^9 labels declared."""
    return _npz(folder / "labels.npz", {"arr_0": npy_bytes(np.zeros((4, 8, 8, 3), np.uint8)),
                                        "arr_1": npy_bytes(np.zeros(4, np.int64), (10**9,))})


def npy_latent_lie(folder: Path) -> Path:
    """A folder of latents whose second array's header claims 4 x 10^6 x 10^6 float32 values."""
    root = folder / "latents"
    root.mkdir()
    (root / "a.npy").write_bytes(npy_bytes(np.zeros((4, 8, 8), np.float32)))
    (root / "b.npy").write_bytes(npy_bytes(np.zeros((4, 8, 8), np.float32), (4, 10**6, 10**6)))
    return root


NPZ_BUILDERS = (npz_shape_lie, npz_bomb, npz_objects, npz_version_3, npz_sigma_mismatch, npz_bzip2,
                npz_labels_mismatch, npy_latent_lie)

# --- images -------------------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (the header is all a bound needs to refuse it)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def huge_png(folder: Path) -> Path:
    """A folder with one 70-byte PNG that claims 13000 x 13000 pixels."""
    (folder / "huge").mkdir()
    (folder / "huge" / "a.png").write_bytes(png_claiming(13000, 13000))
    return folder / "huge"


def postscript_png(folder: Path) -> Path:
    """A folder with a PostScript file named a.png (Pillow's EPS plugin would start Ghostscript)."""
    (folder / "eps").mkdir()
    (folder / "eps" / "a.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    return folder / "eps"


def oversized_pngs(folder: Path) -> Path:
    """A folder of two black 1100 x 1100 PNGs (a few KB each): within Pillow's pixel bound, larger than the
    distances read."""
    from PIL import Image

    (folder / "oversized").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (1100, 1100)).save(folder / "oversized" / name)
    return folder / "oversized"


IMAGE_BUILDERS = (huge_png, postscript_png, oversized_pngs)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for build in NPZ_BUILDERS + IMAGE_BUILDERS:
        print(build(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
