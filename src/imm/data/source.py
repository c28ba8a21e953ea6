"""A folder or a zip archive of data files with their class labels: the one reader of training's
:class:`imm.data.datasets.ImageFolderDataset` and of ``imm prepare images`` (:mod:`imm.data.prepare`).

* Files: the names of :mod:`imm.data.scan`'s listing that end in one of the given extensions, in
  sorted order. Those that are not regular files (FIFOs, devices, sockets: opening a FIFO blocks until
  a writer comes) are named in ``not_regular`` and never opened; reading one raises
  :class:`~imm.core.errors.InputError` naming it (``imm prepare images`` skips and names them, training
  reports them as unreadable samples). A file swapped for one after the listing is refused as well: it
  is opened non-blocking and checked before it is read.
* Labels, one per listed file: from ``dataset.json`` at the root when there is one, else from class
  folders by the rule of :mod:`imm.data.scan`. ``dataset.json`` may hold

  - EDM's ``{"labels": [["00000/img00000000.png", 6], ...]}``, or ``{"labels": null}`` (unlabelled);
  - the labels as a mapping, ``{"labels": {"00000/img00000000.png": 6, ...}}``;
  - names with Windows separators (``00000\\img00000000.png``), read as ``/``;
  - ``"class_names": [...]``, a name per class id (``imm prepare images`` writes them), which then
    give the number of classes.

  Class ids are integers >= 0 (integral floats are accepted), and every listed file needs one.
* A zip archive is opened lazily, once per process (reopened after a fork, never pickled), so a
  :class:`Source` is safe in ``DataLoader`` and ``multiprocessing`` workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np

from imm.core.errors import InputError, MissingError
from imm.data import scan
from imm.io import zips

METADATA = "dataset.json"
MAX_MEMBER_BYTES = 256 * 2**20  # the most a zip member may inflate to (its declared size is checked first)
MAX_CLASSES = 100_000  # class ids are below this (a label of 10^12 would ask for an embedding of that many rows)


def class_ids(values, what: str) -> np.ndarray:
    """Integer class ids >= 0 (``int64``) from a sequence of ints or integral floats, else InputError."""
    try:
        arr = np.asarray(values)
    except Exception as exc:  # ragged lists and the like
        raise InputError(f"{what}: labels must be integer class ids") from exc
    if arr.dtype == object or arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer)
                                                   or np.issubdtype(arr.dtype, np.floating)
                                                   or arr.dtype == bool):
        raise InputError(f"{what}: labels must be integer class ids (one per item); vector labels "
                         "are not supported")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        raise InputError(f"{what}: labels must be integer class ids, got non-integral values")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise InputError(f"{what}: labels must be >= 0, got {int(arr.min())}")
    if arr.size and arr.max() >= MAX_CLASSES:
        raise InputError(f"{what}: class ids must be below {MAX_CLASSES:,}, got {int(arr.max())}")
    return arr


class Source:
    """The data files of the folder or zip archive ``path``, with their labels (see the module docstring).

    Args:
        path: a folder or a ``.zip`` file.
        extensions: the file name endings of data files (lower case); default: the images this
            Pillow opens (:func:`imm.data.scan.image_extensions`).
        use_labels: find the labels (False: ``labels`` and ``class_names`` are None).
        what: how error messages name ``path`` (``"source"``, ``"dataset path"``).

    Attributes: ``path`` (a Path), ``is_zip``, ``names`` (every data file, sorted), ``not_regular``
    (those of them that are not regular files), ``files`` (the others), ``labels`` (a class id per
    name of ``names``, or None), ``class_names`` (or None) and ``label_dim`` (0 when unlabelled).
    """

    def __init__(self, path, extensions: tuple[str, ...] | None = None, use_labels: bool = True,
                 what: str = "source"):
        p = Path(os.path.expanduser(os.fspath(path)))
        if not p.exists():
            raise MissingError(f"{what} {p} does not exist")
        self.path = p
        self._zipfile = self._zip_pid = None
        if p.is_dir():
            self.is_zip = False
            listing, not_regular = scan.list_folder(p)
        elif p.is_file() and zipfile.is_zipfile(p):  # is_file first: never open a FIFO
            self.is_zip = True
            try:
                listing, not_regular = scan.list_zip(self._zip()), []
            except zips.ZIP_FAULTS as exc:
                raise InputError(f"{what} {p}: not a readable zip archive ({exc})") from None
        else:
            raise InputError(f"{what} {p} is neither a folder nor a zip archive")
        self._not_regular = set(not_regular)
        extensions = scan.image_extensions() if extensions is None else tuple(extensions)
        self.names = [n for n in listing if n.lower().endswith(extensions)]
        self.not_regular = [n for n in self.names if n in self._not_regular]
        self.files = [n for n in self.names if n not in self._not_regular]
        self.labels = self.class_names = None
        if use_labels and self.names:
            if METADATA in listing:
                self.labels, self.class_names = self._metadata_labels()
            else:
                self.labels, self.class_names = scan.folder_labels(self.names)

    @property
    def label_dim(self) -> int:
        """The number of classes: ``len(class_names)`` when there are names, else the largest id + 1."""
        if self.labels is None:
            return 0
        return len(self.class_names) if self.class_names else max(self.labels) + 1

    # -- reading ------------------------------------------------------------------------------------

    def _zip(self) -> zipfile.ZipFile:
        # One handle per process: a handle inherited through fork shares its file offset with the parent.
        if self._zipfile is None or self._zip_pid != os.getpid():
            self._zipfile, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zipfile

    def _member(self, name: str) -> zipfile.ZipInfo:
        return zips.checked_member(self._zip(), name, f"{name} in {self.path}", MAX_MEMBER_BYTES)

    def open(self, name: str):
        """File ``name`` opened for reading in binary mode; InputError for one that is not a regular file or
        a zip member that :meth:`_member` refuses."""
        if self.is_zip:
            return zips.open_member(self._zip(), self._member(name), f"{name} in {self.path}")
        path = self.path / name
        if name in self._not_regular:
            raise InputError(f"{path}: not a regular file")
        # O_NONBLOCK: a file swapped for a FIFO after the listing is refused, not waited on
        f = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            f.close()
            raise InputError(f"{path}: not a regular file")
        return f

    def read(self, name: str) -> bytes:
        """The bytes of file ``name`` (see :meth:`open`)."""
        if self.is_zip:
            return zips.read_member(self._zip(), self._member(name), f"{name} in {self.path}")
        with self.open(name) as f:
            return f.read()

    def close(self) -> None:
        """Close this process's zip handle (a later read reopens it)."""
        if getattr(self, "_zipfile", None) is not None and self._zip_pid == os.getpid():
            self._zipfile.close()
        self._zipfile = self._zip_pid = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _zipfile=None, _zip_pid=None)

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    # -- labels -------------------------------------------------------------------------------------

    def _metadata_labels(self) -> tuple[list[int] | None, list[str] | None]:
        """(class id per name, class names or None) from ``dataset.json`` (see the module docstring)."""
        where = f"{METADATA} in {self.path}"
        data = self.read(METADATA)
        try:
            meta = json.loads(data)
        except ValueError as exc:
            raise InputError(f"{where} is not valid JSON: {exc}") from None
        entries = meta.get("labels") if isinstance(meta, dict) else None
        if entries is None:
            return None, None
        try:
            table = {str(name).replace("\\", "/"): label
                     for name, label in (entries.items() if isinstance(entries, dict) else entries)}
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where}: 'labels' must be a list of [file name, class id] pairs") from exc
        missing = [n for n in self.names if n not in table]
        if missing:
            raise InputError(f"{where} has no label for {missing[0]} ({len(missing)} files without a label)")
        labels = class_ids([table[n] for n in self.names], where).tolist()
        class_names = meta.get("class_names")
        if class_names in (None, []):
            return labels, None
        if not (isinstance(class_names, list) and all(isinstance(c, str) for c in class_names)
                and len(class_names) > max(labels)):
            raise InputError(f"{where}: 'class_names' must be a list of names, one per class id "
                             f"0..{max(labels)} at least")
        return labels, class_names
