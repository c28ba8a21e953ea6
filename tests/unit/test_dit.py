# Copyright 2025 The imm authors.
# SPDX-License-Identifier: Apache-2.0
"""Tests for the DiT backbone (imm.model.backbones.dit)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import imm
from imm.model.backbones import dit
from tests.helpers import FIXTURES

REFERENCE_SHAPES = FIXTURES.parent / "official_param_shapes.json"


TINY_KWARGS = {
    "img_resolution": 8,
    "img_channels": 4,
    "in_channels": 4,
    "out_channels": 4,
    "label_dim": 10,
    "patch_size": 2,
    "hidden_size": 64,
    "depth": 2,
    "num_heads": 4,
    "num_classes": 10,
    "s_embed": True,
}


def _randomize_(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial values (adaLN-Zero init makes outputs 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name == "pos_embed":
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net


def _tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return _randomize_(dit.DiT(**{**TINY_KWARGS, **overrides})).eval()


def _one_hot(indices, num_classes=10):
    return F.one_hot(torch.as_tensor(indices), num_classes).float()


def _build_on_meta(constructor, **kwargs):
    with torch.device("meta"):
        return constructor(**kwargs)


def _numel(net):
    return sum(p.numel() for p in net.parameters())


# --------------------------------------------------------------------------- names / shapes


def test_xl2_names_and_shapes_match_release():
    ref = json.loads(REFERENCE_SHAPES.read_text())["imagenet256_dit_xl2"]
    cfg = dict(ref["config"])
    expected = {k[len("model.") :]: list(v) for k, v in ref["tensors"].items() if k.startswith("model.")}

    kwargs = {
        "img_resolution": cfg["img_resolution"],
        "img_channels": cfg["img_channels"],
        "in_channels": cfg["img_channels"],
        "out_channels": cfg["img_channels"],
        "label_dim": cfg["label_dim"],
        "s_embed": cfg["s_embed"],
    }
    constructor = getattr(dit, cfg["model_type"])
    net = _build_on_meta(constructor, **kwargs)
    got = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert got == expected
    assert _numel(net) == ref["n_params"] == 676_735_504

    # The generic class with default arguments is DiT-XL/2 as well.
    plain = _build_on_meta(dit.DiT, **kwargs)
    assert {k: list(v.shape) for k, v in plain.state_dict().items()} == expected


def test_pos_embed_is_frozen_parameter_in_state_dict():
    net = dit.DiT(**TINY_KWARGS)
    params = dict(net.named_parameters())
    assert "pos_embed" in params and not params["pos_embed"].requires_grad
    assert "pos_embed" in net.state_dict()
    assert not list(net.buffers())  # no buffers at all (positional time embedding)


@pytest.mark.parametrize(
    "size, expected_millions",
    [("S", 33), ("B", 130), ("L", 458), ("XL", 675)],
)
def test_param_counts_patch2(size, expected_millions):
    net = _build_on_meta(getattr(dit, f"DiT_{size}_2"), img_resolution=32, in_channels=4, s_embed=True)
    n = _numel(net)
    # The published numbers are for the plain DiT; the s-embedder adds about
    # (256 + hidden) * hidden parameters on top.
    hidden = dit.DIT_SIZES[size]["hidden_size"]
    s_embed_params = 256 * hidden + hidden + hidden * hidden + hidden
    assert abs((n - s_embed_params) / 1e6 - expected_millions) < 0.02 * expected_millions
    no_s = _build_on_meta(getattr(dit, f"DiT_{size}_2"), img_resolution=32, in_channels=4, s_embed=False)
    assert n - _numel(no_s) == s_embed_params


def test_size_registry_and_constructors():
    assert set(dit.DIT_SIZES) == {"S", "B", "L", "XL"}
    for size, cfg in dit.DIT_SIZES.items():
        for patch in (2, 4, 8):
            ctor = getattr(dit, f"DiT_{size}_{patch}")
            assert dit.DiT_models[f"DiT-{size}/{patch}"] is ctor
            net = _build_on_meta(ctor, img_resolution=32)
            assert len(net.blocks) == cfg["depth"]
            assert net.hidden_size == cfg["hidden_size"]
            assert net.num_heads == cfg["num_heads"]
            assert net.patch_size == patch
            assert net.pos_embed.shape == (1, (32 // patch) ** 2, cfg["hidden_size"])
    with pytest.raises(ValueError):
        dit.DiT_S_2(img_resolution=32, depth=3)
    # Passing a value equal to the fixed one is fine.
    assert len(_build_on_meta(dit.DiT_S_2, img_resolution=32, depth=12).blocks) == 12


def test_label_table_rows_follow_release():
    assert dit.DiT(**TINY_KWARGS).y_embedder.embedding_table.weight.shape[0] == 11
    # The release appends one more row when label dropout is enabled.
    net = dit.DiT(**{**TINY_KWARGS, "class_dropout_prob": 0.1})
    assert net.y_embedder.embedding_table.weight.shape[0] == 12


# --------------------------------------------------------------------------- forward


def test_num_classes_follows_label_dim():
    """Without num_classes the label table follows label_dim (the all-zero label is row label_dim), and
    keeps the release's 1000 classes when neither is given."""
    kwargs = {k: v for k, v in TINY_KWARGS.items() if k not in ("num_classes", "label_dim")}
    assert dit.DiT(**kwargs, label_dim=3).y_embedder.embedding_table.weight.shape[0] == 4
    assert dit.DiT(**kwargs).num_classes == 1000
    net = imm.IMMNetwork(model_type="DiT", label_dim=3, **{k: v for k, v in kwargs.items()
                                                            if k not in ("in_channels", "out_channels")})
    assert net.model.num_classes == 3
    assert net.model.labels_to_index(torch.zeros(2, 3), 2, torch.device("cpu")).tolist() == [3, 3]


