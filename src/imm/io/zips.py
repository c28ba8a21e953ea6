"""Zip archives read within bounds (dataset zips, ``.npz`` files): a member is looked at before anything of
it is inflated, and refused when it is encrypted, compressed by a method other than :data:`ZIP_METHODS`
(bzip2 and LZMA inflate far beyond deflate's ratio of about 1,000 to 1) or declared larger than the
caller's bound; it is then read as a stream of exactly its declared size, whose CRC ``zipfile`` checks
at the end. Every fault is one :class:`~imm.core.errors.InputError` naming the member and the archive."""

from __future__ import annotations

import zipfile
import zlib

from imm.core.errors import InputError

ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}  # what a member may use
ZIP_FAULTS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, ValueError, OSError,
              RuntimeError, zlib.error)  # what a malformed archive or member raises inside zipfile


def checked_member(archive: zipfile.ZipFile, name: str, where: str, max_bytes: int) -> zipfile.ZipInfo:
    """The member ``name`` of ``archive`` (``where`` names it in errors), refused before anything is
    inflated when it is encrypted, compressed by a method other than :data:`ZIP_METHODS` or declared
    larger than ``max_bytes``."""
    try:
        info = archive.getinfo(name)
    except ZIP_FAULTS + (KeyError,) as exc:
        raise InputError(f"{where}: not readable ({exc})") from None
    if info.flag_bits & 0x1:
        raise InputError(f"{where}: encrypted")
    if info.compress_type not in ZIP_METHODS:
        raise InputError(f"{where}: compression method {info.compress_type} (allowed: "
                         f"{' or '.join(ZIP_METHODS.values())})")
    if info.file_size > max_bytes:
        raise InputError(f"{where}: declares {info.file_size:,} bytes, more than the {max_bytes:,} a member may hold")
    return info


def open_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str):
    """A stream of the member ``info`` (see :func:`checked_member`)."""
    try:
        return archive.open(info)
    except ZIP_FAULTS as exc:
        raise InputError(f"{where}: not readable ({exc})") from None


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> bytes:
    """The bytes of the member ``info``: exactly its declared size, CRC checked."""
    try:
        with open_member(archive, info, where) as f:
            data = f.read(info.file_size + 1)  # zipfile stops at the declared size and checks the CRC there
    except ZIP_FAULTS as exc:
        raise InputError(f"{where}: not readable ({exc})") from None
    if len(data) != info.file_size:
        raise InputError(f"{where}: holds {len(data):,} bytes, declares {info.file_size:,}")
    return data
