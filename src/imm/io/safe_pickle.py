"""Reading pickles and ``torch.save`` files as data: nothing in the file runs, is imported or is changed.

The official release (github.com/lumalabs/imm) pickles its networks through EDM's ``persistence``
mechanism (a call to ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` whose ``meta`` embeds
the module's source code) and through ordinary classes of torch.nn, timm, omegaconf and dnnlib.
Loading them the official way executes that source. Here instead, a restricted version of Python's own
pure-Python unpickler (``pickle._Unpickler``; opcodes as documented in the standard library's
``pickletools``) runs every opcode under these rules:

* globals resolve only to an allow-list: containers, numbers, strings, torch dtypes, and callables of
  our own that check their arguments (``torch._utils._rebuild_tensor_v2``, ``collections.OrderedDict``,
  numpy scalars/arrays, ...) instead of the real functions; any other global (``os.system``,
  ``builtins.eval``, ``functools.partial``, ...) is refused with :class:`UnsafePickleError`;
* the persistence call and classes of torch.nn, timm, omegaconf, dnnlib, torch_utils, training and
  imm become inert :class:`PickledObject` records (class name, constructor args, state); nothing is
  imported and ``module_src`` is never executed;
* BUILD (``__setstate__``/``__dict__`` updates) applies only to those records, to fresh
  ``OrderedDict`` s (torch's ``_metadata``) and to fresh numpy arrays; SETITEM/APPEND only to
  containers; calls only to the allow-list; dict keys and set members only of hashable plain types;
* memory and time are bounded by the file: lengths are checked against the bytes left before
  anything is allocated, storages may hold no more bytes than the file, and a pickle may run at most
  :data:`MAX_OPCODES` opcodes.

``torch.save`` files are read without ``torch.load`` (:func:`load_torch`): the zip format through
``zipfile`` (the ``*/data.pkl`` pickle, storages from the ``*/data/<key>`` records, the ``byteorder``
record; TorchScript archives are refused: loading one runs its code), and the legacy (pre-1.6) format
as its sequence of pickles followed by raw little-endian storages (layout of
``torch/serialization.py``'s ``_legacy_save``); the release stores each storage in that legacy format
through ``torch.storage._load_from_bytes``.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import pickle
import re
import struct
import sys
import zipfile
from typing import ClassVar

import numpy as np
import torch

__all__ = ["MAX_OPCODES", "PickledObject", "Storage", "Unpickler", "UnsafePickleError", "load", "load_torch",
           "loads", "to_plain"]

# Classes that are read as plain data: module prefixes of the release and the libraries it uses.
DATA_CLASS_MODULES = (
    "torch.nn.modules.", "torch.nn.parameter", "timm.", "omegaconf.", "dnnlib.", "torch_utils.",
    "training.", "imm.", "typing", "enum",
)
MAX_OPCODES = 2_000_000  # official-format fixtures run 7,000-17,000, full-size releases ~100,000; <= ~250 B each
MAX_RECORDS = 500_000  # records of a torch.save zip (one per storage); zipfile keeps ~500 bytes for each
MAX_CLASSES = 10_000  # distinct classes one pickle may name (the release's name about 20)
MAX_DEPTH = 100  # nesting depth that readers of the unpickled data follow (to_plain, module trees)
MAX_DIMS = 64
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks for something outside the allow-list (a global, a call, a state change, a size)."""


# ---------------------------------------------------------------------------------------------
# What unpickling hands out


class PickledObject:
    """Inert record of an object whose class is not imported: name, constructor args and state."""

    module = ""
    name = ""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        obj.dictitems, obj.listitems = {}, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    # dict and list subclasses (EasyDict, ...) are filled through these
    def __setitem__(self, key, value):
        self.dictitems[key] = value

    def append(self, value):
        self.listitems.append(value)

    def extend(self, values):
        self.listitems.extend(values)

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self):
        return f"<pickled {self.qualname}>"


