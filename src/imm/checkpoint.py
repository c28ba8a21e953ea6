"""Loading and saving IMM networks.

Readable inputs:

* the release's pickles (``cifar10.pt``, ``imagenet256_ts_a2.pkl``, ``imagenet256_s_a1.pkl``): a dict
  whose ``ema`` entry is the network, read through :mod:`imm.safe_pickle` (no code from the file runs);
* files written by ``torch.save``: a whole network, ``{'ema': ...}``, or a plain state_dict;
* our own format: one ``.safetensors`` file with the network's configuration as JSON in its
  metadata (``imm convert`` and the trainer write it).

The network's configuration comes from the file itself (the pickled constructor arguments) and
keyword overrides apply on top; files that carry none (plain state_dicts) need the whole
configuration as overrides.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path

import torch

from . import safe_pickle
from .precond import IMM_NETWORK_KEYS, MIXED_PRECISION, IMMNetwork

FORMAT_NAME = "imm-network"
FORMAT_VERSION = "1"
NETWORK_CLASSES = ("IMMPrecond", "IMMNetwork")
# attributes of the release's IMMPrecond that its forward pass reads (they win over _init_kwargs)
_RUNTIME_ATTRS = ("img_resolution", "img_channels", "label_dim", "noise_schedule", "sigma_data",
                  "f_type", "T", "eps", "temb_type", "time_scale")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------
# Reading


def _file_kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) == 0:
        raise CheckpointError(f"{path}: file is empty")
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < path.stat().st_size:
            return "safetensors"
    raise CheckpointError(f"{path}: not a checkpoint (neither a pickle, a torch.save zip nor a safetensors file)")


def _read_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from None
    config = json.loads(meta["config"]) if "config" in meta else None
    return config, tensors


def _read_pickled(path: Path, kind: str):
    try:
        if kind == "torch-zip":
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle)
        with open(path, "rb") as f:
            obj = safe_pickle.load(f)
        if isinstance(obj, int):  # legacy (pre-1.6) torch.save: a magic number comes first
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle)
        return obj
    except safe_pickle.UnsafePickleError as e:
        raise CheckpointError(f"{path}: refused: {e}") from None
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, ValueError,
            TypeError, AttributeError, IndexError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {e})") from None


def _module_state(obj) -> dict:
    state = obj.state
    if not isinstance(state, dict) or "_modules" not in state:
        raise CheckpointError(f"object {obj!r} is not a torch module")
    return state


def _module_tensors(obj, prefix: str = "", out: dict | None = None) -> dict:
    """state_dict of a pickled module tree (parameters, persistent buffers, children)."""
    out = {} if out is None else out
    state = _module_state(obj)
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value.detach()
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _module_tensors(child, f"{prefix}{name}.", out)
    return out


def _module_config(obj) -> dict:
    """Constructor arguments of a pickled IMMPrecond/IMMNetwork, as plain data."""
    state = _module_state(obj)
    if isinstance(state.get("config"), dict):  # our own IMMNetwork pickled whole
        return safe_pickle.to_plain(state["config"])
    args = safe_pickle.to_plain(state.get("_init_args") or [])
    config = dict(zip(IMM_NETWORK_KEYS, args))
    config.update(safe_pickle.to_plain(state.get("_init_kwargs") or {}))
    for key in _RUNTIME_ATTRS:
        if key in state and isinstance(state[key], (int, float, str)):
            config[key] = state[key]
    if "mixed_precision" not in config and state.get("use_mixed_precision"):
        by_dtype = {v: k for k, v in MIXED_PRECISION.items()}
        config["mixed_precision"] = by_dtype.get(state.get("mixed_precision"))
    return config


def _training_state(obj, path: Path):
    """(config, first EMA's tensors) of a trainer checkpoint (``imm train``'s training-state-*.pt)."""
    emas = obj.get("ema") or {}
    if not emas or not isinstance(obj.get("network_config"), dict):
        raise CheckpointError(f"{path}: training state without network configuration or EMA weights")
    return dict(obj["network_config"]), dict(next(iter(emas.values())))


def read_checkpoint(path) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(network configuration or None, state_dict) from any supported file, without building the network."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    kind = _file_kind(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    obj = _read_pickled(path, kind)
    if isinstance(obj, dict) and obj.get("format") == "imm-training":
        return _training_state(obj, path)
    net = obj["ema"] if isinstance(obj, dict) and "ema" in obj else obj  # the release keeps the network under 'ema'
    if isinstance(net, safe_pickle.PickledObject):
        if net.name not in NETWORK_CLASSES:
            raise CheckpointError(f"{path}: not an IMM checkpoint (the network is a {net.name}, expected IMMPrecond)")
        return _module_config(net), _module_tensors(net)
    if isinstance(net, dict) and net and all(isinstance(v, torch.Tensor) for v in net.values()):
        if not any(k.startswith("model.") for k in net):  # a bare backbone state_dict
            net = {f"model.{k}": v for k, v in net.items()}
        return None, dict(net)
    raise CheckpointError(f"{path}: not an IMM checkpoint (found {type(net).__name__}; expected a dict with 'ema', a network or a state_dict)")


# ---------------------------------------------------------------------------------------------
# Building


def check_state_dict(net: torch.nn.Module, tensors: dict, source: str = "checkpoint") -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped tensor by name."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k} {list(tensors[k].shape)} != {list(v.shape)}" for k, v in expected.items()
              if k in tensors and tensors[k].shape != v.shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source}: configuration and tensors disagree: " + "; ".join(problems))


def build_network(config: dict, source: str = "config") -> IMMNetwork:
    try:
        return IMMNetwork(**config)
    except TypeError as e:
        raise CheckpointError(f"{source}: bad network configuration: {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def network_from_tensors(config: dict, tensors: dict, source: str = "checkpoint", device="cpu") -> IMMNetwork:
    """Build the network of ``config``, check and load ``tensors``, return it in eval mode without grad."""
    if "img_resolution" not in config or "img_channels" not in config:
        raise CheckpointError(f"{source}: the file carries no network configuration; pass it as overrides "
                              "(or a config file's network: section), e.g. img_resolution, img_channels, model_type")
    net = build_network(config, source=source)
    check_state_dict(net, tensors, source=source)
    net.load_state_dict(tensors, strict=True)
    return net.eval().requires_grad_(False).to(device)


def load_network(path, device: str | torch.device = "cpu", **overrides) -> IMMNetwork:
    """Load an IMM network ready for sampling (EMA weights, eval mode, no grad).

    Args:
        path: a released pickle, a ``torch.save`` file, or our ``.safetensors`` format.
        device: where to put the network.
        **overrides: configuration keys that replace the file's (e.g. ``temb_type='identity'``,
            which the release's ``imagenet256_s_a1.pkl`` needs); for plain state_dicts, the whole
            configuration (``img_resolution``, ``img_channels``, ``model_type``, ...).
    """
    config, tensors = read_checkpoint(path)
    return network_from_tensors({**(config or {}), **overrides}, tensors, str(path), device)


# ---------------------------------------------------------------------------------------------
# Writing


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)``, fsync it, then rename over ``path``: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
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


def save_network(net: IMMNetwork, path) -> None:
    """Write ``net`` as one .safetensors file: weights plus the JSON configuration in its metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": json.dumps(net.config, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def convert(src, dst, **overrides) -> IMMNetwork:
    """Read any supported checkpoint and write it in our format (``imm convert``)."""
    net = load_network(src, **overrides)
    save_network(net, dst)
    return net
