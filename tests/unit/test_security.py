"""Loading never runs, imports or changes anything a file names; what a file can make us allocate is bounded
by what it holds; every bad file gets one CheckpointError line naming it.

Hostile pickles are written opcode by opcode (opcode names and bytes as in the standard library's
``pickletools``).
"""

import collections
import importlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import tracemalloc
import types
import warnings
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import imm
from imm.cli import main
from imm.core.config import ConfigError, load_config, parse_value
from imm.io import safe_pickle
from imm.io.checkpoint import CheckpointError, read_checkpoint, read_training_state
from tests.helpers import FIXTURES

DIT = FIXTURES / "dit_imagenet_like.pkl"
UNET = FIXTURES / "unet_cifar_like.pkl"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER

# --- a small pickle assembler (protocol 2 opcodes) -------------------------------------------------
MARK, STOP, POP, NONE, TRUE, FALSE = b"(", b".", b"0", b"N", b"\x88", b"\x89"
TUPLE, TUPLE1, TUPLE2, EMPTY_TUPLE = b"t", b"\x85", b"\x86", b")"
EMPTY_DICT, EMPTY_LIST, SETITEM, SETITEMS, APPEND, APPENDS = b"}", b"]", b"s", b"u", b"a", b"e"
REDUCE, BUILD, BINPERSID = b"R", b"b", b"Q"


def glob(module: str, name: str) -> bytes:  # GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(value: str) -> bytes:  # BINUNICODE
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def num(value: int) -> bytes:  # BININT or LONG1
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def put(index: int) -> bytes:  # LONG_BINPUT
    return b"r" + struct.pack("<I", index)


def get(index: int) -> bytes:  # LONG_BINGET
    return b"j" + struct.pack("<I", index)


def pkl(*ops: bytes) -> bytes:
    return b"\x80\x02" + b"".join(ops) + STOP


def _set_attribute(module: str, name: str) -> bytes:
    """BUILD on an allowed global: sets ``pwned`` through both the __dict__ and the slot state."""
    return glob(module, name) + EMPTY_DICT + text("pwned") + TRUE + SETITEM + EMPTY_DICT + text("pwned") + TRUE + \
        SETITEM + TUPLE2 + BUILD


ALLOWED_FUNCTIONS = [("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
                     ("torch._utils", "_rebuild_parameter"), ("torch.storage", "_load_from_bytes"),
                     ("torch_utils.persistence", "_reconstruct_persistent_obj"), ("copyreg", "_reconstructor"),
                     ("collections", "OrderedDict"), ("builtins", "list"), ("torch.nn.modules.linear", "Linear")]


# --- hostile files -------------------------------------------------------------------------------

def _zip(path, records: dict) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in records.items():
            z.writestr(f"archive/{name}", data)


def _storage_pid(numel: int) -> bytes:
    return MARK + text("storage") + glob("torch", "FloatStorage") + text("0") + text("cpu") + num(numel) + TUPLE + \
        BINPERSID


def _tensor(storage: bytes, size: tuple, stride: tuple) -> bytes:
    return glob("torch._utils", "_rebuild_tensor_v2") + MARK + storage + num(0) + \
        MARK + b"".join(map(num, size)) + TUPLE + MARK + b"".join(map(num, stride)) + TUPLE + FALSE + \
        glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + TUPLE + REDUCE


def torchscript_archive(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's notice
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))


