"""Writing files that another process or person may have prepared a trap for: every file ``imm`` writes is
created under a unique temporary name and renamed into place (:func:`atomic_write`), or opened for appending
without following a link (:func:`open_append`), so a symlink planted at an output's name is replaced, never
written through, and a crash leaves the previous file whole."""

from __future__ import annotations

import os
from pathlib import Path

from imm.core.errors import InputError


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)``, fsync it, then rename over ``path``: a crash leaves the old file intact, and a
    link at ``path`` is replaced by the new file (the rename), not followed.

    The temporary file is ``.NAME.<16 hex digits>.tmp`` next to ``path`` (the trainer removes orphans of
    a kill at its next start), created like ``open()`` creates files: mode 0o666 less the umask, not
    ``mkstemp``'s 0o600. ``write`` must write to exactly that name (give savers a format: the name ends in
    ``.tmp``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{os.urandom(8).hex()}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def open_append(path):
    """``path`` opened for appending text, created if missing; a symlink at ``path`` is removed first (a
    file the caller owns is never a link), so nothing is appended to what it points to."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    return os.fdopen(fd, "a")


def write_text(path, text: str) -> None:
    """``text`` into ``path`` by :func:`atomic_write`."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_subfolders(root, names) -> None:
    """InputError when ``root/NAME``, for a name of ``names``, exists as a symlink or as anything but a folder:
    the files a command writes into its subfolders stay inside ``root`` (a link planted at a subfolder's
    name would send them, and the trainer's deletion of old checkpoints, elsewhere)."""
    for name in names:
        path = Path(root) / name
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            what = "a symlink" if path.is_symlink() else "not a folder"
            raise InputError(f"{path} is {what}: imm writes into real folders inside {root} only (remove it)")