def test_forward_shapes_with_and_without_labels():
    net = _tiny()
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([994.0, 500.0, 10.0])
    s = torch.tensor([0.0, 250.0, 5.0])
    with torch.no_grad():
        y_cond = net(x, t, s, _one_hot([1, 2, 3]))
        y_none = net(x, t, s, None)
        y_no_s = net(x, t, None, _one_hot([1, 2, 3]))
    for y in (y_cond, y_none, y_no_s):
        assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert not torch.allclose(y_cond, y_none)
    assert not torch.allclose(y_cond, y_no_s)


def test_all_zero_one_hot_selects_null_class():
    net = _tiny()
    labels = torch.zeros(4, 10)
    labels[1, 0] = 1
    labels[2, 9] = 1
    idx = net.labels_to_index(labels, 4, torch.device("cpu"))
    assert idx.tolist() == [10, 0, 9, 10]

    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([700.0, 300.0])
    s = torch.tensor([100.0, 200.0])
    with torch.no_grad():
        out_zero = net(x, t, s, torch.zeros(2, 10))
        out_none = net(x, t, s, None)
        # Explicitly using the null row gives the same result.
        c = net.t_embedder(t) + net.s_embedder(s) + net.y_embedder.embedding_table.weight[10]
        tokens = net.x_embedder(x) + net.pos_embed
        for block in net.blocks:
            tokens = block(tokens, c)
        manual = net.unpatchify(net.final_layer(tokens, c))
    torch.testing.assert_close(out_zero, out_none, rtol=0, atol=0)
    torch.testing.assert_close(out_zero, manual)


def test_eval_mode_is_deterministic_even_with_label_dropout():
    net = _tiny(class_dropout_prob=0.5, dropout=0.3)
    x = torch.randn(4, 4, 8, 8)
    t = torch.full((4,), 600.0)
    s = torch.full((4,), 100.0)
    labels = _one_hot([0, 1, 2, 3])
    with torch.no_grad():
        a = net(x, t, s, labels)
        torch.manual_seed(123)
        b = net(x, t, s, labels)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_label_dropout_uses_extra_row():
    net = _tiny(class_dropout_prob=1.0).train()
    emb = net.y_embedder(torch.tensor([0, 3, 10]))
    expected = net.y_embedder.embedding_table.weight[11].expand(3, -1)
    torch.testing.assert_close(emb, expected)


def test_singleton_time_labels_broadcast():
    net = _tiny()
    x = torch.randn(3, 4, 8, 8)
    labels = _one_hot([4, 5, 6])
    with torch.no_grad():
        a = net(x, torch.tensor([800.0]), torch.tensor([50.0]), labels)
        b = net(x, torch.full((3,), 800.0), torch.full((3,), 50.0), labels)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_zero_initialised_net_outputs_zero():
    torch.manual_seed(0)
    net = dit.DiT(**TINY_KWARGS).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0]), torch.tensor([1.0, 2.0]), _one_hot([0, 1]))
    assert torch.count_nonzero(out) == 0


