"""Loading and saving IMM networks, and the trainer's checkpoints (``training-state-STEP.pt``).

Readable inputs:

* the pickles of the official release (github.com/lumalabs/imm; on the Hugging Face Hub as ``lumaai/imm``:
  ``cifar10.pt``, ``imagenet256_ts_a2.pkl``, ``imagenet256_s_a1.pkl``): a dict whose ``ema`` entry is the
  network, read through :mod:`imm.io.safe_pickle` (no code from the file runs);
* files written by ``torch.save``: a whole network, ``{'ema': ...}``, or a plain state_dict;
* our own format: one ``.safetensors`` file with the network's configuration as JSON in its
  metadata (``imm convert`` and the trainer write it).

The trainer's checkpoints (``training-state-STEP.pt``, written by ``imm.training.state.TrainingState.save``,
kept and found by :mod:`imm.training.checkpoints`) are ``torch.save`` dicts of plain data (step, config,
network configuration, online and EMA state_dicts, optimizer state), read through the restricted
unpickler too (:func:`read_training_state`); ``load_network`` reads their first EMA.

The network's configuration comes from the file itself (the pickled constructor arguments) and
keyword overrides apply on top; files that carry none (plain state_dicts) need the whole
configuration as overrides.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from imm.core.errors import InputError
from imm.core.files import atomic_write
from imm.core.release import NETWORK_CLASSES, canonical
from imm.io import hub, safe_pickle
from imm.model.network import IMM_NETWORK_KEYS, MIXED_PRECISION, IMMNetwork

FORMAT_NAME = "imm-network"
FORMAT_VERSION = "1"
TRAINING_STATE_FORMAT = "imm-training"  # the "format" entry of the trainer's training-state-STEP.pt
# attributes of the release's IMMPrecond that its forward pass reads (they win over _init_kwargs)
_RUNTIME_ATTRS = ("img_resolution", "img_channels", "label_dim", "noise_schedule", "sigma_data",
                  "f_type", "T", "eps", "temb_type", "time_scale")


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------
# Reading

# What parsing a damaged file can raise (RecursionError is a RuntimeError, OverflowError an ArithmeticError,
# JSONDecodeError and UnicodeDecodeError are ValueErrors, KeyError and IndexError LookupErrors).
_DAMAGED = (EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, zipfile.LargeZipFile, struct.error,
            ValueError, TypeError, AttributeError, LookupError, ArithmeticError, RuntimeError)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


@contextlib.contextmanager
def _reading(path: Path):
    """Turn whatever a damaged or hostile file raises into one CheckpointError line naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except safe_pickle.UnsafePickleError as e:
        raise CheckpointError(f"{path}: refused: {_one_line(e)}") from None
    except _DAMAGED as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {_one_line(e)})") from None


def _existing_file(path) -> Path:
    """``path`` as a regular file; an ``hf://`` path is the file's copy in the Hugging Face cache (:mod:`imm.io.hub`)."""
    if hub.is_hub_path(path):
        try:
            return hub.hub_file(path)
        except hub.HubError as e:
            raise CheckpointError(str(e)) from None
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise CheckpointError(f"{path}: not a regular file")
    return path


def _file_kind(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(head) == 0:
        raise CheckpointError(f"{path}: file is empty")
    if len(head) >= 9:  # first: a header length whose low byte is 0x80 would look like a pickle's start
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < path.stat().st_size:
            return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"  # a torch.save zip or a pickle (the release's, or torch.save's legacy format)
    raise CheckpointError(f"{path}: not a checkpoint (neither a pickle, a torch.save zip nor a safetensors file)")


def _read_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    try:  # the header's offsets are checked against the file size before any tensor is read
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file ({_one_line(e)})") from None
    if "config" not in meta:
        return None, tensors
    try:
        return json.loads(meta["config"]), tensors
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: the network configuration in its metadata is not valid JSON "
                              f"({_one_line(e)})") from None


def _read_object(path: Path):
    """The object in a pickle or torch.save file, read as data (:func:`imm.io.safe_pickle.load_torch`)."""
    with open(path, "rb") as f:
        return safe_pickle.load_torch(f)


def _module_state(obj, path: Path) -> dict:
    state = obj.state
    if not isinstance(state, dict) or "_modules" not in state:
        raise CheckpointError(f"{path}: object {obj!r} is not a torch module")
    return state


def _module_tensors(obj, path: Path, prefix: str = "", out: dict | None = None) -> dict:
    """state_dict of a pickled module tree (parameters, persistent buffers, children)."""
    out = {} if out is None else out
    if prefix.count(".") > safe_pickle.MAX_DEPTH:
        raise CheckpointError(f"{path}: modules nested deeper than {safe_pickle.MAX_DEPTH} levels (or containing "
                              "themselves)")
    state = _module_state(obj, path)
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value.detach()
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _module_tensors(child, path, f"{prefix}{name}.", out)
    return out


