"""A restricted unpickler for the released checkpoints: reads them as data, never runs their code.

The release pickles its networks through EDM's ``persistence`` mechanism (a call to
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` whose ``meta`` embeds the module's
source code) and through ordinary classes of torch.nn, timm, omegaconf and dnnlib. Loading them
the official way executes that source. Here instead:

* tensors, storages, containers, numbers, strings, dtypes and numpy scalars/arrays are built as usual
  (tensor storages through ``torch.load(weights_only=True)``);
* the persistence call and classes of torch.nn, timm, omegaconf, dnnlib, torch_utils, training and
  imm become inert :class:`PickledObject` records (class name, constructor args, state); nothing is
  imported and ``module_src`` is never executed;
* any other global (``os.system``, ``builtins.eval``, ``functools.partial``, ...) is refused with
  :class:`UnsafePickleError` before it can be called.

This module also works as a ``pickle_module`` for ``torch.load`` (files written by ``torch.save``).
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import pickle

import numpy as np
import torch

__all__ = ["PickledObject", "UnsafePickleError", "Unpickler", "load", "loads", "to_plain"]

# Classes that are read as plain data: module prefixes of the release and the libraries it uses.
DATA_CLASS_MODULES = (
    "torch.nn.modules.", "torch.nn.parameter", "timm.", "omegaconf.", "dnnlib.", "torch_utils.",
    "training.", "imm.", "typing", "enum",
)
SAFE_BUILTINS = {
    name: getattr(builtins, name)
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str",
                 "bytes", "bytearray", "bool", "object", "slice", "range")
}
SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
}
try:  # numpy 2.x
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _np_multiarray
for _np_core in ("numpy.core.multiarray", "numpy._core.multiarray"):
    SAFE_GLOBALS[(_np_core, "scalar")] = _np_multiarray.scalar
    SAFE_GLOBALS[(_np_core, "_reconstruct")] = _np_multiarray._reconstruct


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks to import or call something outside the allow-list."""


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


_stand_ins: dict[tuple[str, str], type] = {}


def _stand_in(module: str, name: str) -> type:
    key = (module, name)
    if key not in _stand_ins:
        _stand_ins[key] = type(name, (PickledObject,), {"module": module, "name": name})
    return _stand_ins[key]


def _persistent_obj(meta):
    """Stand-in for EDM's ``_reconstruct_persistent_obj``: keep the class name and state, drop the source."""
    if not isinstance(meta, dict) or "class_name" not in meta:
        raise UnsafePickleError("malformed persistent object in checkpoint")
    obj = _stand_in("<persistent>", str(meta["class_name"]))()
    obj.state = meta.get("state")
    return obj


def _load_storage_bytes(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _reconstructor(cls, base, state=None):
    """copyreg._reconstructor for protocol 0/1 pickles, limited to our stand-ins."""
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)):
        raise UnsafePickleError(f"refusing to reconstruct {cls!r}")
    obj = cls()
    obj.state = state
    return obj


class Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only hands out allow-listed, side-effect-free callables."""

    def find_class(self, module: str, name: str):
        # Python 2 names (__builtin__, copy_reg, ...), as torch.save's protocol 2 writes them
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[module, name]
        if module == "builtins" and name in SAFE_BUILTINS:
            return SAFE_BUILTINS[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.storage" and name == "_load_from_bytes":
            return _load_storage_bytes
        if module == "torch_utils.persistence" and name == "_reconstruct_persistent_obj":
            return _persistent_obj
        if module == "copyreg" and name == "_reconstructor":
            return _reconstructor
        if module.startswith(DATA_CLASS_MODULES) or module in ("typing", "enum"):
            return _stand_in(module, name)
        raise UnsafePickleError(f"checkpoint asks for {module}.{name}, which is not allowed in a checkpoint; refusing to load it")


def load(file, **kwargs):
    """``pickle.load`` through :class:`Unpickler` (signature compatible with torch.load's pickle_module)."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs):
    return load(io.BytesIO(data), **kwargs)


def to_plain(obj):
    """Turn omegaconf/dnnlib containers (as :class:`PickledObject`) into plain dicts, lists and values."""
    if isinstance(obj, PickledObject):
        state = obj.state if isinstance(obj.state, dict) else {}
        if "_content" in state:  # omegaconf DictConfig / ListConfig
            return to_plain(state["_content"])
        if "_val" in state:  # omegaconf value nodes
            return to_plain(state["_val"])
        if obj.dictitems:
            return {k: to_plain(v) for k, v in obj.dictitems.items()}
        if obj.listitems:
            return [to_plain(v) for v in obj.listitems]
        if obj.args and len(obj.args) == 1 and isinstance(obj.args[0], (dict, list, tuple)):
            return to_plain(obj.args[0])
        return obj
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