def zip_with_constants(path):
    torch.save({"ema": {"w": torch.ones(2)}}, path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(f"{path.stem}/constants.pkl", pickle.dumps(()))


def legacy_dump_patches(path):
    """Legacy torch.save whose 'module' id names a function with dump_patches and a __name__ chosen by the file:
    torch's legacy loader writes <__name__>.patch with the file's text."""
    attrs = EMPTY_DICT + MARK + text("dump_patches") + TRUE + text("__name__") + text(str(path.parent / "pwned")) + \
        SETITEMS
    module_id = MARK + text("module") + glob("torch._utils", "_rebuild_tensor_v2") + NONE + attrs + TUPLE2 + BUILD + \
        text("evil.py") + text("print('patched')\n") + TUPLE + BINPERSID
    path.write_bytes(pkl(num(LEGACY_MAGIC)) + pkl(num(1001)) + pkl(EMPTY_DICT) + pkl(module_id) + pkl(EMPTY_LIST))


def build_defaults(path):
    """70 bytes: new __defaults__ for _rebuild_tensor_v2 (metadata {"neg": True}: every later tensor negated)."""
    path.write_bytes(pkl(glob("torch._utils", "_rebuild_tensor_v2"), NONE, EMPTY_DICT, text("__defaults__"),
                         EMPTY_DICT, text("neg"), TRUE, SETITEM, TUPLE1, SETITEM, TUPLE2, BUILD))


def build_on_allowed(path):
    path.write_bytes(pkl(MARK, *[_set_attribute(m, n) for m, n in ALLOWED_FUNCTIONS], TUPLE))


def list_of_range(path):
    path.write_bytes(pkl(glob("builtins", "list"), glob("builtins", "range"), num(10**6), TUPLE1, REDUCE, TUPLE1,
                         REDUCE))


def huge_bytes(path):
    path.write_bytes(pkl(glob("builtins", "bytes"), num(10**12), TUPLE1, REDUCE))


def huge_ndarray(path):
    path.write_bytes(pkl(glob("numpy", "ndarray"), num(10**12), TUPLE1, TUPLE1, REDUCE))


def memo_amplification(path):
    """One list of 100,000 items copied 100 times through the memo: 10 million items from 500 KB."""
    copies = (get(1) + get(0) + TUPLE1 + REDUCE + POP) * 100
    path.write_bytes(pkl(EMPTY_LIST, put(0), MARK, b"K\x01" * 100_000, APPENDS, POP, glob("builtins", "list"),
                         put(1), POP, copies, NONE))


def frame_overflow(path):
    path.write_bytes(b"\x80\x04\x95" + b"\xff" * 8 + b"N.")


def zip_bomb(path):
    """The records of a torch.save zip deflated: 8 MB of zeros in a few KB."""
    buf = io.BytesIO()
    torch.save({"ema": {"model.w": torch.zeros(2_000_000)}}, buf)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))


def storage_size_lie(path):
    _zip(path, {"data.pkl": pkl(EMPTY_DICT, text("model.w"), _tensor(_storage_pid(10**12), (4,), (1,)), SETITEM),
                "data/0": bytes(16), "byteorder": b"little"})


def broadcast_view(path):
    """One float viewed as 10^12 elements (stride 0)."""
    _zip(path, {"data.pkl": pkl(EMPTY_DICT, text("model.w"), _tensor(_storage_pid(1), (10**6, 10**6), (0, 0)),
                                SETITEM), "data/0": bytes(4), "byteorder": b"little"})


def legacy_storage_bomb(path):
    pid = MARK + text("storage") + glob("torch", "FloatStorage") + text("0") + text("cpu") + num(10**9) + NONE + \
        TUPLE + BINPERSID
    path.write_bytes(pkl(num(LEGACY_MAGIC)) + pkl(num(1001)) + pkl(EMPTY_DICT) + pkl(pid) + pkl(EMPTY_LIST,
                                                                                               text("0"), APPEND))


class _Record:
    """Pickles (protocol 2) as an instance of ``training.networks.IMMPrecond`` with the given __dict__."""

    def __init__(self, **state):
        self.__dict__.update(state)


def _release_like(state: dict, raw: bytes = b"") -> bytes:
    """A release-like pickle {'ema': IMMPrecond record}; the string 'RAW' in ``state`` is replaced by ``raw``."""
    package, module = types.ModuleType("training"), types.ModuleType("training.networks")
    package.networks, module.IMMPrecond = module, _Record
    _Record.__module__, _Record.__qualname__ = "training.networks", "IMMPrecond"
    sys.modules.update({"training": package, "training.networks": module})
    try:
        data = pickle.dumps({"ema": _Record(_parameters={}, _buffers={}, **state)}, protocol=2)
    finally:
        del sys.modules["training"], sys.modules["training.networks"]
        _Record.__module__, _Record.__qualname__ = __name__, "_Record"
    return data.replace(text("RAW"), raw)


def deep_config(path):
    depth = 100_000
    path.write_bytes(_release_like({"_modules": {}, "_init_kwargs": {"x": "RAW"}},
                                   EMPTY_LIST * depth + APPEND * (depth - 1)))


def self_containing_config(path):
    path.write_bytes(_release_like({"_modules": {}, "_init_kwargs": "RAW"},
                                   EMPTY_DICT + put(10**6) + text("me") + get(10**6) + SETITEM))


def self_containing_module(path):
    record = _Record(_parameters={}, _buffers={})
    record._modules = {"child": record}
    path.write_bytes(_release_like({"_modules": {"child": record}}))


def deep_tuple_key(path):
    path.write_bytes(pkl(EMPTY_DICT, EMPTY_TUPLE, TUPLE1 * 100_000, NONE, SETITEM))


def _with_config(path, source, **changes):
    """The tensors of ``source`` with a configuration that describes a much bigger network."""
    config, tensors = read_checkpoint(source)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "imm-network", "config": json.dumps({**config, **changes})})


def wide_unet(path):  # about 40 GiB of float32 parameters
    _with_config(path, UNET, model_channels=4096, channel_mult=[2, 2])