def test_timestep_features_cos_then_sin():
    emb = dit.TimestepEmbedder(16)
    t = torch.tensor([0.0, 3.0, 999.5])
    feats = emb.frequency_features(t)
    assert feats.dtype == torch.float64 and feats.shape == (3, 256)
    freqs = torch.tensor([math.exp(-math.log(10000.0) * i / 128) for i in range(128)], dtype=torch.float64)
    args = t.double()[:, None] * freqs[None]
    torch.testing.assert_close(feats, torch.cat([args.cos(), args.sin()], dim=1))


def test_pos_embed_layout():
    table = dit.get_2d_sincos_pos_embed(8, 3)
    assert table.shape == (9, 8)
    # token 1 is (row 0, col 1): first half encodes the column, second half the row
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    col_part = torch.cat([torch.sin(1 * omega), torch.cos(1 * omega)])
    row_part = torch.cat([torch.sin(0 * omega), torch.cos(0 * omega)])
    torch.testing.assert_close(table[1], torch.cat([col_part, row_part]))
    # token 3 is (row 1, col 0)
    torch.testing.assert_close(table[3], torch.cat([row_part, col_part]))


def test_attention_qkv_layout_is_q_k_v_then_heads():
    torch.manual_seed(0)
    dim, heads = 12, 3
    attn = dit.Attention(dim, num_heads=heads, qkv_bias=True).eval()
    x = torch.randn(2, 5, dim)
    w, b = attn.qkv.weight, attn.qkv.bias
    hd = dim // heads
    outs = []
    for h in range(heads):
        rows = slice(h * hd, (h + 1) * hd)
        q = x @ w[rows].T + b[rows]
        k = x @ w[dim:][rows].T + b[dim:][rows]
        v = x @ w[2 * dim :][rows].T + b[2 * dim :][rows]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        outs.append(att @ v)
    expected = attn.proj(torch.cat(outs, dim=-1))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_unpatchify_inverts_patch_layout():
    net = dit.DiT(**{**TINY_KWARGS, "patch_size": 4})
    img = torch.randn(2, 4, 8, 8)
    p = 4
    # tokens with features ordered (p, q, c), tokens row-major over the patch grid
    tokens = img.reshape(2, 4, 2, p, 2, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 4, p * p * 4)
    torch.testing.assert_close(net.unpatchify(tokens), img, rtol=0, atol=0)


def test_unknown_constructor_keys_are_refused_and_extra_forward_kwargs_accepted():
    """The release's DiT ignores unknown constructor keys; here a typo is an error, while the
    forward pass still takes extra keywords."""
    with pytest.raises(TypeError, match="some_future_option"):
        dit.DiT(**TINY_KWARGS, some_future_option=1)
    net = dit.DiT(**TINY_KWARGS)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        net(x, torch.tensor([1.0]), torch.tensor([1.0]), _one_hot([0]), augment_labels=None)


def test_release_state_dict_loads_strict():
    _, state = imm.read_checkpoint(FIXTURES / "dit_imagenet_like.pkl")
    state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    net = dit.DiT(**TINY_KWARGS)
    net.load_state_dict(state, strict=True)
    assert list(net.state_dict()) == list(state)
    # The stored table is the sin-cos table (the fixture may be perturbed a little).
    table = dit.get_2d_sincos_pos_embed(64, 4).float()
    assert (state["pos_embed"][0] - table).abs().mean() < 0.05
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 4, 8, 8), torch.tensor([994.0]), torch.tensor([994.0]), _one_hot([0, 9]))
    assert torch.isfinite(out).all()


def test_forward_traces_without_graph_breaks():
    dynamo = pytest.importorskip("torch._dynamo")
    net = _tiny()
    x = torch.randn(2, 4, 8, 8)
    args = (x, torch.tensor([500.0, 20.0]), torch.tensor([1.0, 2.0]), _one_hot([0, 1]))
    dynamo.reset()
    explanation = dynamo.explain(net)(*args)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    dynamo.reset()
