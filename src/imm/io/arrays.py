""".npy and .npz files read as data, within bounds: the header of an array (NumPy's ``.npy`` format,
https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html) is read first, and its shape and
dtype are checked against what the file can hold before anything is allocated:

* no object dtypes (they are pickles) and no format version 3 (structured dtypes with non-Latin-1
  field names, which no array of images, latents or statistics has);
* the bytes the header declares (``prod(shape) x itemsize``, in Python integers: no overflow) match the
  bytes the file or ``.npz`` member holds after the header, and stay under :data:`MAX_ARRAY_BYTES`;
* an ``.npz`` member goes through :mod:`imm.io.zips` (stored or deflate, declared size bounded before
  anything is inflated, CRC checked).

A caller reads the headers of :class:`NpzFile` to check shapes and dtypes against what it expects, then
reads only the arrays it needs. Every fault is one :class:`~imm.core.errors.InputError` naming the file.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np

from imm.core.errors import InputError, MissingError
from imm.core.files import atomic_write
from imm.io import zips

_NPY_MAGIC = b"\x93NUMPY"


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: assume 16 GiB
        return 16 * 2**30


MAX_ARRAY_BYTES = _physical_memory() // 2  # the most one array may declare (it is read whole into memory)


def npy_header(f, where: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """``(shape, dtype, fortran_order)`` from the ``.npy`` header at the stream position of ``f``."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise InputError(f"{where}: .npy format version {version[0]}.{version[1]} (1.0 and 2.0 are read)")
    except InputError:
        raise
    except Exception as exc:  # ValueError for a malformed header, zip faults from a member stream
        raise InputError(f"{where}: not a readable .npy array ({exc})") from None
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise InputError(f"{where}: an array of Python objects (a pickle), which is never read")
    return tuple(int(v) for v in shape), dtype, bool(fortran)


def read_npy(f, size: int, where: str) -> np.ndarray:
    """The array of the ``.npy`` stream ``f`` that holds ``size`` bytes from its start: the header's shape
    must account for exactly the bytes after it, at most :data:`MAX_ARRAY_BYTES`."""
    shape, dtype, fortran = npy_header(f, where)
    nbytes, data_bytes = math.prod(shape) * dtype.itemsize, size - f.tell()
    if nbytes != data_bytes:
        raise InputError(f"{where}: the header declares shape {shape} of {dtype} ({nbytes:,} bytes) but "
                         f"{data_bytes:,} bytes follow it")
    if nbytes > MAX_ARRAY_BYTES:
        raise InputError(f"{where}: an array of {nbytes:,} bytes, more than the {MAX_ARRAY_BYTES:,} one may hold")
    buffer = np.empty(nbytes, np.uint8)
    view, filled = memoryview(buffer), 0
    try:
        while filled < nbytes:
            n = f.readinto(view[filled:])
            if not n:
                break
            filled += n
    except zips.ZIP_FAULTS as exc:  # a bad CRC or a corrupt deflate stream
        raise InputError(f"{where}: not readable ({exc})") from None
    if filled != nbytes:
        raise InputError(f"{where}: holds {filled:,} of the {nbytes:,} bytes its header declares")
    return buffer.view(dtype).reshape(shape, order="F" if fortran else "C")


def write_npz(path, arrays: dict) -> None:
    """``arrays`` as an uncompressed ``.npz`` at exactly ``path`` (atomically: :func:`imm.core.files.atomic_write`)."""

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
            np.savez(f, **arrays)

    atomic_write(path, write)


def read_npy_file(path, where: str | None = None) -> np.ndarray:
    """The array of the ``.npy`` file ``path`` (see :func:`read_npy`)."""
    with open(path, "rb") as f:
        return read_npy(f, os.fstat(f.fileno()).st_size, where or str(path))


class NpzFile:
    """The arrays of an ``.npz`` file (what ``numpy.savez`` and ``numpy.savez_compressed`` write), read one
    at a time within bounds (see the module docstring). ``kind`` names the file in errors: ``PATH: not a
    readable KIND (why)``. Use as a context manager, or call :meth:`close`.

    Attributes: ``path`` and ``keys`` (the array names, without ``.npy``, in the order stored).
    """

    def __init__(self, path, kind: str = ".npz file"):
        self.path, self.kind = Path(path).expanduser(), kind
        if not self.path.exists():
            raise MissingError(f"{self.path} does not exist")
        if not self.path.is_file():  # a FIFO or device: reading could block forever
            self._fault("not a regular file")
        with open(self.path, "rb") as f:
            if f.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
                raise InputError(f"{self.path} is a single .npy array, not an .npz of named arrays")
        try:
            self._zip = zipfile.ZipFile(self.path)
            names = self._zip.namelist()
        except zips.ZIP_FAULTS as exc:
            self._fault(exc)
        self._members = {n.removesuffix(".npy"): n for n in names if n.endswith(".npy")}
        self.keys = list(self._members)

    def _fault(self, why):
        raise InputError(f"{self.path}: not a readable {self.kind} ({why})") from None

    def _open(self, key: str):
        if key not in self._members:
            self._fault(f"no array {key!r}; it holds {self.keys}")
        name = self._members[key]
        where = f"{self.path}: not a readable {self.kind}: member {name}"
        info = zips.checked_member(self._zip, name, where, MAX_ARRAY_BYTES + 2**16)  # the header's room
        return info, zips.open_member(self._zip, info, where), where

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """``(shape, dtype)`` of array ``key``, from its header alone."""
        info, f, where = self._open(key)
        with f:
            shape, dtype, _ = npy_header(f, where)
        return shape, dtype

    def read(self, key: str) -> np.ndarray:
        """Array ``key`` (see :func:`read_npy`)."""
        info, f, where = self._open(key)
        with f:
            return read_npy(f, info.file_size, where)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> NpzFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