def many_unet_blocks(path):
    _with_config(path, UNET, num_blocks=100_000)


def deep_dit(path):
    _with_config(path, DIT, depth=100_000)


def config_is_a_list(path):
    save_file({}, str(path), metadata={"config": "[1, 2]"})


def config_is_a_string(path):
    save_file({}, str(path), metadata={"config": '"img_resolution"'})


def config_not_json(path):
    save_file({}, str(path), metadata={"config": "{img_resolution: 32"})


def config_deep_json(path):
    save_file({}, str(path), metadata={"config": "[" * 100_000 + "]" * 100_000})


HOSTILE = {  # name: (how to make it, what its error says)
    "torchscript archive": (torchscript_archive, "TorchScript"),
    "zip with constants.pkl": (zip_with_constants, "TorchScript"),
    "legacy format with dump_patches": (legacy_dump_patches, "refused"),
    "BUILD __defaults__ of _rebuild_tensor_v2": (build_defaults, "refused"),
    "BUILD on allowed globals": (build_on_allowed, "refused"),
    "list(range(...))": (list_of_range, "refused"),
    "bytes(10**12)": (huge_bytes, "refused"),
    "numpy.ndarray((10**12,))": (huge_ndarray, "refused"),
    "memo amplification": (memo_amplification, "refused"),
    "FRAME length overflow": (frame_overflow, "corrupt"),
    "zip bomb": (zip_bomb, "compressed"),
    "storage larger than its record": (storage_size_lie, "declares"),
    "broadcast view": (broadcast_view, "does not fit"),
    "legacy storage larger than the file": (legacy_storage_bomb, "more bytes than the file"),
    "100k-deep config": (deep_config, "nested deeper"),
    "self-containing config": (self_containing_config, "nested deeper"),
    "self-containing module": (self_containing_module, "nested deeper"),
    "100k-deep tuple as a dict key": (deep_tuple_key, "refused"),
    "model_channels=4096": (wide_unet, "disagree"),
    "num_blocks=100000": (many_unet_blocks, "more than"),
    "DiT depth=100000": (deep_dit, "more than"),
    "config is a JSON list": (config_is_a_list, "not a mapping"),
    "config is a JSON string": (config_is_a_string, "not a mapping"),
    "config is not JSON": (config_not_json, "not valid JSON"),
    "config nested 100k deep": (config_deep_json, "not valid JSON"),
}
# readable as data (imm info shows them); only building their network must fail
BUILD_ONLY = {"model_channels=4096", "num_blocks=100000", "DiT depth=100000"}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    paths = {}
    for name, (make, _) in HOSTILE.items():
        paths[name] = folder / name.replace(" ", "_").replace("/", "_")
        make(paths[name])
    return paths


def _one_line(error, path) -> str:
    message = str(error)
    assert "\n" not in message and str(path) in message, message
    return message


def _allowed_globals() -> list:
    """The objects a pickle may name: the real ones and what the unpickler hands out in their place."""
    out = []
    for module, name in ALLOWED_FUNCTIONS:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except ImportError:  # torch_utils, the release's package, is never installed
            pass
        out.append(safe_pickle.Unpickler(io.BytesIO(b"")).find_class(module, name))
    return out


def _state(objects: list) -> list:
    """What a pickle could change on them: function defaults, names, attributes."""
    return [(getattr(o, "__defaults__", None), getattr(o, "__name__", None), dict(getattr(o, "__dict__", {})))
            for o in objects]


def _restore(objects: list, states: list) -> None:
    """Undo what a regression may have changed, so that one failure does not break the tests after it."""
    for obj, (defaults, name, attrs) in zip(objects, states):
        for key in set(getattr(obj, "__dict__", {})) - set(attrs):
            delattr(obj, key)
        if hasattr(obj, "__code__"):
            obj.__defaults__, obj.__name__ = defaults, name


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_file_gets_one_clear_error(hostile, name):
    expected = HOSTILE[name][1]
    with pytest.raises(CheckpointError, match=expected) as info:
        imm.load_network(hostile[name])
    _one_line(info.value, hostile[name])


