# Copyright 2025 The imm authors.
# SPDX-License-Identifier: Apache-2.0
"""Diffusion Transformer (DiT, adaLN-Zero) backbone for Inductive Moment Matching.

This is an independent implementation of the DiT variant shipped with the
official IMM release (github.com/lumalabs/imm, ``training/dit.py``).  That
network is the DiT of Peebles & Xie ("Scalable Diffusion Models with
Transformers", ICCV 2023) with one addition: a second timestep embedder
(``s_embedder``) whose output is added to the embedding of ``t``.  Blocks use
timm-style patch embedding, attention and MLP layers.

The module reproduces the release's parameter names, shapes and numerics, so a
state dict taken from an official checkpoint loads with ``strict=True`` and
gives the same outputs:

* ``x_embedder.proj``: a ``patch x patch`` convolution with stride ``patch``;
  its output is flattened to tokens in row-major patch order.
* ``pos_embed``: a frozen ``nn.Parameter`` (``requires_grad=False``) of shape
  ``[1, num_patches, hidden_size]`` holding the fixed 2-D sine-cosine table;
  the first half of the channels encodes the column (x) index, the second
  half the row (y) index, each as ``[sin, cos]``.
* ``t_embedder`` / ``s_embedder``: sinusoidal features of dimension 256
  (``[cos, sin]`` order, ``max_period=10000``, computed in float64) followed by
  ``Linear -> SiLU -> Linear`` (``mlp.0`` and ``mlp.2``).
* ``y_embedder.embedding_table``: ``num_classes + 1`` rows (plus one more when
  ``class_dropout_prob > 0``); the one-hot label ``[B, num_classes]`` is turned
  into an index by appending the column ``1 - sum(onehot)`` and taking the
  argmax, so an all-zero row selects the null row ``num_classes``.
* conditioning ``c = t_emb + s_emb + y_emb``.
* each block: ``LayerNorm(eps=1e-6, no affine)`` + adaLN modulation
  (``adaLN_modulation.1`` producing shift/scale/gate for attention and MLP),
  fused ``qkv`` projection whose output rows are ``[q | k | v]``, each split
  into heads, scaled dot-product attention, tanh-GELU MLP (``fc1``/``fc2``).
* ``final_layer``: adaLN (shift, scale) + ``linear`` to ``patch*patch*C``
  values per token, unpatchified in ``(p, q, c)`` order.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from imm.core.errors import InputError
from imm.model.backbones import call_block

__all__ = [
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "TimestepEmbedder",
    "LabelEmbedder",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "get_2d_sincos_pos_embed",
    "DIT_SIZES",
    "DiT_models",
    "DiT_S_2",
    "DiT_S_4",
    "DiT_S_8",
    "DiT_B_2",
    "DiT_B_4",
    "DiT_B_8",
    "DiT_L_2",
    "DiT_L_4",
    "DiT_L_8",
    "DiT_XL_2",
    "DiT_XL_4",
    "DiT_XL_8",
]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens ``x [B, N, D]`` by per-sample ``shift``/``scale [B, D]``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ---------------------------------------------------------------------------
# Fixed 2-D sine-cosine positional table
# ---------------------------------------------------------------------------


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[len(positions), dim]`` table: ``sin`` features then ``cos`` features (float64)."""
    if dim % 2:
        raise InputError(f"sin-cos embedding needs an even dimension, got {dim}")
    exponent = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    inv_freq = 1.0 / (10000.0**exponent)
    angles = positions.reshape(-1, 1).to(torch.float64) * inv_freq.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_size: int, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Fixed 2-D positional table ``[grid_size**2, embed_dim]`` in float64.

    Tokens are enumerated row by row.  Channels ``[0, D/2)`` encode each token's
    column index and ``[D/2, D)`` its row index (MAE / DiT convention).
    """
    if embed_dim % 2:
        raise InputError(f"2-D sin-cos embedding needs an even dimension, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    half = embed_dim // 2
    return torch.cat([_sincos_1d(half, cols), _sincos_1d(half, rows)], dim=1)


# ---------------------------------------------------------------------------
# timm-compatible building blocks (same parameter names as timm's layers)
# ---------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Image to patch tokens: strided convolution ``proj``; ``[B,C,H,W] -> [B,N,D]``."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.img_size = (int(img_size), int(img_size))
        self.patch_size = (int(patch_size), int(patch_size))
        if img_size % patch_size:
            raise InputError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise InputError(f"expected input of spatial size {self.img_size}, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection.

    The ``qkv`` output features are laid out as ``[q | k | v]``, each block of
    ``dim`` features split into ``num_heads`` heads of ``head_dim``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise InputError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # timm's default qk-norm layer is an affine LayerNorm over each head.
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        # [B, N, 3*D] -> [3, B, heads, N, head_dim]
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = self.q_norm(q)
        k = self.k_norm(k)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """Two-layer feed-forward network ``fc1 -> GELU(tanh) -> fc2`` with optional dropout."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


