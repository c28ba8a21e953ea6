# Copyright 2025 The imm authors.
# SPDX-License-Identifier: Apache-2.0
"""Tests for the DDPM++/NCSN++ UNet backbone (imm.model.backbones.unet)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from imm.model.backbones import unet
from tests.helpers import BENCHMARKS, FIXTURES

REFERENCE_SHAPES = FIXTURES.parent / "official_param_shapes.json"

SongUNet = unet.SongUNet

TINY = {"img_resolution": 8, "in_channels": 3, "out_channels": 3, "model_channels": 8, "channel_mult": [1, 2],
            "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}


def _perturb(net: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so that zero-initialised layers do not hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return net


def _inputs(batch=2, channels=3, res=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, res, res, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    s = t * torch.rand(batch, generator=gen)
    return x, t, s


# -- names and shapes --------------------------------------------------------------------------

def test_cifar10_names_and_shapes_match_release():
    ref = json.loads(REFERENCE_SHAPES.read_text())["cifar10_ddpmpp"]
    cfg = ref["config"]
    backbone_keys = ("embedding_type", "encoder_type", "decoder_type", "channel_mult_noise", "resample_filter",
                     "model_channels", "channel_mult", "s_embed", "dropout")
    with torch.device("meta"):
        net = SongUNet(img_resolution=cfg["img_resolution"], img_channels=cfg["img_channels"],
                       in_channels=cfg["img_channels"], out_channels=cfg["img_channels"],
                       label_dim=cfg["label_dim"], **{k: cfg[k] for k in backbone_keys})
    mine = {f"model.{k}": list(v.shape) for k, v in net.state_dict().items()}
    assert list(mine) == list(ref["tensors"])
    assert mine == ref["tensors"]
    assert sum(p.numel() for p in net.parameters()) == ref["n_params"] == 56_061_443


def test_official_fixture_state_dict_loads_strict():
    checkpoint = pytest.importorskip("imm.io.checkpoint")
    path = FIXTURES / "unet_cifar_like.pkl"
    if not path.exists():
        pytest.skip("official-format fixture missing")
    config, tensors = checkpoint.read_checkpoint(path)
    tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    kwargs = {k: config[k] for k in ("embedding_type", "encoder_type", "decoder_type", "channel_mult_noise",
                                     "resample_filter", "model_channels", "channel_mult", "num_blocks",
                                     "attn_resolutions", "s_embed", "dropout")}
    net = SongUNet(img_resolution=16, img_channels=3, in_channels=3, out_channels=3, label_dim=0, **kwargs)
    net.load_state_dict(tensors, strict=True)
    x, t, s = _inputs(res=16)
    assert torch.isfinite(net.eval()(x, t, s)).all()


def test_resample_filter_buffers_only_where_resampling():
    net = SongUNet(**TINY)
    buffers = [name for name, _ in net.named_buffers()]
    assert sorted(buffers) == sorted([
        "enc.4x4_down.conv0.resample_filter", "enc.4x4_down.skip.resample_filter",
        "dec.8x8_up.conv0.resample_filter", "dec.8x8_up.skip.resample_filter",
    ])
    assert torch.equal(net.enc["4x4_down"].conv0.resample_filter, torch.full((1, 1, 2, 2), 0.25))
    ncsn = SongUNet(**{**TINY, "resample_filter": [1, 3, 3, 1]})
    f = ncsn.enc["4x4_down"].conv0.resample_filter
    assert f.shape == (1, 1, 4, 4) and f.sum().item() == pytest.approx(1.0)


def test_group_norm_and_attention_layout():
    net = SongUNet(**{**TINY, "model_channels": 64, "channel_mult": [1, 2]})
    block = net.enc["4x4_block0"]
    assert block.norm0.num_groups == 16 and block.norm1.num_groups == 32 and block.norm0.eps == 1e-6
    assert block.num_heads == 1 and block.qkv.weight.shape == (384, 128, 1, 1)
    assert net.dec["4x4_in0"].num_heads == 1 and net.dec["4x4_in1"].num_heads == 0


# -- forward passes ------------------------------------------------------------------------------

@pytest.mark.parametrize("embedding_type,encoder_type,decoder_type", list(itertools.product(
    ["positional", "fourier"], ["standard", "skip", "residual"], ["standard", "skip"])))
def test_forward_all_architecture_variants(embedding_type, encoder_type, decoder_type):
    net = SongUNet(**TINY, embedding_type=embedding_type, encoder_type=encoder_type, decoder_type=decoder_type,
                   channel_mult_noise=2 if embedding_type == "fourier" else 1,
                   resample_filter=[1, 3, 3, 1] if encoder_type == "residual" else [1, 1])
    names = set(net.state_dict())
    assert ("enc.4x4_aux_residual.weight" in names) == (encoder_type == "residual")
    assert ("enc.4x4_aux_down.resample_filter" in names) == (encoder_type == "skip")
    assert ("dec.4x4_aux_conv.weight" in names) == (decoder_type == "skip")
    assert ("dec.8x8_aux_up.resample_filter" in names) == (decoder_type == "skip")
    assert ("map_noise.freqs" in names) == (embedding_type == "fourier")
    _perturb(net).eval()
    x, t, s = _inputs()
    with torch.no_grad():
        y = net(x, t, s)
    assert y.shape == (2, 3, 8, 8) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert y.abs().max() > 0


def test_output_channels_may_differ_from_input():
    net = SongUNet(**{**TINY, "in_channels": 4, "out_channels": 6}, decoder_type="skip")
    x, t, s = _inputs(channels=4)
    assert net(x, t, s).shape == (2, 6, 8, 8)


def test_class_conditional():
    net = _perturb(SongUNet(**TINY, label_dim=3)).eval()
    assert net.map_label.weight.shape == (8, 3)
    x, t, s = _inputs()
    onehot = F.one_hot(torch.tensor([0, 2]), 3).float()
    with torch.no_grad():
        cond = net(x, t, s, class_labels=onehot)
        other = net(x, t, s, class_labels=F.one_hot(torch.tensor([1, 1]), 3).float())
        uncond = net(x, t, s, class_labels=torch.zeros(2, 3))
        none = net(x, t, s)
    assert not torch.allclose(cond, other) and not torch.allclose(cond, uncond)
    assert torch.equal(uncond, none)


def test_label_dropout_only_in_training():
    net = _perturb(SongUNet(**TINY, label_dim=3, label_dropout=1.0))
    x, t, s = _inputs()
    onehot = F.one_hot(torch.tensor([0, 2]), 3).float()
    with torch.no_grad():
        dropped = net.train()(x, t, s, class_labels=onehot)
        uncond = net.eval()(x, t, s, class_labels=torch.zeros(2, 3))
        cond = net(x, t, s, class_labels=onehot)
    assert torch.allclose(dropped, uncond) and not torch.allclose(cond, uncond)


def test_augment_labels():
    net = _perturb(SongUNet(**TINY, augment_dim=5)).eval()
    assert net.map_augment.bias is None
    x, t, s = _inputs()
    with torch.no_grad():
        plain = net(x, t, s)
        aug = net(x, t, s, augment_labels=torch.randn(2, 5))
        zero = net(x, t, s, augment_labels=torch.zeros(2, 5))
    assert not torch.allclose(plain, aug) and torch.allclose(plain, zero)


def test_s_embedding_is_used():
    net = _perturb(SongUNet(**TINY)).eval()
    assert {"map_layer0_s.weight", "map_layer1_s.bias"} <= set(net.state_dict())
    x, t, s = _inputs()
    with torch.no_grad():
        assert not torch.allclose(net(x, t, s), net(x, t, s * 0.5))
        assert not torch.allclose(net(x, t, s), net(x, t * 0.5, s))
    with pytest.raises(ValueError, match="noise_labels_s"):
        net(x, t, None)


def test_s_embed_false():
    net = _perturb(SongUNet(**TINY, s_embed=False)).eval()
    assert not [k for k in net.state_dict() if k.startswith("map_") and k.split(".")[0].endswith("_s")]
    x, t, s = _inputs()
    with torch.no_grad():
        y = net(x, t, s)
        assert y.shape == (2, 3, 8, 8)
        assert torch.equal(y, net(x, t, s * 0.5)) and torch.equal(y, net(x, t, None))
        assert not torch.allclose(y, net(x, t * 0.5, s))


def test_noise_labels_broadcast_over_batch():
    net = _perturb(SongUNet(**TINY)).eval()
    x, _, _ = _inputs(batch=3)
    with torch.no_grad():
        a = net(x, torch.tensor([700.0]), torch.tensor([200.0]))
        b = net(x, torch.full((3,), 700.0), torch.full((3,), 200.0))
        c = net(x, torch.tensor([700.0]), torch.full((3,), 200.0))
    assert a.shape == (3, 3, 8, 8)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)


def test_float64_noise_labels_keep_float32_network():
    net = _perturb(SongUNet(**TINY)).eval()
    x, t, s = _inputs()
    with torch.no_grad():
        y32 = net(x, t, s)
        y64 = net(x, t.double(), s.double())
    assert y64.dtype == torch.float32
    torch.testing.assert_close(y32, y64, rtol=0, atol=1e-4)


def test_positional_embedding_is_sin_then_cos():
    emb = unet.PositionalEmbedding(8, endpoint=True)
    x = torch.tensor([0.0, 3.0])
    freqs = 10000.0 ** (-torch.arange(4, dtype=torch.float32) / 3)
    expected = torch.cat([torch.sin(x[:, None] * freqs), torch.cos(x[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb(x), expected)


def _reference_attention(block, x):
    """The release's attention written out: qkv channels ordered (head, channel, q/k/v)."""
    b, c, h, w = x.shape
    heads = block.num_heads
    qkv = block.qkv(block.norm2(x)).reshape(b, heads, c // heads, 3, h * w)
    out = torch.empty(b, heads, c // heads, h * w)
    for i in range(b):
        for j in range(heads):
            q, k, v = qkv[i, j, :, 0], qkv[i, j, :, 1], qkv[i, j, :, 2]  # [C/heads, HW]
            logits = q.T @ k / math.sqrt(c // heads)  # [HW_q, HW_k]
            out[i, j] = v @ logits.softmax(dim=1).T
    return block.proj(out.reshape(b, c, h, w))


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_matches_release_layout(heads):
    block = unet.UNetBlock(16, 16, emb_channels=8, attention=True, num_heads=heads, eps=1e-6,
                           init={"init_mode": "xavier_uniform"})
    _perturb(block, scale=0.3)
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(block._attention(x), _reference_attention(block, x), rtol=1e-5, atol=1e-5)


def test_dropout_follows_train_eval():
    net = _perturb(SongUNet(**{**TINY, "dropout": 0.5}))
    x, t, s = _inputs()
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(x, t, s), net(x, t, s))
        net.train()
        torch.manual_seed(0)
        a = net(x, t, s)
        torch.manual_seed(1)
        assert not torch.allclose(a, net(x, t, s))


def test_channels_last():
    net = _perturb(SongUNet(**TINY)).eval()
    x, t, s = _inputs()
    with torch.no_grad():
        ref = net(x, t, s)
        net = net.to(memory_format=torch.channels_last)
        out = net(x.contiguous(memory_format=torch.channels_last), t, s)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_box_resampling_matches_generic_filter():
    """The nearest/avg-pool fast path for the [1,1] filter equals the generic FIR resampling."""
    for up in (True, False):
        conv = unet.Conv2d(4, 6, kernel=3, up=up, down=not up, resample_filter=[1, 1])
        _perturb(conv)
        x = torch.randn(2, 4, 8, 8)
        with torch.no_grad():
            fast = conv(x)
            conv._box = False
            generic = conv(x)
        torch.testing.assert_close(fast, generic, rtol=1e-6, atol=1e-6)


def test_backward_runs():
    net = _perturb(SongUNet(**TINY, label_dim=2)).train()
    x, t, s = _inputs()
    y = net(x.requires_grad_(), t, s, class_labels=torch.eye(2))
    y.square().mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters())


def test_constructor_kwargs():
    net = SongUNet(**{**TINY, "channel_mult": (1, 2), "attn_resolutions": (4,), "resample_filter": (1, 1)},
                   img_channels=3)
    assert set(net.state_dict()) == set(SongUNet(**TINY).state_dict())
    with pytest.raises(TypeError, match="not_an_argument"):  # refused, where the release's SongUNet only warns
        SongUNet(**TINY, not_an_argument=1)
    with pytest.raises(ValueError, match="embedding_type"):
        SongUNet(**TINY, embedding_type="learned")
    with pytest.raises(ValueError, match="encoder_type"):
        SongUNet(**TINY, encoder_type="fancy")
    with pytest.raises(ValueError, match="decoder_type"):
        SongUNet(**TINY, decoder_type="residual")


def test_the_release_style_reference_of_benchmarks_forward_computes_the_same_networks():
    """benchmarks/forward.py times ours against the release's way of computing the networks (in-place
    residual sums and einsum attention for DDPM++, timm's attention and the einsum unpatchify for DiT):
    that comparison means something only if both compute the same function with the same weights."""
    import importlib.util

    from imm.model.network import IMMNetwork

    path = BENCHMARKS / "forward.py"
    spec = importlib.util.spec_from_file_location("forward_benchmark", path)
    forward = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(forward)
    unet = dict(img_resolution=8, img_channels=3, label_dim=0, model_type="SongUNet", model_channels=16,
                channel_mult=[1, 2], attn_resolutions=[4], num_blocks=1, embedding_type="positional",
                encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1])
    dit = dict(img_resolution=8, img_channels=4, label_dim=10, model_type="DiT", depth=2, hidden_size=64,
               num_heads=4, patch_size=2, s_embed=True, temb_type="stride", f_type="euler_fm")
    for cfg in (unet, dit):
        torch.manual_seed(0)
        net = IMMNetwork(**cfg).eval()
        for p in net.parameters():  # the zero-initialised output layers would hide differences
            torch.nn.init.normal_(p, std=0.2)
        ref = forward.release_style(net)
        assert any("forward" in vars(m) for m in ref.modules())  # the release's block forwards are in use
        x, t, s, labels = forward._inputs(net, 3, torch.device("cpu"))
        cfg_scale = 1.5 if labels is not None else None
        with torch.no_grad():
            ours, theirs = net(x, t, s, labels, cfg_scale=cfg_scale), ref(x, t, s, labels, cfg_scale=cfg_scale)
        assert ours.abs().max() > 1e-3
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