def test_hostile_files_in_one_process_change_nothing(hostile, tmp_path, monkeypatch):
    """All hostile files loaded in one process: no code ran (no torch.load, torch.jit.load, no file written,
    no allowed global changed), and a fixture still loads with exactly its weights, as does torch.load."""
    reference = {k: v.clone() for k, v in imm.load_network(DIT).state_dict().items()}
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"w": torch.arange(4.0)}, unrelated)
    monkeypatch.chdir(tmp_path)
    before_files = set(tmp_path.rglob("*")) | set(next(iter(hostile.values())).parent.rglob("*"))
    watched = _allowed_globals()
    before = _state(watched)
    calls = []
    real_load, real_jit_load = torch.load, torch.jit.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append("torch.load") or real_load(*a, **k))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append("torch.jit.load") or real_jit_load(*a, **k))
    try:
        for name, path in hostile.items():
            for read in (imm.load_network,) if name in BUILD_ONLY else (imm.load_network, read_checkpoint,
                                                                          read_training_state):
                with pytest.raises(CheckpointError) as info:
                    read(path)
                _one_line(info.value, path)
        assert calls == []
        assert _state(watched) == before and _state(_allowed_globals()) == before
        assert set(tmp_path.rglob("*")) | set(next(iter(hostile.values())).parent.rglob("*")) == before_files
        assert not list(tmp_path.parent.glob("*.patch"))
        after = imm.load_network(DIT).state_dict()
        assert all(torch.equal(after[k], v) for k, v in reference.items())
        assert torch.equal(real_load(unrelated, weights_only=True)["w"], torch.arange(4.0))
    finally:
        _restore(watched, before)


def test_cli_info_prints_one_line_for_hostile_files(hostile, capsys):
    for name, path in hostile.items():
        if name in BUILD_ONLY:
            continue
        assert main(["info", str(path)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"imm info: error: {path}"), err
    out = subprocess.run([sys.executable, "-m", "imm", "info", str(hostile["torchscript archive"])],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr


def test_pickle_bombs_stay_small_in_memory(hostile):
    """Python allocations while refusing a pickle bomb stay near its size (tracemalloc counts them exactly)."""
    for name in ("list(range(...))", "memo amplification", "bytes(10**12)", "100k-deep tuple as a dict key"):
        tracemalloc.start()
        try:
            with pytest.raises(CheckpointError):
                read_checkpoint(hostile[name])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 * 2**20, (name, peak)


def test_a_pickle_may_run_only_so_many_opcodes(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_pickle, "MAX_OPCODES", 10_000)
    path = tmp_path / "busy.pkl"
    path.write_bytes(pkl((NONE + POP) * 6_000, NONE))
    with pytest.raises(CheckpointError, match="refused: .*steps") as info:
        read_checkpoint(path)
    _one_line(info.value, path)
    path.write_bytes(pkl((NONE + POP) * 4_000, NONE))
    with pytest.raises(CheckpointError, match="not an IMM checkpoint"):
        read_checkpoint(path)


def test_a_zip_may_hold_only_so_many_records_and_a_pickle_name_only_so_many_classes(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_pickle, "MAX_RECORDS", 10)
    monkeypatch.setattr(safe_pickle, "MAX_CLASSES", 5)
    path = tmp_path / "many.pt"
    torch.save({f"model.w{k}": torch.ones(1) for k in range(10)}, path)
    with pytest.raises(CheckpointError, match="refused: a zip of 16 records"):
        read_checkpoint(path)
    path.write_bytes(pkl(MARK, *[glob("torch.nn.modules.x", f"C{k}") for k in range(6)], TUPLE))
    with pytest.raises(CheckpointError, match="refused: .*more than 5 classes"):
        read_checkpoint(path)


class _NoRealParameters:
    """Fails the moment a network registers a parameter anywhere but on the meta device; counts registrations."""

    def __enter__(self):
        self.count = 0

        def hook(module, name, param):
            self.count += 1
            assert param.device.type == "meta", f"a real {list(param.shape)} parameter was allocated"

        self.handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("name", ["model_channels=4096", "num_blocks=100000", "DiT depth=100000"])
def test_oversized_configs_fail_before_allocating(hostile, name):
    with _NoRealParameters() as watch, pytest.raises(CheckpointError):
        imm.load_network(hostile[name])
    assert watch.count < 2_000


def test_a_network_bigger_than_the_tensors_in_the_file_is_refused(tmp_path):
    """Every tensor a view into one shared storage: names and shapes match, the bytes are not there."""
    config = {**read_checkpoint(DIT)[0], "hidden_size": 512, "depth": 8, "num_heads": 8}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in imm.IMMNetwork(**config).state_dict().items()}
    shared = torch.zeros(max(s.numel() for s in shapes.values()))
    path = tmp_path / "views.pt"
    torch.save({"ema": {k: shared[: s.numel()].view(s) for k, s in shapes.items()}}, path)
    assert path.stat().st_size < 8 * 2**20 < 4 * sum(s.numel() for s in shapes.values()) / 16
    with _NoRealParameters(), pytest.raises(CheckpointError, match="describes a network of") as info:
        imm.load_network(path, **config)
    _one_line(info.value, path)


def test_truncated_torch_save_zip_at_every_offset(tmp_path):
    source = tmp_path / "state.pt"
    torch.save({"ema": imm.load_network(DIT).state_dict()}, source)
    data = source.read_bytes()
    path = tmp_path / "cut.pt"
    for end in range(1, len(data), 1013):
        path.write_bytes(data[:end])
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        _one_line(info.value, path)


def _same(a, b, where="") -> None:
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.requires_grad) == (b.dtype, b.shape, b.stride(), b.requires_grad)
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b) and getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{k}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("legacy", [False, True])
def test_training_states_read_exactly_like_torch_load(tmp_path, legacy):
    """Our own trusted torch.save files (zip and legacy): the safe reader returns what torch.load returns."""
    net = imm.load_network(DIT).train().requires_grad_(True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(2, 4, 8, 8), torch.tensor(0.9), torch.tensor(0.5)).sum().backward()
    optimizer.step()
    state = {"format": "imm-training", "version": 1, "step": 5, "config": {"a": [1, 2.5, None, "x"], "b": (1, 2)},
             "network_config": net.config, "model": net.state_dict(), "ema": {"0.999": net.state_dict()},
             "optimizer": optimizer.state_dict(), "rng": [torch.get_rng_state(), np.random.get_state()],
             "half": torch.randn(3, 4).half()[:, 1:], "bf16": torch.randn(5).bfloat16(), "complex": 1 + 2j,
             "bytes": b"abc", "sets": [{1, 2}, frozenset({3})], "param": torch.nn.Parameter(torch.randn(3)),
             "empty": torch.empty(0), "scalar": torch.tensor(3.0), "od": collections.OrderedDict(a=1)}
    path = tmp_path / "training-state-00000005.pt"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    _same(torch.load(path, weights_only=False), read_training_state(path))
    config, tensors = read_checkpoint(path)
    assert config == net.config and tensors.keys() == net.state_dict().keys()