# ---------------------------------------------------------------------------
# Conditioning embedders
# ---------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Scalar time (already scaled, e.g. ``1000 * t``) -> ``hidden_size`` vector.

    ``embedding_type='positional'`` (the default, used by all released nets)
    uses GLIDE/DiT sinusoidal features ``[cos(t f_i), sin(t f_i)]`` with
    ``f_i = exp(-ln(max_period) * i / half)``.  ``'fourier'`` uses random
    Fourier features with a stored ``freqs`` buffer.  The features are computed
    in float64, then fed to the MLP in the MLP's parameter dtype.
    """

    def __init__(
        self,
        hidden_size: int,
        frequency_embedding_size: int = 256,
        embedding_type: str = "positional",
        use_mlp: bool = True,
        scale: float = 1.0,
        max_period: float = 10000.0,
    ):
        super().__init__()
        if embedding_type not in ("positional", "fourier"):
            raise InputError(f"unknown embedding_type {embedding_type!r}")
        self.hidden_size = hidden_size
        self.frequency_embedding_size = frequency_embedding_size
        self.embedding_type = embedding_type
        self.use_mlp = use_mlp
        self.max_period = max_period
        if use_mlp:
            self.mlp = nn.Sequential(
                nn.Linear(frequency_embedding_size, hidden_size),
                nn.SiLU(),
                nn.Linear(hidden_size, hidden_size),
            )
        elif frequency_embedding_size != hidden_size:
            raise InputError("without an MLP the frequency embedding size must equal hidden_size")
        if embedding_type == "fourier":
            self.register_buffer("freqs", torch.randn(frequency_embedding_size // 2) * scale)

    def frequency_features(self, t: torch.Tensor) -> torch.Tensor:
        """``[B] -> [B, frequency_embedding_size]`` float64 features."""
        dim = self.frequency_embedding_size
        half = dim // 2
        if self.embedding_type == "positional":
            steps = torch.arange(half, dtype=torch.float64, device=t.device)
            freqs = torch.exp(steps * (-math.log(self.max_period) / half))
        else:
            freqs = self.freqs.to(torch.float64) * (2 * math.pi)
        angles = t.to(torch.float64).unsqueeze(1) * freqs.unsqueeze(0)
        features = torch.cat([angles.cos(), angles.sin()], dim=1)
        if dim % 2:
            features = F.pad(features, (0, 1))
        return features

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.frequency_features(t)
        if not self.use_mlp:
            return features.to(t.dtype if t.is_floating_point() else torch.get_default_dtype())
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-index -> vector table with the release's optional label dropout.

    ``num_rows`` is the number of real rows requested (the DiT passes
    ``num_classes + 1``, the last being the "unconditional" row).  When
    ``dropout_prob > 0`` one more row is appended, and during training each
    label is replaced by that extra row (index ``num_rows``) with probability
    ``dropout_prob``, as in the release.
    """

    def __init__(self, num_rows: int, hidden_size: int, dropout_prob: float = 0.0):
        super().__init__()
        self.num_rows = num_rows
        self.dropout_prob = float(dropout_prob)
        extra = 1 if self.dropout_prob > 0 else 0
        self.embedding_table = nn.Embedding(num_rows + extra, hidden_size)

    def forward(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids == 1, self.num_rows, labels)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_rows, labels)
        return self.embedding_table(labels)


