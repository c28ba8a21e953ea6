"""imm.data.encoders: pixels <-> model space (RGB and the Stable Diffusion VAE, with a tiny random VAE)."""

import pickle
import sys

import pytest
import torch

from imm.core.config import ConfigError, load_config
from imm.core.release import canonical
from imm.data.encoders import SD_VAE_RAW_MEAN, SD_VAE_RAW_STD, StabilityVAEEncoder, StandardRGBEncoder, build_encoder


def _release(section):
    """An encoder section written with the release's keys, in the canonical form."""
    return canonical({"encoder": section})["encoder"]


RELEASE_VAE_CFG = {
    "class_name": "training.encoders.StabilityVAEEncoder",
    "vae_name": "stabilityai/sd-vae-ft-ema",
    "final_std": 0.5,
    "raw_mean": [0.86488, -0.27787343, 0.21616915, 0.3738409],
    "raw_std": [4.85503674, 5.31922414, 3.93725398, 3.9870003],
    "use_fp16": True,
}


def _pixels(n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


# --------------------------------------------------------------------------------------------------
# StandardRGBEncoder


def test_rgb_round_trip_is_exact_for_every_level():
    enc = StandardRGBEncoder()
    enc.init("cpu")
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous()
    x = torch.cat([levels, _pixels(3)])
    z = enc.encode(x)
    assert z.dtype == torch.float32 and z.shape == x.shape
    assert z.min().item() == -1.0 and z.max().item() == 1.0
    torch.testing.assert_close(z, x.float() / 127.5 - 1)
    y = enc.decode(z)
    assert y.dtype == torch.uint8
    assert torch.equal(y, x)


def test_rgb_encode_pixels_and_latents():
    enc = StandardRGBEncoder()
    x = _pixels()
    assert enc.encode_pixels(x) is x  # a pixel dataset stores the pixels themselves
    torch.testing.assert_close(enc.encode_latents(x), enc.encode(x))
    torch.testing.assert_close(enc.encode_latents(x.float()), enc.encode(x))  # float 0..255 works too


def test_rgb_decode_clips_and_rounds():
    enc = StandardRGBEncoder()
    x = torch.tensor([-5.0, -1.0, -1.0 + 0.4 / 127.5, -1.0 + 0.6 / 127.5, 0.0, 1.0, 1.2, 40.0])
    y = enc.decode(x.reshape(1, 1, 1, -1).expand(1, 3, 1, -1))
    assert y.dtype == torch.uint8
    assert y[0, 0, 0].tolist() == [0, 0, 0, 1, 128, 255, 255, 255]


def test_rgb_rejects_wrong_shapes():
    enc = StandardRGBEncoder()
    with pytest.raises(ValueError, match="3 channels"):
        enc.encode(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NCHW"):
        enc.decode(torch.zeros(3, 8, 8))


# --------------------------------------------------------------------------------------------------
# build_encoder


def test_build_encoder_default_and_rgb_names():
    for name in ("training.encoders.StandardRGBEncoder", "StandardRGBEncoder", "imm.data.encoders.StandardRGBEncoder",
                 "other.module.StandardRGBEncoder"):  # the release's class name, with any module prefix
        assert _release({"class_name": name}) == {"kind": "rgb"}
    for cfg in (None, {}, {"kind": "rgb"}):
        assert isinstance(build_encoder(cfg), StandardRGBEncoder)
    enc = StandardRGBEncoder()
    assert build_encoder(enc) is enc


@pytest.mark.parametrize("name", ["training.encoders.StabilityVAEEncoder", "StabilityVAEEncoder",
                                  "imm.data.encoders.StabilityVAEEncoder"])
def test_build_encoder_release_vae_config(name):
    enc = build_encoder(_release(dict(RELEASE_VAE_CFG, class_name=name)))  # loads nothing yet
    assert isinstance(enc, StabilityVAEEncoder)
    assert enc._vae is None
    assert enc.vae_name == "stabilityai/sd-vae-ft-ema"
    assert enc.use_fp16 and enc.batch_size == 8
    assert enc.channels == 4 and enc.raw_channels == 8
    assert enc.raw_mean == pytest.approx(RELEASE_VAE_CFG["raw_mean"])
    assert enc.final_std == pytest.approx([0.5] * 4) and enc.final_mean == pytest.approx([0.0] * 4)
    scale = [0.5 / s for s in RELEASE_VAE_CFG["raw_std"]]
    assert enc.scale == pytest.approx(scale, rel=1e-6)
    assert enc.bias == pytest.approx([-m * s for m, s in zip(RELEASE_VAE_CFG["raw_mean"], scale)], rel=1e-6)
    # the constructor defaults are the release's ImageNet settings
    assert list(SD_VAE_RAW_MEAN) == RELEASE_VAE_CFG["raw_mean"] and list(SD_VAE_RAW_STD) == RELEASE_VAE_CFG["raw_std"]


def test_build_encoder_from_presets():
    assert isinstance(build_encoder(load_config("cifar10").get("encoder")), StandardRGBEncoder)
    vae = build_encoder(load_config("imagenet256")["encoder"])
    assert isinstance(vae, StabilityVAEEncoder) and vae.final_std == pytest.approx([0.5] * 4)


def test_build_encoder_accepts_omegaconf():
    omegaconf = pytest.importorskip("omegaconf", reason="omegaconf is not installed")
    enc = build_encoder(_release(omegaconf.OmegaConf.create({"encoder": RELEASE_VAE_CFG}).encoder))
    assert isinstance(enc, StabilityVAEEncoder) and enc.raw_std == pytest.approx(RELEASE_VAE_CFG["raw_std"])


def test_build_encoder_errors_are_clear():
    with pytest.raises(ConfigError, match="unknown encoder.class_name 'training.encoders.FooEncoder'"):
        _release({"class_name": "training.encoders.FooEncoder"})
    with pytest.raises(ValueError, match="did you mean 'StandardRGBEncoder'.*StandardRGBEncoder, StabilityVAEEncoder"):
        _release({"class_name": "training.encoders.StandardRGBEncodr"})
    with pytest.raises(ConfigError, match="unknown encoder.kind 'sdvae'; did you mean 'sd_vae'"):
        build_encoder({"kind": "sdvae"})
    with pytest.raises(ConfigError, match=r"unknown config key 'encoder.vae_nme' for kind 'sd_vae'; did you mean 'encoder.vae_name'"):
        build_encoder({"kind": "sd_vae", "vae_nme": "x"})
    with pytest.raises(ConfigError, match="unknown config key 'encoder.final_std' for kind 'rgb'"):
        build_encoder({"kind": "rgb", "final_std": 0.5})
    with pytest.raises(ConfigError, match="needs a kind"):
        build_encoder({"vae_name": "x"})
    with pytest.raises(ConfigError, match="encoder.class_name 'StandardRGBEncoder' and encoder.kind 'sd_vae' disagree"):
        _release({"class_name": "StandardRGBEncoder", "kind": "sd_vae"})
    with pytest.raises(ConfigError, match="raw_std needs 1 or 4 values"):
        build_encoder(_release(dict(RELEASE_VAE_CFG, raw_std=[1.0, 2.0])))


def test_missing_diffusers_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    enc = StabilityVAEEncoder(vae_name=str(tmp_path))
    with pytest.raises(ImportError, match=r'pip install "imm\[vae\]"'):
        enc.init("cpu")


# --------------------------------------------------------------------------------------------------
# StabilityVAEEncoder with a tiny random AutoencoderKL (2x downsampling)


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'imm[vae]')")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
    )
    folder = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(folder)
    return folder