def _module_config(obj, path: Path) -> dict:
    """Constructor arguments of a pickled IMMPrecond/IMMNetwork, as plain data."""
    state = _module_state(obj, path)
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
    emas = obj.get("ema")
    if not isinstance(emas, dict) or not emas or not isinstance(obj.get("network_config"), dict):
        raise CheckpointError(f"{path}: training state without network configuration or EMA weights")
    return dict(obj["network_config"]), next(iter(emas.values()))


def _interpret(obj, path: Path):
    """(configuration or None, state_dict) of an unpickled release pickle, torch.save file or training state."""
    if isinstance(obj, dict) and obj.get("format") == TRAINING_STATE_FORMAT:
        return _training_state(obj, path)
    net = obj["ema"] if isinstance(obj, dict) and "ema" in obj else obj  # the release keeps the network under 'ema'
    if isinstance(net, safe_pickle.PickledObject):
        if net.name not in NETWORK_CLASSES:
            raise CheckpointError(f"{path}: not an IMM checkpoint (the network is a {net.name}, expected IMMPrecond)")
        return _module_config(net, path), _module_tensors(net, path)
    if isinstance(net, dict) and net and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in net.items()):
        if not any(k.startswith("model.") for k in net):  # a bare backbone state_dict
            net = {f"model.{k}": v for k, v in net.items()}
        return None, dict(net)
    raise CheckpointError(f"{path}: not an IMM checkpoint (found {type(net).__name__}; expected a dict with 'ema', a network or a state_dict)")


def _checked(config, tensors, path: Path):
    """The configuration is a mapping of names to plain (JSON-writable) data; tensors map names to tensors."""
    if config is not None:
        if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
            raise CheckpointError(f"{path}: the network configuration is a {type(config).__name__}, not a mapping "
                                  "of names to values")
        json.dumps(config, default=repr)  # refuses cycles, deep nesting and keys JSON cannot write
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise CheckpointError(f"{path}: the weights are not a mapping of names to tensors")
    return config, tensors