# ---------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        temb_size: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        qk_norm: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(temb_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) followed by a linear map to ``patch*patch*out_channels``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------


class DiT(nn.Module):
    """DiT backbone with an extra ``s`` time embedding (the IMM release's ``DiT``).

    Constructor arguments follow the release (``img_resolution``,
    ``patch_size=2``, ``in_channels=4``, ``hidden_size=1152``, ``depth=28``,
    ``num_heads=16``, ``mlp_ratio=4.0``, ``class_dropout_prob=0.0``,
    ``num_classes``, ``s_embed=True``, ``qk_norm=False``, ``skip=False``,
    ``embedding_kwargs={}``, ``temb_mult=1``, ``dropout=0``), and the
    ``img_channels``/``out_channels`` the wrapper passes, which it ignores as
    the release does.  The release also accepts and ignores any other keyword;
    here that is an error (a typo in ``network.*`` would train another model).
    ``num_classes`` defaults to ``label_dim`` (which
    ``IMMNetwork`` passes), or 1000 (the release's default) without one, so the
    all-zero label always selects the null row.  The output has ``in_channels`` channels
    (the release ignores ``out_channels`` and never learns a variance).

    ``forward(x, noise_labels_t, noise_labels_s, class_labels)``:
    ``x [B, C, H, W]``; ``noise_labels_t``/``noise_labels_s`` of shape ``[B]``
    or ``[1]``; ``class_labels`` a float one-hot ``[B or 1, num_classes]`` (an
    all-zero row means unconditional) or ``None`` (unconditional).

    ``activation_checkpointing`` (off; set by ``imm.model.backbones.set_activation_checkpointing``) recomputes
    each block's activations in the backward pass instead of keeping them.
    """

    activation_checkpointing = False

    def __init__(
        self,
        img_resolution: int,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.0,
        num_classes: Optional[int] = None,
        s_embed: bool = True,
        qk_norm: bool = False,
        skip: bool = False,
        embedding_kwargs: Optional[Dict[str, Any]] = None,
        temb_mult: int = 1,
        dropout: float = 0.0,
        label_dim: Optional[int] = None,
        img_channels: Optional[int] = None,  # what IMMNetwork passes; the input is in_channels
        out_channels: Optional[int] = None,  # the release ignores it: the output has in_channels
    ):
        super().__init__()
        if num_classes is None:  # the release's default is 1000; ours follows the network's label_dim
            num_classes = 1000 if label_dim is None else int(label_dim)
        if temb_mult != 1:
            # The release's final layer maps from hidden_size, so any other value
            # cannot run a forward pass there either.
            raise InputError(f"temb_mult={temb_mult} is not supported (only 1)")
        img_resolution = int(img_resolution)
        embedding_kwargs = dict(embedding_kwargs or {})
        temb_size = hidden_size * temb_mult

        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.s_embed = bool(s_embed)
        self.skip = skip  # accepted for compatibility; the release's DiT does not use it

        # Registration order follows the release (it only affects init RNG order).
        if self.s_embed:
            self.s_embedder = TimestepEmbedder(temb_size, **embedding_kwargs)
        self.x_embedder = PatchEmbed(img_resolution, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(temb_size, **embedding_kwargs)
        self.y_embedder = LabelEmbedder(num_classes + 1, temb_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # A frozen Parameter (not a buffer), so it is in the state dict like the release's.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, temb_size, mlp_ratio=mlp_ratio, dropout=dropout, qk_norm=qk_norm)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # -- initialisation ------------------------------------------------------

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's adaLN-Zero initialisation (output of every residual branch is 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        grid = self.x_embedder.grid_size[0]
        table = get_2d_sincos_pos_embed(self.hidden_size, grid, device=self.pos_embed.device)
        self.pos_embed.copy_(table.to(self.pos_embed.dtype).unsqueeze(0))

        # Patch projection initialised like a Linear layer on the flattened patch.
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        embedders = [self.t_embedder] + ([self.s_embedder] if self.s_embed else [])
        for embedder in embedders:
            if embedder.use_mlp:
                nn.init.normal_(embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- helpers ---------------------------------------------------------------

    def labels_to_index(self, class_labels: Optional[torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
        """One-hot ``[B, num_classes]`` -> indices ``[B]``; all-zero rows / None -> ``num_classes``."""
        if class_labels is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        labels = class_labels.reshape(class_labels.shape[0], -1)
        unconditional = 1 - labels.sum(dim=1, keepdim=True)
        return torch.cat([labels, unconditional], dim=1).argmax(dim=1)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, N, p*p*C]`` -> image ``[B, C, H, W]`` (token features ordered ``p, q, c``)."""
        p = self.patch_size
        c = self.out_channels
        gh, gw = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    @staticmethod
    def _per_sample(labels: torch.Tensor, batch: int) -> torch.Tensor:
        labels = labels.reshape(-1)
        if labels.shape[0] == 1 and batch != 1:
            labels = labels.expand(batch)
        return labels

    # -- forward ---------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        noise_labels_t: torch.Tensor,
        noise_labels_s: Optional[torch.Tensor] = None,
        class_labels: Optional[torch.Tensor] = None,
        **unused_kwargs: Any,
    ) -> torch.Tensor:
        batch = x.shape[0]
        tokens = self.x_embedder(x) + self.pos_embed

        c = self.t_embedder(self._per_sample(noise_labels_t, batch))
        if self.s_embed and noise_labels_s is not None:
            c = c + self.s_embedder(self._per_sample(noise_labels_s, batch))
        c = c + self.y_embedder(self.labels_to_index(class_labels, batch, x.device))

        for block in self.blocks:
            tokens = call_block(self, block, tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))


# ---------------------------------------------------------------------------
# Size registry
# ---------------------------------------------------------------------------

DIT_SIZES: Dict[str, Dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

PATCH_SIZES = (2, 4, 8)


def _sized_constructor(size: str, patch_size: int) -> Callable[..., DiT]:
    fixed = dict(DIT_SIZES[size], patch_size=patch_size)
    name = f"DiT_{size}_{patch_size}"

    def build(**kwargs: Any) -> DiT:
        for key, value in fixed.items():
            if key in kwargs and kwargs[key] != value:
                raise InputError(f"{name} fixes {key}={value}, got {key}={kwargs[key]}")
        return DiT(**{**kwargs, **fixed})

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"DiT-{size}/{patch_size}: " + ", ".join(f"{k}={v}" for k, v in fixed.items()) + "."
    return build


DiT_S_2 = _sized_constructor("S", 2)
DiT_S_4 = _sized_constructor("S", 4)
DiT_S_8 = _sized_constructor("S", 8)
DiT_B_2 = _sized_constructor("B", 2)
DiT_B_4 = _sized_constructor("B", 4)
DiT_B_8 = _sized_constructor("B", 8)
DiT_L_2 = _sized_constructor("L", 2)
DiT_L_4 = _sized_constructor("L", 4)
DiT_L_8 = _sized_constructor("L", 8)
DiT_XL_2 = _sized_constructor("XL", 2)
DiT_XL_4 = _sized_constructor("XL", 4)
DiT_XL_8 = _sized_constructor("XL", 8)

#: ``"DiT-XL/2" -> DiT_XL_2`` etc., as in the original DiT code.
DiT_models: Dict[str, Callable[..., DiT]] = {
    f"DiT-{size}/{patch}": globals()[f"DiT_{size}_{patch}"] for size in DIT_SIZES for patch in PATCH_SIZES
}