def test_legacy_whole_module_reads_as_data(tmp_path):
    net = imm.load_network(DIT)
    path = tmp_path / "module-legacy.pt"
    torch.save(net, path, _use_new_zipfile_serialization=False)
    again = imm.load_network(path)
    assert again.config == net.config
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())


def test_config_base_loops_and_deep_yaml_give_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "self.yaml").write_text("base: self.yaml\ntraining: {lr: 1}\n")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    (tmp_path / "deep.yaml").write_text("x: " + "[" * 100_000 + "]" * 100_000 + "\n")
    for name, message in (("self.yaml", "comes back to itself"), ("a.yaml", "comes back to itself"),
                          ("deep.yaml", "invalid YAML")):
        with pytest.raises(ConfigError, match=message) as info:
            load_config(name)
        assert "\n" not in str(info.value) and name in str(info.value)
    (tmp_path / "ok.yaml").write_text("base: cifar10\ntraining: {batch_size: 3}\n")
    assert load_config("ok.yaml")["training"]["batch_size"] == 3


def test_hostile_yaml_is_one_line_within_bounds(tmp_path):
    """An alias bomb (9 levels of 9 aliases: 387 million values once expanded), 450-deep nesting and a
    5,000-digit integer are refused while loading, in one line; the same bounds hold for override values."""
    from tests import hostile_files

    for build, message in ((hostile_files.yaml_alias_bomb, "more than 100,000 values once its aliases are expanded"),
                           (hostile_files.yaml_deep, "nested deeper than 64 levels"),
                           (hostile_files.yaml_long_integer, "an integer of 5001 digits at line 2")):
        with pytest.raises(ConfigError, match=message) as info:
            load_config(str(build(tmp_path)))
        assert "\n" not in str(info.value)
    assert parse_value("[1, [2, 3]]") == [1, [2, 3]] and parse_value("1" + "0" * 5000) == "1" + "0" * 5000


def test_config_base_is_read_from_the_configs_folder_and_never_quoted(tmp_path, monkeypatch):
    """base: names a preset or a file in the folder of the config that names it (not the working directory's);
    a base that is no config is refused without a word of its contents."""
    from tests import hostile_files

    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "parent.yaml").write_text("training: {batch_size: 7}\n")
    (tmp_path / "cfgs" / "child.yaml").write_text("base: parent.yaml\n")
    (tmp_path / "parent.yaml").write_text("training: {batch_size: 99}\n")  # the working directory's: not used
    monkeypatch.chdir(tmp_path)
    assert load_config("cfgs/child.yaml")["training"]["batch_size"] == 7
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_config(str(hostile_files.yaml_base_credentials(tmp_path).relative_to(tmp_path)))
    assert "SECRET" not in str(info.value) and "default" not in str(info.value)


