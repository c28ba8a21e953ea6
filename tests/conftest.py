import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imm.core import fastpath
from tests.helpers import CLASSES, FIXTURES, GENERATE

# the tier of each test folder (pyproject.toml's markers); a test anywhere else is a unit test unless it is
# marked integration or benchmark itself
FOLDER_TIERS = {"unit": "unit", "integration": "integration", "benchmarks": "benchmark"}

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N test processes share the cores, one thread each
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
# `imm` commands run by the tests would otherwise choose their thread count from what the machine is doing
# (imm.core.threads); a fixed count keeps their results the same from one run of the suite to the next.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
# `auto` precision and memory layout follow the machine's probe (imm.core.fastpath); the suite gives every process
# (and the commands it runs) a cache whose timings make auto fp32 and contiguous, so that no result depends on
# the machine. Tests of the probe itself measure into their own cache.
os.environ["IMM_CACHE"] = tempfile.mkdtemp(prefix="imm-test-cache-")
atexit.register(shutil.rmtree, os.environ["IMM_CACHE"], True)
fastpath.record({family: dict.fromkeys(variants, 1.0) for family, variants in
                 (("conv", ("fp32/contiguous", "fp32/channels_last", "bf16/contiguous", "bf16/channels_last")),
                  ("matmul", ("fp32/contiguous", "bf16/contiguous")))})


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(items):
    """Marks each test with its tier: its folder's, else its own integration or benchmark marker, else unit."""
    tests = Path(__file__).parent
    for item in items:
        folder = item.path.relative_to(tests).parts[0] if item.path.is_relative_to(tests) else None
        if folder in FOLDER_TIERS:
            item.add_marker(FOLDER_TIERS[folder])
        if not any(item.get_closest_marker(tier) for tier in FOLDER_TIERS.values()):
            item.add_marker("unit")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def manifest():
    return json.loads((FIXTURES / "manifest.json").read_text())


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A tiny randomly initialised diffusers AutoencoderKL (4 latent channels, 2x down) in a folder."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    path = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory):
    """A tiny randomly initialised transformers Dinov2Model (hidden 32, 2 layers, patch 14) in a folder."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                       patch_size=14, image_size=224)
    path = tmp_path_factory.mktemp("tiny_dinov2")
    transformers.Dinov2Model(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Real photos: scikit-image's bundled files (no download), each cut into 4 pieces, in 3 class folders."""
    data = pytest.importorskip("skimage.data")
    files = sorted(f for f in os.listdir(data.data_dir) if f.endswith((".png", ".jpg")))[:11]
    assert len(files) >= 8
    root = tmp_path_factory.mktemp("photos")
    for j, f in enumerate(files):
        with Image.open(os.path.join(data.data_dir, f)) as im:
            im.load()
            folder = root / CLASSES[j % 3]
            folder.mkdir(exist_ok=True)
            w, h = im.size
            for q, (x, y) in enumerate([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)]):
                piece = im.crop((x, y, x + w // 2, y + h // 2))
                jpeg = q % 2 and piece.mode in ("RGB", "L")
                piece.save(folder / f"{f.rsplit('.', 1)[0]}_{q}.{'jpg' if jpeg else 'png'}")
    return root


@pytest.fixture(scope="module")
def image_zip(photo_dir, tmp_path_factory):
    """``photo_dir`` as a 16x16 image archive (`imm prepare images`, Dhariwal's center crop)."""
    from imm.cli import main

    dest = tmp_path_factory.mktemp("images") / "photos16.zip"
    assert main(["prepare", "images", "--source", str(photo_dir), "--dest", str(dest), "--resolution", "16",
                 "--transform", "center-crop-dhariwal", "--no-progress"]) == 0
    return dest


@pytest.fixture
def generated(tmp_path):
    """The GENERATE run's folder and its images."""
    from imm.cli import main

    out = tmp_path / "out"
    assert main(GENERATE + ["--out", str(out)]) == 0
    return out, np.load(out / "2_steps.npz")["arr_0"]
