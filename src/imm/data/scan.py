"""Finding a dataset's files and their class labels: one rule for training (``imm.data.datasets``), ``imm prepare``
and ``imm eval``.

Files: every file of a folder (walked recursively) or of a zip archive, as ``/``-separated relative
names in sorted order; names with a part that starts with ``.`` and macOS's ``__MACOSX`` folders are
left out. In a folder, the files that are not regular files (FIFOs, devices, sockets) are told apart
from the directory entries, never opened. :class:`imm.data.source.Source` reads the files.

Class labels from folders (:func:`folder_labels`), when no ``dataset.json`` gives them:

1. the leading folders that every file shares are dropped (a zip of ``train/n01440764/x.JPEG``, ... or
   of ``cifar10/cat/1.png``, ...);
2. then each file's top-level folder is its class, provided every file lies in one, there are at
   least two of them, and the layout is not EDM's ``dataset_tool`` chunks (``00000/img00000000.png``,
   ``00000/img-mean-std-00000000.npy``: 1000 files per numbered folder, not classes);
3. class ids are the sorted folder names numbered 0 .. K-1; files deeper down belong to their
   top-level folder.

So ImageNet's ``train/<wnid>/<file>`` layout, with or without the ``train`` folder, gets its 1000
classes, and an EDM zip gets its labels from its ``dataset.json`` only.
"""
from __future__ import annotations

import os
import re
import zipfile

from PIL import Image

from imm.io.images import IMAGE_EXTENSIONS


def image_extensions() -> tuple[str, ...]:
    """The :data:`IMAGE_EXTENSIONS` that this Pillow opens."""
    Image.init()
    openable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return tuple(e for e in IMAGE_EXTENSIONS if e in openable)


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def _not_regular(entry: os.DirEntry) -> bool:
    """A FIFO, device or socket (or a link to one), told from the directory entry without opening it
    (opening a FIFO blocks until a writer comes). A broken link is not counted: reading it fails."""
    if entry.is_file():
        return False
    try:
        entry.stat()
    except OSError:
        return False
    return True


def list_folder(root) -> tuple[list[str], list[str]]:
    """Relative names of the files under ``root`` (see the module docstring), sorted, and those of them
    that are not regular files (FIFOs, devices, sockets), sorted. Links to folders are not followed."""
    names, not_regular = [], []
    folders = [""]
    while folders:
        rel = folders.pop()
        try:
            entries = list(os.scandir(os.path.join(root, rel)))
        except OSError:  # an unreadable folder is passed over, as os.walk does
            continue
        for entry in entries:
            if entry.name.startswith(".") or (entry.name == "__MACOSX" and entry.is_dir()):
                continue
            name = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir():
                if not entry.is_symlink():
                    folders.append(name)
                continue
            names.append(name)
            if _not_regular(entry):
                not_regular.append(name)
    return sorted(names), sorted(not_regular)


def list_zip(archive: zipfile.ZipFile) -> list[str]:
    """Names of the files in an open zip archive (see the module docstring), sorted."""
    return sorted(n for n in archive.namelist() if not n.endswith("/") and not _hidden(n))


def is_edm_chunk_layout(parts: list[list[str]]) -> bool:
    """True for EDM's ``dataset_tool`` layout (``00000/img00000000.png``): chunks of files, not classes."""
    return all(len(p) == 2 and re.fullmatch(r"\d{5}", p[0]) and re.match(r"img(-mean-std-)?\d{8}\.", p[1])
               for p in parts)


def folder_labels(files: list[str]) -> tuple[list[int] | None, list[str] | None]:
    """(class id per file, sorted class names) by the folder rule of the module docstring, or (None, None)."""
    parts = [f.split("/") for f in files]
    if not parts:
        return None, None
    common = 0  # leading folders shared by every file
    while all(len(q) > common + 1 for q in parts) and len({q[common] for q in parts}) == 1:
        common += 1
    parts = [q[common:] for q in parts]
    if any(len(q) < 2 for q in parts) or is_edm_chunk_layout(parts):
        return None, None
    class_names = sorted({q[0] for q in parts})
    if len(class_names) < 2:
        return None, None
    ids = {c: i for i, c in enumerate(class_names)}
    return [ids[q[0]] for q in parts], class_names