def read_checkpoint(path) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(network configuration or None, state_dict) from any supported file, without building the network.

    Raises :class:`CheckpointError` (one line naming the file) for any file it cannot read."""
    path = _existing_file(path)
    with _reading(path):
        if _file_kind(path) == "safetensors":
            return _checked(*_read_safetensors(path), path)
        return _checked(*_interpret(_read_object(path), path), path)


def read_checkpoint_and_settings(path) -> tuple[dict | None, dict[str, torch.Tensor], dict | None]:
    """:func:`read_checkpoint` and :func:`read_sampling_settings` of one file, which is read once (a
    training state is parsed whole for either)."""
    path = _existing_file(path)
    if _file_kind(path) == "safetensors":  # the settings are in the header: reading them alone is cheap
        return (*read_checkpoint(path), read_sampling_settings(path))
    with _reading(path):
        obj = _read_object(path)
        config, tensors = _checked(*_interpret(obj, path), path)
    recorded = obj.get("config") if path.name.startswith("training-state-") and isinstance(obj, dict) else None
    return config, tensors, sampling_settings(recorded)


def read_training_state(path) -> dict:
    """The whole of a trainer checkpoint (``training-state-*.pt``: step, config, model, EMAs, optimizer), as data."""
    path = _existing_file(path)
    with _reading(path):
        state = _read_object(path) if _file_kind(path) == "torch" else None
    if not (isinstance(state, dict) and state.get("format") == TRAINING_STATE_FORMAT):
        raise CheckpointError(f"{path}: not a training state written by imm train")
    return state


# ---------------------------------------------------------------------------------------------
# Building

# A network may need at most twice the tensor bytes its file holds (a float16 file fills a float32 network),
# plus this much for buffers no file stores.
_UNSTORED_BYTES = 64 * 2**20


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
    except (ArithmeticError, LookupError, AttributeError, RuntimeError) as e:  # values no network accepts
        raise CheckpointError(f"{source}: bad network configuration ({type(e).__name__}: {_one_line(e)})") from None


@contextlib.contextmanager
def _at_most(num_tensors: int):
    """Stop a network's construction as soon as it registers more parameters (or modules) than ``num_tensors``
    can fill: a configuration with depth=100000 fails after a few blocks instead of building them all."""
    count = {"parameters": 0, "modules": 0}
    limits = {"parameters": num_tensors + 16, "modules": 4 * num_tensors + 64}

    def registered(kind):
        def hook(module, name, value):
            count[kind] += 1
            if count[kind] > limits[kind]:
                raise InputError(f"the configuration builds more than {limits[kind]:,} {kind}, but the file holds "
                                 f"only {num_tensors:,} tensors")
        return hook

    handles = [torch.nn.modules.module.register_module_parameter_registration_hook(registered("parameters")),
               torch.nn.modules.module.register_module_module_registration_hook(registered("modules"))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_fits(config: dict, tensors: dict, source: str) -> None:
    """Build ``config``'s network on the meta device (no memory), bounded by the tensors at hand, and refuse it
    when its tensors disagree with them or need more bytes than they hold (broadcast or repeated views)."""
    with torch.device("meta"), _at_most(len(tensors)):
        net = build_network(config, source=source)
    check_state_dict(net, tensors, source=source)
    need = sum(t.numel() * t.element_size() for t in itertools.chain(net.parameters(), net.buffers()))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()}
    have = sum(storages.values())
    if need > 2 * have + _UNSTORED_BYTES:
        raise CheckpointError(f"{source}: the configuration describes a network of {need / 2**20:,.1f} MiB, more "
                              f"than the {have / 2**20:,.1f} MiB of tensor data in the file can fill")


def network_from_tensors(config: dict, tensors: dict, source: str = "checkpoint", device="cpu") -> IMMNetwork:
    """Build the network of ``config``, check and load ``tensors``, return it in eval mode without grad.

    Nothing is allocated before the configuration is checked against the tensors (:func:`_check_fits`)."""
    if "img_resolution" not in config or "img_channels" not in config:
        raise CheckpointError(f"{source}: the file carries no network configuration; pass it as overrides "
                              "(or a config file's network: section), e.g. img_resolution, img_channels, model_type")
    _check_fits(config, tensors, source)
    net = build_network(config, source=source)
    try:
        net.load_state_dict(tensors, strict=True)
    except (RuntimeError, TypeError) as e:  # e.g. complex tensors for a float network
        raise CheckpointError(f"{source}: cannot load the tensors ({_one_line(e)})") from None
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


def save_network(net: IMMNetwork, path, settings: dict | None = None) -> None:
    """Write ``net`` as one .safetensors file: weights plus the JSON configuration in its metadata."""
    save_weights(net.state_dict(), net.config, path, settings)


def save_weights(tensors: dict, config: dict, path, settings: dict | None = None) -> None:
    """Write a network's state_dict and configuration as :func:`save_network` does, without building it
    (the trainer's post-hoc EMA snapshots, ``imm ema reconstruct``). ``settings`` (:func:`sampling_settings`: the ``encoder``,
    ``sampling`` and ``eval`` sections of the training config) go into the metadata too, for
    :func:`read_sampling_settings`."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": json.dumps(config, sort_keys=True)}
    if settings:
        metadata["sampling_settings"] = json.dumps(settings, sort_keys=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


SAMPLING_SECTIONS = ("encoder", "sampling", "eval")


def sampling_settings(cfg) -> dict | None:
    """The non-empty ``encoder``/``sampling``/``eval`` sections of a training config in the canonical form
    (None: none), its ``dataset`` section when that is a toy 2-D target (a definition, not a path: generated
    plots show it) and its ``loss.kind``, so a baseline's network samples with its own sampler."""
    if not isinstance(cfg, dict):
        return None
    cfg = canonical(cfg)
    settings = {k: cfg[k] for k in SAMPLING_SECTIONS if cfg.get(k)}
    if isinstance(cfg.get("dataset"), dict) and cfg["dataset"].get("kind") == "toy2d":
        settings["dataset"] = cfg["dataset"]
    if settings and isinstance(cfg.get("loss"), dict) and cfg["loss"].get("kind"):
        settings["loss"] = {"kind": cfg["loss"]["kind"]}  # its own sampler (imm.methods.registry.entry_sampler)
    return settings or None


def read_sampling_settings(path) -> dict | None:
    """The ``encoder``/``sampling``/``eval`` sections a checkpoint of ``imm train`` records (the final
    ``network.safetensors`` and the ``training-state-*.pt`` files) in the canonical form (a file written with
    the release's keys is read too: :func:`imm.core.release.canonical`), or None for any other file (its
    header only is read for a safetensors file; nothing is read for other formats)."""
    path = _existing_file(path)
    kind = _file_kind(path)
    if kind == "safetensors":
        from safetensors import safe_open

        with _reading(path), safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("sampling_settings")
        with _reading(path):
            settings = json.loads(text) if text else None
        return canonical(settings) if isinstance(settings, dict) else None
    if kind == "torch" and path.name.startswith("training-state-"):
        return sampling_settings(read_training_state(path).get("config"))
    return None


def convert(src, dst, **overrides) -> IMMNetwork:
    """Read any supported checkpoint and write it in our format (``imm convert``)."""
    net = load_network(src, **overrides)
    save_network(net, dst)
    return net
