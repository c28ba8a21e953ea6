"""Seeded byte mutations and truncations of every readable format: each file loads or gets one CheckpointError line.

Mutations aim at the bytes a parser reads (pickle opcodes, the legacy storage headers inside the release's
``_load_from_bytes`` records, zip headers and directory, the safetensors header) as well as at random
positions. A mutated file whose configuration and tensor names, shapes and dtypes are the original's only
changed weights; its network is then known to build, so only the others are built (through the same
``network_from_tensors`` that ``imm.load_network`` calls).
"""

import io
import pickletools
import random
import zipfile

import pytest
import torch

import imm
from imm.io.checkpoint import CheckpointError, network_from_tensors, read_checkpoint
from tests.helpers import FIXTURES

TINY = {"img_resolution": 4, "img_channels": 2, "model_type": "DiT", "patch_size": 2, "hidden_size": 8,
        "depth": 1, "num_heads": 2, "label_dim": 3, "f_type": "simple_edm"}


def _pickle_offsets(data: bytes) -> list[int]:
    """Opcode positions of a pickle, plus the first bytes of every BINBYTES payload (the release's legacy storages)."""
    offsets = []
    for op, arg, pos in pickletools.genops(data):
        offsets.append(pos)
        if op.name == "BINBYTES":
            start = pos + 5
            offsets += range(start, start + min(len(arg), 260), 3)
    return offsets


def _zip_offsets(data: bytes) -> list[int]:
    """Local headers, the data.pkl record and the central directory of a torch.save zip."""
    offsets = []
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            offsets += range(info.header_offset, info.header_offset + 30 + len(info.filename) + 70)
            if info.filename.endswith("data.pkl"):
                offsets += range(info.header_offset, info.header_offset + 100 + info.compress_size)
        offsets += range(z.start_dir, len(data))
    return [o for o in offsets if o < len(data)]


def _mutate(data: bytes, offsets: list[int], rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.2:
        return data[: rng.randrange(len(data))]
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        pos = rng.choice(offsets) if rng.random() < 0.7 else rng.randrange(len(out))
        if kind < 0.6:
            out[pos] = rng.randrange(256)
        else:  # a length or count field pushed to an extreme
            out[pos: pos + 8] = rng.choice([b"\xff" * 8, b"\x7f" * 8, b"\x00" * 8, b"\xff\xff\xff\x7f\x00\x00\x00\x00"])
    return bytes(out[: len(data)])


def _signature(config, tensors):
    return config, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


def _check(path, original, overrides):
    """A load succeeds or raises one CheckpointError line naming the file; nothing else may escape."""
    try:
        config, tensors = read_checkpoint(path)
        if _signature(config, tensors) != original:
            network_from_tensors({**(config or {}), **overrides}, tensors, str(path))
    except CheckpointError as e:
        message = str(e)
        assert "\n" not in message and str(path) in message, message


def _small_state(tmp_path, legacy: bool):
    net = imm.IMMNetwork(**TINY)
    path = tmp_path / ("legacy.pt" if legacy else "state.pt")
    torch.save({"ema": net.state_dict(), "note": [1, 2.5, "x"]}, path, _use_new_zipfile_serialization=not legacy)
    return path


def _small_safetensors(tmp_path):
    path = tmp_path / "net.safetensors"
    imm.save_network(imm.IMMNetwork(**TINY), path)
    return path


@pytest.mark.parametrize("name,count", [("dit_imagenet_like", 150), ("unet_cifar_like", 50), ("torch_zip", 150),
                                        ("torch_legacy", 100), ("safetensors", 100)])
def test_mutated_files_load_or_give_one_line_errors(tmp_path, name, count):
    if name.endswith("_like"):
        source, overrides = FIXTURES / f"{name}.pkl", {}
    elif name == "safetensors":
        source, overrides = _small_safetensors(tmp_path), {}
    else:
        source, overrides = _small_state(tmp_path, legacy=name == "torch_legacy"), TINY
    data = source.read_bytes()
    original = _signature(*read_checkpoint(source))
    network_from_tensors({**(original[0] or {}), **overrides}, read_checkpoint(source)[1], str(source))
    if name == "torch_zip":
        offsets = _zip_offsets(data)
    elif name == "safetensors":
        offsets = list(range(8 + int.from_bytes(data[:8], "little")))
    else:
        offsets = _pickle_offsets(data)
    rng = random.Random(f"{name}-13")
    path = tmp_path / f"mutated-{name}"
    for _ in range(count):
        path.write_bytes(_mutate(data, offsets, rng))
        _check(path, original, overrides)