def _is_stand_in_class(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, PickledObject)


class Storage:
    """The bytes of one torch storage (a 1-D uint8 tensor) and the dtype it was saved with."""

    __slots__ = ("data", "dtype")

    def __init__(self, dtype: torch.dtype, data: torch.Tensor):
        self.dtype, self.data = dtype, data

    def typed(self, dtype: torch.dtype) -> torch.Tensor:
        if self.data.numel() % dtype.itemsize:
            raise pickle.UnpicklingError(f"a storage of {self.data.numel()} bytes cannot hold {dtype} elements")
        return self.data.view(dtype)


class StorageType:
    """What ``torch.FloatStorage`` & co. resolve to: the dtype only."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


STORAGE_TYPES = {"UntypedStorage": torch.uint8, "Storage": torch.float32}
for _name, _dtype in (("Double", torch.float64), ("Float", torch.float32), ("Half", torch.float16),
                      ("BFloat16", torch.bfloat16), ("Long", torch.int64), ("Int", torch.int32),
                      ("Short", torch.int16), ("Char", torch.int8), ("Byte", torch.uint8), ("Bool", torch.bool),
                      ("ComplexDouble", torch.complex128), ("ComplexFloat", torch.complex64)):
    STORAGE_TYPES[f"{_name}Storage"] = _dtype


def _new_storage(dtype: torch.dtype, nbytes: int) -> tuple[Storage, bytearray]:
    buf = bytearray(nbytes)
    data = torch.frombuffer(buf, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    return Storage(dtype, data), buf


class _Safe:
    """A callable handed to the pickle in place of a real one: ``fn(unpickler, *args)`` checks its arguments."""

    __slots__ = ("fn", "qualname")

    def __init__(self, qualname: str, fn):
        self.qualname, self.fn = qualname, fn

    def __repr__(self):
        return f"<allowed {self.qualname}>"


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the callables and opcodes

_PLAIN_KEYS = (str, bytes, int, float, complex, type(None), torch.dtype, torch.device, torch.Tensor,
               PickledObject, frozenset, np.generic, type)


def _check_key(key, depth: int = 0) -> None:
    """Dict keys and set members must hash without running anything deep: plain values, records, short tuples."""
    if isinstance(key, tuple) and depth < 8:
        for item in key:
            _check_key(item, depth + 1)
    elif not isinstance(key, _PLAIN_KEYS) or isinstance(key, tuple):
        raise UnsafePickleError(f"a {type(key).__name__} as a dict key or set member is not allowed in a checkpoint")


def _ints(value, what: str, limit: int = MAX_DIMS) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) > limit:
        raise pickle.UnpicklingError(f"{what} must be a tuple of at most {limit} integers")
    if not all(type(v) is int and v >= 0 for v in value):
        raise pickle.UnpicklingError(f"{what} must hold non-negative integers, got {tuple(value)!r:.80}")
    return tuple(value)


def _need(value, types, what: str):
    if not isinstance(value, types):
        raise pickle.UnpicklingError(f"{what} is a {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# The allow-list: callables

def _container(kind):
    def make(u, items=()):
        _need(items, (list, tuple, set, frozenset, dict), f"the argument of {kind.__name__}()")
        u.charge(len(items))
        if kind in (set, frozenset):
            for item in items:
                _check_key(item)
        if kind in (dict, collections.OrderedDict) and not isinstance(items, dict):
            for pair in items:
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise pickle.UnpicklingError(f"{kind.__name__}() needs (key, value) pairs")
                _check_key(pair[0])
        return kind(items)
    return make


def _scalar(kind):
    # bytes(10**12) would allocate what the file never held: bytes and bytearray take no numbers
    simple = (str, bytes, bytearray) if kind in (bytes, bytearray) else (str, bytes, bytearray, int, float)

    def make(u, *args):
        if len(args) > 2 or not all(isinstance(a, simple) for a in args):
            raise UnsafePickleError(f"{kind.__name__}({', '.join(type(a).__name__ for a in args)}) is not allowed in "
                                    "a checkpoint")
        u.charge(sum(len(a) for a in args if isinstance(a, (str, bytes, bytearray))) // 8)
        return kind(*args)
    return make


def _latin1(u, text, encoding="latin1"):
    """``_codecs.encode(text, 'latin1')``: how protocol 2 (torch.save's) pickles bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is allowed only for latin-1 text (protocol 2 bytes)")
    u.charge(len(text) // 8)
    return text.encode("latin1")


def _object(u):
    return object()


def _defaultdict(u, factory=None, items=()):
    """A ``defaultdict`` without its factory (nothing ever reads a missing key)."""
    out = collections.defaultdict()
    out.update(_container(dict)(u, items))
    return out


def _torch_size(u, dims=()):
    return torch.Size(_ints(dims, "torch.Size"))


def _torch_device(u, *args):
    if len(args) > 2 or not all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in args) or any(
            isinstance(a, str) and len(a) > 64 for a in args):
        raise pickle.UnpicklingError(f"torch.device of {', '.join(map(_what, args))} is not a device")
    return torch.device(*args)


def _rebuild_tensor(u, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None, dtype=None):
    """``torch._utils._rebuild_tensor(_v2/_v3)``: a view into a storage of this file, bounds checked.

    Backward hooks are dropped; tensors may not be larger than their storage (no broadcast views)."""
    _need(storage, Storage, "a tensor's storage")
    flat = storage.typed(storage.dtype if dtype is None else _need(dtype, torch.dtype, "a tensor's dtype"))
    size, stride = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise pickle.UnpicklingError("a tensor's offset, size and stride do not fit together")
    numel = math.prod(size)
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if numel else offset
    if end > flat.numel() or numel > flat.numel():
        raise pickle.UnpicklingError(f"a tensor of size {list(size)} does not fit in its storage of {flat.numel()} "
                                     "elements")
    if metadata:
        raise UnsafePickleError("tensor metadata (conjugate/negative bits) is not supported in a checkpoint")
    tensor = flat.as_strided(size, stride, offset)
    return tensor.requires_grad_(True) if requires_grad is True else tensor


def _rebuild_tensor_v3(u, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _rebuild_tensor(u, storage, offset, size, stride, requires_grad, hooks, metadata, dtype=dtype)


def _rebuild_parameter(u, data, requires_grad, hooks, state=None):
    """``torch._utils._rebuild_parameter(_with_state)`` without hooks or extra attributes."""
    return torch.nn.Parameter(_need(data, torch.Tensor, "a parameter's data"), requires_grad=requires_grad is True)


def _load_storage_bytes(data) -> Storage:
    """``torch.storage._load_from_bytes``: one storage in the legacy torch.save format, read by :func:`_load_legacy`."""
    _need(data, (bytes, bytearray), "the argument of _load_from_bytes")
    unpickler = Unpickler(io.BytesIO(data))
    if not (type(magic := unpickler.load()) is int and magic == LEGACY_MAGIC):
        raise pickle.UnpicklingError("_load_from_bytes of something else than a legacy torch.save storage")
    return _need(_load_legacy(unpickler), Storage, "the object in _load_from_bytes")


def _storage_from_bytes(u, data):
    u.charge_bytes(len(data) if isinstance(data, (bytes, bytearray)) else 0)  # the same bytes may come many times
    return _load_storage_bytes(data)


def _persistent_obj(u, meta):
    """Stand-in for EDM's ``_reconstruct_persistent_obj``: keep the class name and state, drop the source."""
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str):
        raise UnsafePickleError("malformed persistent object in checkpoint")
    obj = u.stand_in("<persistent>", meta["class_name"])()
    obj.state = meta.get("state")
    return obj


def _reconstructor(u, cls, base, state=None):
    """copyreg._reconstructor for protocol 0/1 pickles, limited to our stand-ins."""
    if not _is_stand_in_class(cls):
        raise UnsafePickleError(f"refusing to reconstruct {_what(cls)}")
    obj = cls()
    obj.state = state
    return obj


class NumpyDType(PickledObject):
    """Record of a pickled ``numpy.dtype`` (the real ones are shared singletons, never handed out)."""

    module, name = "numpy", "dtype"

    def to_numpy(self) -> np.dtype:
        code = self.args[0] if self.args else None
        if not isinstance(code, str) or not re.fullmatch(r"[biufc][0-9]{1,2}", code):
            raise UnsafePickleError(f"numpy dtype {_what(code)} is not allowed in a checkpoint (numbers only)")
        order = self.state[1] if isinstance(self.state, tuple) and len(self.state) > 1 else "="
        return np.dtype(code).newbyteorder(order if order in ("<", ">", "=", "|") else "=")


def _numpy_dtype(u, *args):
    return NumpyDType(*args)


def _numpy_scalar(u, dtype, data=b""):
    dtype = _need(dtype, NumpyDType, "a numpy scalar's dtype").to_numpy()
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"a numpy {dtype} scalar needs {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_reconstruct(u, cls, shape=(0,), typecode=b"b"):
    if cls is not np.ndarray:
        raise UnsafePickleError(f"refusing to reconstruct a numpy array of class {_what(cls)}")
    return np.empty(0, dtype=np.uint8)  # BUILD sets shape, dtype and data


def _set_array_state(array: np.ndarray, state) -> None:
    """BUILD of a fresh array: ``(version, shape, dtype, is_fortran, raw bytes)`` as numpy pickles it."""
    if array.nbytes or not isinstance(state, tuple) or len(state) != 5:
        raise UnsafePickleError("malformed numpy array state in checkpoint")
    version, shape, dtype, fortran, raw = state
    dtype = _need(dtype, NumpyDType, "a numpy array's dtype").to_numpy()
    shape = _ints(shape, "a numpy array's shape")
    if not isinstance(raw, bytes) or len(raw) != math.prod(shape) * dtype.itemsize:
        raise pickle.UnpicklingError(f"a numpy array of shape {list(shape)} needs {math.prod(shape) * dtype.itemsize} "
                                     "bytes of data")
    array.__setstate__((version, shape, dtype, bool(fortran), raw))


SAFE_CALLS = {
    **{("builtins", t.__name__): _Safe(t.__name__, _container(t)) for t in (dict, list, tuple, set, frozenset)},
    **{("builtins", t.__name__): _Safe(t.__name__, _scalar(t)) for t in (int, float, complex, str, bytes,
                                                                         bytearray, bool)},
    ("builtins", "object"): _Safe("object", _object),
    ("_codecs", "encode"): _Safe("_codecs.encode", _latin1),
    ("collections", "OrderedDict"): _Safe("OrderedDict", _container(collections.OrderedDict)),
    ("collections", "defaultdict"): _Safe("defaultdict", _defaultdict),
    ("torch._utils", "_rebuild_tensor_v2"): _Safe("_rebuild_tensor_v2", _rebuild_tensor),
    ("torch._utils", "_rebuild_tensor"): _Safe("_rebuild_tensor", _rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v3"): _Safe("_rebuild_tensor_v3", _rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Safe("_rebuild_parameter", _rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Safe("_rebuild_parameter_with_state", _rebuild_parameter),
    ("torch.storage", "_load_from_bytes"): _Safe("_load_from_bytes", _storage_from_bytes),
    ("torch", "Size"): _Safe("torch.Size", _torch_size),
    ("torch", "device"): _Safe("torch.device", _torch_device),
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Safe("_reconstruct_persistent_obj", _persistent_obj),
    ("copyreg", "_reconstructor"): _Safe("_reconstructor", _reconstructor),
    ("numpy", "dtype"): _Safe("numpy.dtype", _numpy_dtype),
}
for _np_core in ("numpy.core.multiarray", "numpy._core.multiarray"):
    SAFE_CALLS[(_np_core, "scalar")] = _Safe("numpy scalar", _numpy_scalar)
    SAFE_CALLS[(_np_core, "_reconstruct")] = _Safe("numpy _reconstruct", _numpy_reconstruct)
SAFE_VALUES = {("numpy", "ndarray"): np.ndarray}  # handed out as is: only passed to _reconstruct, never called


# ---------------------------------------------------------------------------------------------
# The unpickler


class _BoundedReader:
    """A file's ``read``/``readline`` that refuse to ask for more bytes than are left (checked before reading)."""

    def __init__(self, file):
        self.file = file
        here = file.tell()
        self.left = file.seek(0, io.SEEK_END) - here
        file.seek(here)

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            raise pickle.UnpicklingError(f"truncated: the pickle asks for {n} bytes, the file has {self.left} left")
        data = self.file.read(n)
        self.left -= len(data)
        if len(data) != n:
            raise pickle.UnpicklingError("truncated: the file ended early")
        return data

    def readline(self) -> bytes:
        line = self.file.readline()
        self.left -= len(line)
        return line

    def readinto(self, buf) -> None:
        with memoryview(buf) as view:
            if view.nbytes > self.left or self.file.readinto(view) != view.nbytes:
                raise pickle.UnpicklingError("truncated: the file ended early")
            self.left -= view.nbytes


def _what(obj) -> str:
    """How an error names an object from the pickle (no repr of arbitrary, possibly huge or deep, data)."""
    if isinstance(obj, (PickledObject, _Safe, type, str)):
        return f"{obj!r:.80}"
    return f"a {type(obj).__name__}"


def _pairs(items: list) -> list:
    if len(items) % 2:
        raise pickle.UnpicklingError("a dict needs keys and values in pairs")
    return items


def _counted(op):
    def run(self):
        self.charge(1)
        op(self)
    run.__name__ = op.__name__
    return run


class Unpickler(pickle._Unpickler):
    """The pure-Python unpickler with every opcode that can call, change or allocate restricted (module docstring).

    Storages made from the pickle's own bytes (``_load_from_bytes``) may add up to no more than those bytes."""

    def __init__(self, file, *, persistent_load=None):
        self.reader = _BoundedReader(file)
        super().__init__(self.reader)
        if persistent_load is not None:
            self.persistent_load = persistent_load
        self.ops_left = MAX_OPCODES
        self.bytes_left = self.reader.left
        self.classes: dict[tuple[str, str], type] = {}

    def charge(self, n: int) -> None:
        self.ops_left -= n
        if self.ops_left < 0:
            raise UnsafePickleError(f"the pickle needs more than {MAX_OPCODES:,} steps; no checkpoint does")

    def charge_bytes(self, n: int) -> None:
        self.bytes_left -= n
        if self.bytes_left < 0:
            raise UnsafePickleError("the pickle's storages need more bytes than the file holds")

    def stand_in(self, module: str, name: str) -> type:
        """The :class:`PickledObject` subclass standing in for ``module.name`` (one per name and unpickler)."""
        if (module, name) not in self.classes:
            if len(self.classes) >= MAX_CLASSES:
                raise UnsafePickleError(f"the pickle names more than {MAX_CLASSES:,} classes; no checkpoint does")
            self.classes[module, name] = type(name, (PickledObject,), {"module": module, "name": name})
        return self.classes[module, name]

    def find_class(self, module: str, name: str):
        # Python 2 names (__builtin__, copy_reg, ...), as torch.save's protocol 2 writes them
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key in SAFE_CALLS:
            return SAFE_CALLS[key]
        if key in SAFE_VALUES:
            return SAFE_VALUES[key]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in ("torch", "torch.storage") and name in STORAGE_TYPES:
            return StorageType(STORAGE_TYPES[name])
        if module.startswith(DATA_CLASS_MODULES):
            return self.stand_in(module, name)
        raise UnsafePickleError(f"checkpoint asks for {module}.{name}, which is not allowed in a checkpoint; refusing to load it")

    def persistent_load(self, pid):  # replaced (per instance) where a torch.save format defines persistent ids
        raise UnsafePickleError("a persistent id outside a torch.save file")

    # -- opcodes that call ---------------------------------------------------------------------
    def _call(self, func, args, kwargs=None):
        if not isinstance(args, tuple) or (kwargs is not None and not (
                isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs))):
            raise pickle.UnpicklingError("malformed call arguments in pickle")
        if isinstance(func, _Safe) and not kwargs:
            return func.fn(self, *args)
        if _is_stand_in_class(func):
            return func(*args, **(kwargs or {}))
        raise UnsafePickleError(f"checkpoint asks to call {_what(func)}, which is not allowed")

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if not _is_stand_in_class(cls):
            raise UnsafePickleError(f"checkpoint asks to create {_what(cls)}, which is not allowed")
        self.append(self._call(cls, args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if not _is_stand_in_class(cls):
            raise UnsafePickleError(f"checkpoint asks to create {_what(cls)}, which is not allowed")
        self.append(self._call(cls, args, kwargs))

    def _instantiate(self, klass, args):  # INST and OBJ (protocols 0 and 1)
        self.append(self._call(klass, tuple(args)))

    # -- opcodes that change an object ---------------------------------------------------------
    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, PickledObject):
            inst.__setstate__(state)
        elif type(inst) is collections.OrderedDict and isinstance(state, dict):  # state_dict()._metadata
            for key, value in state.items():
                if not (isinstance(key, str) and key.isidentifier() and not hasattr(collections.OrderedDict, key)):
                    raise UnsafePickleError(f"checkpoint asks to set attribute {key!r:.40} of an OrderedDict")
                inst.__dict__[key] = value
        elif type(inst) is np.ndarray:
            _set_array_state(inst, state)
        else:
            raise UnsafePickleError(f"checkpoint asks to change the state of {_what(inst)}; only plain records "
                                    "may be changed")

    def _target(self, kinds, what):
        target = self.stack[-1]
        if not isinstance(target, kinds):
            raise UnsafePickleError(f"checkpoint asks to {what} {_what(target)}")
        return target

    def load_append(self):
        value = self.stack.pop()
        self._target((list, PickledObject), "append to").append(value)

    def load_appends(self):
        items = self.pop_mark()
        target = self._target((list, PickledObject), "append to")
        for item in items:
            target.append(item)

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        _check_key(key)
        self._target((dict, PickledObject), "set an item of")[key] = value

    def load_setitems(self):
        items = _pairs(self.pop_mark())
        target = self._target((dict, PickledObject), "set an item of")
        for i in range(0, len(items), 2):
            _check_key(items[i])
            target[items[i]] = items[i + 1]

    def load_additems(self):
        items = self.pop_mark()
        target = self._target(set, "add to")
        for item in items:
            _check_key(item)
            target.add(item)

    # -- opcodes that hash or allocate ---------------------------------------------------------
    def load_dict(self):
        items = _pairs(self.pop_mark())
        for key in items[::2]:
            _check_key(key)
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    def load_frozenset(self):
        items = self.pop_mark()
        for item in items:
            _check_key(item)
        self.append(frozenset(items))

    def load_bytearray8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        self.append(bytearray(self.read(n)))  # read() checks n against the bytes left before allocating

    # every opcode counted; these ones replaced
    dispatch: ClassVar[dict] = {code: _counted(fn) for code, fn in {**pickle._Unpickler.dispatch, **{
        op[0]: fn for op, fn in ((pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_newobj),
                                 (pickle.NEWOBJ_EX, load_newobj_ex), (pickle.BUILD, load_build),
                                 (pickle.APPEND, load_append), (pickle.APPENDS, load_appends),
                                 (pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems),
                                 (pickle.ADDITEMS, load_additems), (pickle.DICT, load_dict),
                                 (pickle.FROZENSET, load_frozenset), (pickle.BYTEARRAY8, load_bytearray8))}}.items()}


def load(file, *, persistent_load=None):
    """One pickle from ``file`` through :class:`Unpickler`."""
    return Unpickler(file, persistent_load=persistent_load).load()


def loads(data: bytes, **kwargs):
    return load(io.BytesIO(data), **kwargs)


# ---------------------------------------------------------------------------------------------
# torch.save files


def load_torch(file):
    """The object in a ``torch.save`` file (zip or legacy format) or a plain pickle, read as data."""
    head = file.read(4)
    file.seek(-len(head), io.SEEK_CUR)
    if head == b"PK\x03\x04":
        return _load_zip(file)
    unpickler = Unpickler(file)
    first = unpickler.load()
    return _load_legacy(unpickler) if type(first) is int and first == LEGACY_MAGIC else first


def _storage_pid(pid, length: int):
    """(dtype, key, numel) of a ``('storage', storage_type, key, location, numel[, view])`` persistent id."""
    if not (isinstance(pid, tuple) and len(pid) == length and pid[0] == "storage"):
        raise UnsafePickleError(f"unsupported persistent id ({_what(pid)}) in torch.save file")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    _need(storage_type, StorageType, "a storage's type")
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise pickle.UnpicklingError("malformed storage id in torch.save file")
    return storage_type.dtype, key, numel


def _load_legacy(unpickler: Unpickler):
    """The rest of torch.save's legacy format after its magic number: protocol, system info, the object, storage
    keys, then per storage an 8-byte little-endian element count and its little-endian bytes. Storages are
    allocated only up to the bytes left in the file; module classes (``('module', cls, file, source)`` ids)
    become stand-ins, their source unused. The pickles share one unpickler, and so one opcode budget."""
    if unpickler.load() != LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("unsupported legacy torch.save protocol")
    _need(unpickler.load(), dict, "the legacy torch.save system information")
    storages: dict[str, tuple[Storage, bytearray]] = {}
    left = [unpickler.reader.left]

    def persistent_load(pid):
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module" and _is_stand_in_class(pid[1]):
            return pid[1]
        dtype, key, numel = _storage_pid(pid, 6)
        if pid[5] is not None:
            raise UnsafePickleError("storage views of the legacy torch.save format are not supported")
        if key not in storages:
            left[0] -= numel * dtype.itemsize
            if left[0] < 0:
                raise pickle.UnpicklingError("truncated: the storages need more bytes than the file holds")
            storages[key] = _new_storage(dtype, numel * dtype.itemsize)
        storage = storages[key][0]
        if storage.dtype != dtype or storage.data.numel() != numel * dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key} is declared twice with different types or sizes")
        return storage

    unpickler.persistent_load = persistent_load
    obj = unpickler.load()
    del unpickler.persistent_load
    for key in _need(unpickler.load(), list, "the legacy torch.save storage keys"):
        if key not in storages:
            raise pickle.UnpicklingError(f"storage {_what(key)} is listed but never used")
        storage, buf = storages[key]
        if int.from_bytes(unpickler.reader.read(8), "little") * storage.dtype.itemsize != len(buf):
            raise pickle.UnpicklingError(f"storage {key} has a different size than declared")
        unpickler.reader.readinto(buf)
        _to_native(storage, "little")
    return obj


def _to_native(storage: Storage, byteorder: str) -> None:
    size = storage.dtype.itemsize
    if byteorder != sys.byteorder and size > 1 and storage.data.numel():
        storage.data.copy_(storage.data.view(-1, size).flip(1).reshape(-1))


def _load_zip(file):
    """torch.save's zip format: ``<prefix>/data.pkl`` with ``('storage', type, key, location, numel)`` ids whose
    bytes are the uncompressed records ``<prefix>/data/<key>``; ``<prefix>/byteorder`` says their byte order."""
    size = file.seek(0, io.SEEK_END)
    end = zipfile._EndRecData(file)  # zipfile's reader of the end-of-directory record (zip64 too), before the listing
    if end is not None and end[zipfile._ECD_ENTRIES_TOTAL] > MAX_RECORDS:
        raise UnsafePickleError(f"a zip of {end[zipfile._ECD_ENTRIES_TOTAL]:,} records; torch.save writes one per "
                                f"storage, and no checkpoint needs more than {MAX_RECORDS:,}")
    file.seek(0)
    with zipfile.ZipFile(file) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        prefix = next(iter(infos), "").split("/", 1)[0]
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in infos):
            raise UnsafePickleError("a TorchScript archive: loading it would run the code it holds; save the "
                                    "weights with torch.save(model.state_dict()) instead")
        for info in infos.values():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                raise UnsafePickleError(f"compressed record {info.filename!r:.60} (torch.save stores records "
                                        "uncompressed)")
            if not info.filename.startswith(f"{prefix}/"):
                raise pickle.UnpicklingError(f"record {info.filename!r:.60} is not under {prefix}/ like the others")
            if info.header_offset + info.compress_size > size:
                raise pickle.UnpicklingError(f"record {info.filename!r:.60} lies outside the archive")

        def record(name: str, nbytes: int | None = None):
            """The open record (its size checked against ``nbytes`` before anything is allocated for it)."""
            if name not in infos:
                raise pickle.UnpicklingError(f"record {name!r:.60} is missing")
            if nbytes is not None and infos[name].file_size != nbytes:
                raise pickle.UnpicklingError(f"record {name} has {infos[name].file_size} bytes, the pickle "
                                             f"declares {nbytes}")
            return archive.open(infos[name])

        byteorder = "little"
        if f"{prefix}/byteorder" in infos:
            with record(f"{prefix}/byteorder") as f:
                byteorder = f.read(16).decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise pickle.UnpicklingError(f"unknown byte order {byteorder!r:.20}")
        storages: dict[str, Storage] = {}

        def persistent_load(pid):
            dtype, key, numel = _storage_pid(pid, 5)
            if key not in storages:
                with record(f"{prefix}/data/{key}", numel * dtype.itemsize) as f:
                    storage, buf = _new_storage(dtype, numel * dtype.itemsize)
                    if f.readinto(buf) != len(buf):
                        raise pickle.UnpicklingError(f"record data/{key} is truncated")
                _to_native(storage, byteorder)
                storages[key] = storage
            if storages[key].dtype != dtype or storages[key].data.numel() != numel * dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {key} is declared twice with different types or sizes")
            return storages[key]

        with record(f"{prefix}/data.pkl") as f:
            data = f.read()
        return load(io.BytesIO(data), persistent_load=persistent_load)


# ---------------------------------------------------------------------------------------------
# Turning records into plain data


def to_plain(obj, depth: int = 0):
    """Turn omegaconf/dnnlib containers (as :class:`PickledObject`) into plain dicts, lists and values."""
    if depth > MAX_DEPTH:
        raise pickle.UnpicklingError(f"data nested deeper than {MAX_DEPTH} levels (or containing itself)")
    if isinstance(obj, PickledObject):
        state = obj.state if isinstance(obj.state, dict) else {}
        if "_content" in state:  # omegaconf DictConfig / ListConfig
            return to_plain(state["_content"], depth + 1)
        if "_val" in state:  # omegaconf value nodes
            return to_plain(state["_val"], depth + 1)
        if obj.dictitems:
            return {k: to_plain(v, depth + 1) for k, v in obj.dictitems.items()}
        if obj.listitems:
            return [to_plain(v, depth + 1) for v in obj.listitems]
        if obj.args and len(obj.args) == 1 and isinstance(obj.args[0], (dict, list, tuple)):
            return to_plain(obj.args[0], depth + 1)
        return obj
    if isinstance(obj, dict):
        return {k: to_plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, depth + 1) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