def _reference_vae(folder):
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_pretrained(str(folder)).eval().requires_grad_(False)


def test_vae_encode_pixels_is_posterior_mean_and_std_of_minus1_1_input(tiny_vae_folder):
    enc = StabilityVAEEncoder(vae_name=str(tiny_vae_folder), batch_size=3)
    x = _pixels(5)
    raw = enc.encode_pixels(x)
    assert raw.dtype == torch.float32 and raw.shape == (5, 8, 8, 8)
    mean, std = raw.chunk(2, dim=1)
    assert bool((std > 0).all())
    with torch.no_grad():
        dist = _reference_vae(tiny_vae_folder).encode(x.float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(mean, dist.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, dist.std, rtol=1e-5, atol=1e-5)
    # chunking does not change the result
    torch.testing.assert_close(StabilityVAEEncoder(vae_name=str(tiny_vae_folder), batch_size=8).encode_pixels(x),
                               raw, rtol=1e-5, atol=1e-5)


def test_vae_encode_latents_normalisation(tiny_vae_folder):
    final_mean = [0.1, -0.2, 0.0, 0.3]
    enc = StabilityVAEEncoder(vae_name=str(tiny_vae_folder), final_mean=final_mean, final_std=0.5)
    raw = enc.encode_pixels(_pixels(2))
    out = enc.encode_latents(raw, generator=torch.Generator().manual_seed(7))
    assert out.dtype == torch.float32 and out.shape == (2, 4, 8, 8)

    mean, std = raw.chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    rm = torch.tensor(SD_VAE_RAW_MEAN).reshape(1, 4, 1, 1)
    rs = torch.tensor(SD_VAE_RAW_STD).reshape(1, 4, 1, 1)
    expected = (mean + std * eps - rm) / rs * 0.5 + torch.tensor(final_mean).reshape(1, 4, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    # same generator seed -> same sample; encode() == encode_latents(encode_pixels())
    again = enc.encode(_pixels(2), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(again, out)
    with pytest.raises(ValueError, match="8 channels"):
        enc.encode_latents(raw[:, :4])


def test_vae_decode_inverts_whitening_and_maps_to_uint8(tiny_vae_folder):
    enc = StabilityVAEEncoder(vae_name=str(tiny_vae_folder), batch_size=2)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(3, 4, 8, 8, generator=g) * 0.5
    img = enc.decode(latents)
    assert img.dtype == torch.uint8 and img.shape == (3, 3, 16, 16)

    rm = torch.tensor(SD_VAE_RAW_MEAN).reshape(1, 4, 1, 1)
    rs = torch.tensor(SD_VAE_RAW_STD).reshape(1, 4, 1, 1)
    with torch.no_grad():
        y = _reference_vae(tiny_vae_folder).decode(latents / 0.5 * rs + rm).sample
    expected = ((y * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    # float rounding may move a value across an integer boundary: allow off-by-one, rarely
    diff = (img.int() - expected.int()).abs()
    assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < 0.01
    with pytest.raises(ValueError, match="4 channels"):
        enc.decode(torch.zeros(1, 8, 8, 8))


def test_vae_decode_clips_out_of_range_output(tiny_vae_folder):
    enc = StabilityVAEEncoder(vae_name=str(tiny_vae_folder))
    img = enc.decode(torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3)) * 1e3)
    assert img.dtype == torch.uint8 and img.shape == (2, 3, 8, 8)


def test_vae_fp16_is_cpu_float32_and_encoder_pickles_without_vae(tiny_vae_folder):
    enc = build_encoder(_release(dict(RELEASE_VAE_CFG, vae_name=str(tiny_vae_folder))))  # use_fp16: True
    enc.init("cpu")
    assert next(enc._vae.parameters()).dtype == torch.float32
    assert enc.vae_dtype("cpu") == torch.float32 and enc.vae_dtype("cuda") == torch.float16
    out = enc.encode_pixels(_pixels(1))
    assert out.dtype == torch.float32

    clone = pickle.loads(pickle.dumps(enc))
    assert clone._vae is None and enc._vae is not None
    torch.testing.assert_close(clone.encode_pixels(_pixels(1)), out)


def test_vae_missing_folder_error_is_clear(tmp_path):
    enc = StabilityVAEEncoder(vae_name=str(tmp_path / "no_such_vae"))
    with pytest.raises(FileNotFoundError, match="does not exist; vae_name must be a local folder"):
        enc.init("cpu")


def test_vae_bad_folder_error_is_clear(tmp_path):
    pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'imm[vae]')")
    enc = StabilityVAEEncoder(vae_name=str(tmp_path))  # exists, but holds no config.json
    with pytest.raises(RuntimeError, match="could not load a diffusers AutoencoderKL from folder"):
        enc.init("cpu")