def test_fifos_and_devices_are_not_read(tmp_path):
    fifo = tmp_path / "net.pt"
    os.mkfifo(fifo)  # opening it for reading waits for a writer: this one, so that a regression fails, not hangs
    writer = threading.Thread(target=lambda: fifo.write_bytes(b"\x80\x02N."), daemon=True)
    writer.start()
    try:
        for path in (fifo, "/dev/zero"):
            with pytest.raises(CheckpointError, match="not a regular file") as info:
                imm.load_network(path)
            _one_line(info.value, path)
    finally:
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer finish
        writer.join()
        os.close(reader)


def test_file_that_cannot_be_opened(tmp_path, monkeypatch):
    path = tmp_path / "locked.pt"
    path.write_bytes(b"\x80\x02N.")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: the refusal a normal user gets, from open() itself
        def refuse(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))
        monkeypatch.setattr("imm.io.checkpoint.open", refuse, raising=False)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(path)


@pytest.mark.parametrize("name, entry, eval_section, message", [
    ("../../escaped", {"num_steps": 1}, {}, "sampling entry name '../../escaped'"),
    ("/tmp/absolute", {"num_steps": 1}, {}, "sampling entry name '/tmp/absolute'"),
    ("many", {"num_steps": 10**12}, {}, "num_steps must be an integer from 1 to 4096"),
    ("text", {"num_steps": "3"}, {}, "num_steps must be an integer from 1 to 4096, got '3'"),
    ("nan", {"mid_nt": [float("nan")]}, {}, "mid_nt must hold finite numbers"),
    ("long", {"mid_nt": [1.0] * 5000}, {}, "mid_nt must be a list of at most 4095 numbers"),
    ("scale", {"num_steps": 1, "cfg_scale": "x"}, {}, "cfg_scale must hold finite numbers"),
    ("ok", {"num_steps": 1}, {"batch_size": 10**9}, "eval.batch_size must be an integer from 1 to 65536"),
    ("ok", {"num_steps": 1}, {"seed": -1}, "eval.seed must be an integer from 0 to"),
])
def test_a_checkpoints_recorded_settings_are_checked_before_use(tmp_path, capsys, name, entry, eval_section, message):
    """Settings recorded in a network file (which imm generate / imm eval fid use without --config) are typed
    and bounded like a config's: one line naming the file and the key, nothing sampled, nothing written."""
    from tests.hostile_files import network_recording

    path = network_recording(tmp_path, {"encoder": {"kind": "identity"}, "sampling": {name: entry}, "eval": eval_section})
    out = tmp_path / "deep" / "out"
    for command in (["generate", "--checkpoint", str(path), "--out", str(out)],
                    ["eval", "fid", "--checkpoint", str(path), "--ref", "mnist", "--num-images", "4", "--out", str(out)]):
        capsys.readouterr()
        assert main([*command, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and f"recorded in {path}" in err, err
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["net.safetensors"]


def test_planted_symlinks_in_output_folders_are_replaced_not_written_through(tmp_path):
    """A symlink at a name a command writes (a sample grid, fid.json, a run's config.yaml and metrics.jsonl)
    points at a victim file: the command replaces the link with its own file and the victim is unchanged."""
    from imm.evaluation.evaluate import write_results
    from imm.io.images import save_grid
    from imm.training.loop import train
    from tests.helpers import toy_cfg
    from tests.hostile_files import planted_links

    names = ["out/1_step_samples.png", "out/fid.json", "out/fid.csv", "run/config.yaml", "run/metrics.jsonl"]
    victim = planted_links(tmp_path, names)
    out, run = tmp_path / "out", tmp_path / "run"
    planted = [tmp_path / name for name in names]
    save_grid(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), out / "1_step_samples.png")
    write_results([{"steps": 1, "nfe": 1, "fid": 3.0, "num_images": 4, "seconds": 0.1}], out)
    train(toy_cfg("training.total_steps=2", "logging.log_every=1"), run, device="cpu")
    assert victim.read_text() == "keep me\n"
    for path in planted:
        assert not path.is_symlink() and path.stat().st_size > 0, path


def test_text_from_files_reaches_the_terminal_escaped(tmp_path, capsys):
    """An error quoting a file's text (here a config key with a terminal escape and a newline) prints as one
    line with the control characters shown, not sent to the terminal."""
    from tests.hostile_files import network_recording, yaml_escapes

    net = network_recording(tmp_path, {})
    assert main(["generate", "--checkpoint", str(net), "--config", str(yaml_escapes(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "\\x1b[2J\\nfake" in err, err


def test_images_open_only_as_the_formats_promised_and_within_a_pixel_bound(tmp_path, monkeypatch):
    """A PostScript file named .png is not handed to Pillow's EPS plugin (it would start Ghostscript), and a
    PNG whose header claims 13000 x 13000 pixels is refused before it is decoded: one line each."""
    from PIL import EpsImagePlugin

    from imm.core.errors import InputError

    def never(self):
        raise AssertionError("the EPS plugin read the file")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    from imm.data.datasets import ImageFolderDataset
    from imm.io.images import load_png
    from tests import hostile_files

    eps, huge = hostile_files.postscript_png(tmp_path) / "a.png", hostile_files.huge_png(tmp_path) / "a.png"
    with pytest.raises(InputError, match="not a readable image"):
        load_png(eps)
    with pytest.raises(InputError, match="13000 x 13000 pixels, more than the 64,000,000"):
        load_png(huge)
    for folder, message in ((eps.parent, "not a readable image"), (huge.parent, "13000 x 13000 pixels")):
        with pytest.raises(InputError, match=message) as info:
            ImageFolderDataset(folder)
        assert "\n" not in str(info.value)


def test_a_checkpoint_cannot_choose_which_vae_is_loaded(tmp_path, capsys):
    """A recorded encoder.vae_name that is a folder or an unknown Hub id is refused before anything is read
    from it, unless the user chooses the VAE (encoder.vae_name=...)."""
    from tests.hostile_files import network_planted_vae, network_recording

    hub_id = network_recording(tmp_path, {"encoder": {"kind": "sd_vae", "vae_name": "someone/else-vae"},
                                          "sampling": {"1_step": {"num_steps": 1}}}, "hub-vae.safetensors", 4)
    for path, named in ((network_planted_vae(tmp_path), str(tmp_path / "planted-vae")), (hub_id, "someone/else-vae")):
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not one of stabilityai/sd-vae-ft-ema" in err and named in err, err
    from imm.evaluation.sampling_run import sampling_config

    cfg, _ = sampling_config(None, path, [f"encoder.vae_name={tmp_path / 'mine'}"])  # the user's choice
    assert cfg["encoder"]["vae_name"] == str(tmp_path / "mine")


def test_hostile_zip_datasets_are_one_line_before_anything_is_inflated(tmp_path, monkeypatch):
    """A corrupt central directory, a bzip2 member, a member declared larger than the bound, a member whose
    bytes fail their CRC and a class id of 10^12 in dataset.json: each one InputError line naming the file."""
    from imm.core.errors import InputError
    from imm.data import source
    from imm.data.source import Source
    from tests import hostile_files

    cases = [(hostile_files.zip_corrupt_directory(tmp_path), "not (a )?readable"),
             (hostile_files.zip_bzip2(tmp_path), "compression method 12"),
             (hostile_files.zip_bad_crc(tmp_path), "not readable .Bad CRC-32"),
             (hostile_files.zip_huge_label(tmp_path), "class ids must be below 100,000")]
    for path, message in cases:
        with pytest.raises(InputError, match=message) as info:
            Source(path).read("a.png")
        assert "\n" not in str(info.value) and path.name in str(info.value)
    monkeypatch.setattr(source, "MAX_MEMBER_BYTES", 64)
    with pytest.raises(InputError, match=r"a.png in .*declares \d+ bytes, more than the 64"):
        Source(hostile_files.zip_dataset(tmp_path)).read("a.png")


# --- .npz and .npy: shapes and sizes checked before anything is allocated ------------------------------

def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _raises_one_line(fn, message: str, name: str) -> int:
    """Calls ``fn`` expecting one InputError line holding ``message`` and the file ``name``; returns the
    peak of memory traced meanwhile."""
    from imm.core.errors import InputError

    def call():
        with pytest.raises(InputError, match=message) as info:
            fn()
        assert "\n" not in str(info.value) and name in str(info.value), str(info.value)

    return _peak_bytes(call)


def test_hostile_npz_and_npy_files_are_one_line_before_any_allocation(tmp_path, monkeypatch):
    """An .npz whose header declares 10^12 images, a member larger than the bound (deflated zeros), object
    arrays, format 3.0, a sigma declared 10^5 x 10^5 for a 4-d mu, a bzip2 member, 10^9 labels for 4 images,
    a latent whose header claims 4 x 10^6 x 10^6 values: one line each, in a few megabytes (the bomb inflates
    to 64 MiB)."""
    from imm.data.datasets import ImageFolderDataset, NpzDataset
    from imm.evaluation.evaluate import load_images
    from imm.evaluation.fid import load_statistics
    from imm.io import arrays
    from tests import hostile_files

    monkeypatch.setattr(arrays, "MAX_ARRAY_BYTES", 2**20)
    latents = hostile_files.npy_latent_lie(tmp_path)
    (latents / "a.npy").unlink()  # the lying array alone: its header sets the dataset's shape
    cases = [
        (load_images, hostile_files.npz_shape_lie, r"declares shape \(1000000000000, 32, 32, 3\) of uint8 "
         r"\(3,072,000,000,000,000 bytes\) but 3,072 bytes follow"),
        (load_images, hostile_files.npz_bomb, r"member arr_0.npy: declares 67,108,992 bytes, more than the 1,114,112"),
        (load_statistics, hostile_files.npz_objects, "mu.npy: an array of Python objects"),
        (load_images, hostile_files.npz_version_3, r"format version 3.0"),
        (load_statistics, hostile_files.npz_sigma_mismatch, r"malformed statistics: mu has shape \(4,\) and sigma "
         r"\(100000, 100000\)"),
        (load_images, hostile_files.npz_bzip2, "compression method 12"),
        (NpzDataset, hostile_files.npz_labels_mismatch, "1000000000 labels for 4 images"),
        (lambda path: ImageFolderDataset(path.parent)[0], lambda _: latents / "b.npy",
         r"declares shape \(4, 1000000, 1000000\)"),
    ]
    for read, build, message in cases:
        path = build(tmp_path)
        assert _raises_one_line(lambda: read(path), message, path.name) < 8 * 2**20, path.name


def test_npz_and_npy_files_read_as_numpy_writes_them(tmp_path):
    """Honest files read exactly as numpy.load reads them: stored and deflated, C and Fortran order, each
    dtype, format 1.0 and 2.0 headers."""
    from imm.io.arrays import NpzFile, read_npy_file

    gen = np.random.default_rng(0)
    arrays = {"u8": gen.integers(0, 255, (3, 5, 4, 3), dtype=np.uint8), "f32": gen.standard_normal((4, 6), np.float32),
              "fortran": np.asfortranarray(gen.standard_normal((5, 7))), "i64": np.arange(9, dtype=np.int64),
              "scalar": np.array(2.5), "empty": np.zeros((0, 3), np.float16), "bool": gen.random(6) > 0.5}
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)
        with NpzFile(path) as f, np.load(path) as expected:
            assert f.keys == list(expected.keys())
            for key in f.keys:
                got = f.read(key)
                assert f.header(key) == (got.shape, got.dtype)
                assert got.dtype == expected[key].dtype and np.array_equal(got, expected[key]), key
    big_header = tmp_path / "v2.npy"
    with open(big_header, "wb") as out:
        np.lib.format.write_array(out, arrays["f32"], version=(2, 0))
    assert np.array_equal(read_npy_file(big_header), arrays["f32"])


def test_large_images_reach_the_distances_in_bounded_batches(tmp_path, monkeypatch):
    """Reference data and samples of 1100 x 1100 (within Pillow's pixel bound) are read in batches of at most
    MAX_BATCH_VALUES pixel values (here one image), whatever --batch-size asks: the same images, in order."""
    from imm.evaluation import evaluate
    from imm.io import images as image_files
    from tests import hostile_files

    monkeypatch.setattr(image_files, "MAX_BATCH_VALUES", 1100 * 1100 * 3 * 3 // 2)
    folder = hostile_files.oversized_pngs(tmp_path)
    ds, n = evaluate.open_dataset(str(folder))
    samples = evaluate.load_images(folder)
    for batches in (list(evaluate._dataset_batches(ds, n, 64)), list(evaluate._nchw_batches(samples, 64))):
        assert [tuple(b.shape) for b in batches] == [(1, 3, 1100, 1100)] * 2
        assert torch.equal(torch.cat(batches), torch.from_numpy(samples).permute(0, 3, 1, 2))


def test_a_linked_subfolder_of_an_output_folder_is_refused(tmp_path, capsys):
    """A symlink planted at a subfolder a command writes into (imm generate's OUT/<entry>/, the trainer's
    RUN/checkpoints/, whose old files it deletes) is refused in one line; the folder it points to is untouched."""
    from tests.helpers import TOY_FAST
    from tests.hostile_files import network_recording, planted_folder_link

    net = network_recording(tmp_path, {"encoder": {"kind": "identity"}, "sampling": {"1_step": {"num_steps": 1}}})
    victim = planted_folder_link(tmp_path, "out/1_step")
    planted_folder_link(tmp_path, "run/checkpoints")
    out, run = tmp_path / "out", tmp_path / "run"
    for command, link in (
            (["generate", "--checkpoint", str(net), "--out", str(out), "--num-images", "2"], out / "1_step"),
            (["train", "--config", "toy2d", "--run-dir", str(run), *TOY_FAST, "training.total_steps=2"],
             run / "checkpoints")):
        capsys.readouterr()
        assert main([*command, "--device", "cpu"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and f"{link} is a symlink" in errors[0], errors
    assert sorted(p.name for p in victim.iterdir()) == [".kept.tmp", "000000.png"]
    assert (victim / "000000.png").read_bytes() == b"keep me"
