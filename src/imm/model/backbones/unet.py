# Copyright 2025 The imm authors.
# SPDX-License-Identifier: Apache-2.0
"""DDPM++ / NCSN++ UNet (EDM's ``SongUNet``) with the IMM second-time embedding.

This is an independent implementation of the ``SongUNet`` backbone of the
official IMM release (github.com/lumalabs/imm, ``training/unets.py``), itself
the UNet of Karras et al. (EDM, NeurIPS 2022) after Song et al. ("Score-Based
Generative Modeling through Stochastic Differential Equations", ICLR 2021),
extended by a second noise-level input ``s``.  Parameter and buffer names,
shapes and numerics follow the release, so its state dicts load with
``strict=True`` and give the same output.

Layout facts the weights depend on:

* mapping network: ``map_noise`` (sinusoidal or random Fourier features of the
  noise label, emitted in ``[sin, cos]`` order), optional ``map_label`` /
  ``map_augment``, then ``map_layer0`` and ``map_layer1``.  With
  ``s_embed=True`` the second label has its own ``map_noise_s``,
  ``map_layer0_s`` and ``map_layer1_s``, and the conditioning vector is
  ``silu(MLP_t(pos(t) + label) + MLP_s(pos(s)))`` where each MLP is
  ``Linear -> SiLU -> Linear``.
* blocks live in the ``ModuleDict``s ``enc`` and ``dec`` keyed
  ``"{res}x{res}_{conv|down|up|in0|in1|block<i>|aux_*}"``.
* attention ``qkv`` is a 1x1 convolution whose ``3C`` output channels are
  ordered (head, channel within head, q/k/v); attention is scaled by
  ``1/sqrt(channels per head)`` (one head per block, as in the release).
* GroupNorm uses ``min(32, C // 4)`` groups and ``eps=1e-6``.
* ``resample_filter`` buffers exist only on convolutions that up/downsample.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from imm.core.errors import InputError
from imm.model.backbones import call_block

__all__ = ["Conv2d", "FourierEmbedding", "GroupNorm", "Linear", "PositionalEmbedding", "SongUNet", "UNetBlock"]


def _init_weight(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """EDM's weight initialisers (``xavier_*`` / ``kaiming_*``, uniform or normal)."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise InputError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    """Fully connected layer with EDM initialisation (``weight`` [out, in], ``bias`` [out])."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = {"mode": init_mode, "fan_in": in_features, "fan_out": out_features}
        self.weight = nn.Parameter(_init_weight([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(_init_weight([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _is_box_filter(taps: Sequence[float]) -> bool:
    """True for a two-tap constant filter such as ``[1, 1]`` (2x2 box after the outer product)."""
    return len(taps) == 2 and float(taps[0]) == float(taps[1]) and float(taps[0]) != 0.0


class Conv2d(nn.Module):
    """Square convolution with optional 2x up/downsampling by a separable FIR filter.

    ``kernel=0`` gives a pure resampling layer without weights.  Upsampling
    happens before the convolution and downsampling before it too (or after it
    with ``fused_resample``, which the NCSN++ residual encoder uses).  The filter
    ``outer(f, f) / sum(f)**2`` is a buffer named ``resample_filter`` that exists
    only when the layer resamples.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0):
        if up and down:
            raise InputError("a convolution cannot both upsample and downsample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = {"mode": init_mode, "fan_in": in_channels * kernel * kernel, "fan_out": out_channels * kernel * kernel}
        self.weight = (nn.Parameter(_init_weight([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(_init_weight([out_channels], **fans) * init_bias) if kernel and bias else None
        taps = [float(v) for v in resample_filter]
        if up or down:
            f = torch.as_tensor(taps, dtype=torch.float32)
            self.register_buffer("resample_filter", torch.outer(f, f)[None, None] / f.sum().square())
        else:
            self.resample_filter = None
        # A 2x2 box filter is plain nearest-neighbour upsampling / 2x2 average pooling.
        self._box = _is_box_filter(taps)

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        if self._box:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        f = self.resample_filter.to(x.dtype)
        pad = (f.shape[-1] - 1) // 2
        c = x.shape[1]
        return F.conv_transpose2d(x, (f * 4).expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)

    def _downsample(self, x: torch.Tensor, bias: torch.Tensor | None = None, pad: int | None = None) -> torch.Tensor:
        f = self.resample_filter.to(x.dtype)
        if pad is None:
            pad = (f.shape[-1] - 1) // 2
        if self._box and pad == 0:
            x = F.avg_pool2d(x, 2)
            return x if bias is None else x + bias.reshape(1, -1, 1, 1)
        c = x.shape[1]
        return F.conv2d(x, f.expand(c, 1, -1, -1), bias, groups=c, stride=2, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w is not None and w.dtype != x.dtype:
            w = w.to(x.dtype)
            b = b.to(x.dtype) if b is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.resample_filter is not None else 0

        if self.fused_resample and self.up and w is not None:
            f = self.resample_filter.to(x.dtype)
            c = x.shape[1]
            x = F.conv_transpose2d(x, (f * 4).expand(c, 1, -1, -1), groups=c, stride=2, padding=max(f_pad - w_pad, 0))
            return F.conv2d(x, w, b, padding=max(w_pad - f_pad, 0))
        if self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            return self._downsample(x, b, pad=0)
        if self.up:
            x = self._upsample(x)
        if self.down:
            x = self._downsample(x)
        if w is not None:
            return F.conv2d(x, w, b, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with ``min(num_groups, C // min_channels_per_group)`` groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PositionalEmbedding(nn.Module):
    """Sinusoidal features of a scalar label, returned as ``[sin, cos]`` (EDM swaps the halves).

    Frequencies are ``max_positions ** (-i / (N/2 - endpoint))`` for ``i < N/2``.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++), returned as ``[sin, cos]``; ``freqs`` is a buffer."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class UNetBlock(nn.Module):
    """Pre-activation residual block with additive embedding and optional self-attention.

    ``x -> conv0(silu(norm0(x))) -> silu(norm1(. + affine(emb))) -> dropout -> conv1``,
    plus the (possibly resampled/projected) input, times ``skip_scale``; then,
    with attention, ``x + proj(attn(norm2(x)))`` times ``skip_scale``.
    ``adaptive_scale=True`` replaces the additive embedding by scale and shift.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: dict | None = None, init_zero: dict | None = None,
                 init_attn: dict | None = None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else {"init_weight": 0}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads = self.num_heads
        # qkv channels are (head, channel-in-head, q/k/v): split them into [3, B, heads, HW, C/heads].
        qkv = self.qkv(self.norm2(x)).reshape(b, heads, c // heads, 3, h * w).permute(3, 0, 1, 4, 2)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C/heads)
        a = a.transpose(-1, -2).reshape(b, c, h, w)
        if x.is_contiguous(memory_format=torch.channels_last):
            a = a.contiguous(memory_format=torch.channels_last)
        return self.proj(a)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            x = (x + self._attention(x)) * self.skip_scale
        return x


def _as_list(value: Iterable) -> list:
    """Lists, tuples and omegaconf ``ListConfig``s -> a plain list."""
    return [v for v in value]


class SongUNet(nn.Module):
    """DDPM++ (``embedding_type='positional'``, ``encoder_type='standard'``,
    ``resample_filter=[1,1]``, ``channel_mult_noise=1``) and NCSN++
    (``'fourier'``, ``'residual'``, ``[1,3,3,1]``, ``2``) UNets of EDM, as used by IMM.

    ``forward(x, noise_labels_t, noise_labels_s, class_labels=None, augment_labels=None)``
    takes ``x`` [B, in_channels, H, W] and 1-D noise labels (``[B]`` or ``[1]``)
    and returns [B, out_channels, H, W].

    ``activation_checkpointing`` (off; set by ``imm.model.backbones.set_activation_checkpointing``) recomputes
    each UNet block's activations in the backward pass instead of keeping them.
    """

    activation_checkpointing = False

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1), s_embed: bool = True,
                 img_channels: int | None = None):  # stored by the release, unused: the input is in_channels
        if embedding_type not in ("fourier", "positional"):
            raise InputError(f"embedding_type must be 'fourier' or 'positional', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise InputError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise InputError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        super().__init__()
        channel_mult = [int(m) for m in _as_list(channel_mult)]
        attn_resolutions = {int(r) for r in _as_list(attn_resolutions)}
        resample_filter = [float(v) for v in _as_list(resample_filter)]
        self.img_resolution = int(img_resolution)
        self.label_dropout = float(label_dropout)
        self.s_embed = bool(s_embed)

        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = {"init_mode": "xavier_uniform"}
        init_zero = {"init_mode": "xavier_uniform", "init_weight": 1e-5}
        init_attn = {"init_mode": "xavier_uniform", "init_weight": math.sqrt(0.2)}
        block_kwargs = {
            "emb_channels": emb_channels, "num_heads": 1, "dropout": dropout, "skip_scale": math.sqrt(0.5), "eps": 1e-6,
            "resample_filter": resample_filter, "resample_proj": True, "adaptive_scale": False,
            "init": init, "init_zero": init_zero, "init_attn": init_attn,
        }

        def noise_embedding():
            if embedding_type == "positional":
                return PositionalEmbedding(noise_channels, endpoint=True)
            return FourierEmbedding(noise_channels)

        # Mapping network.
        self.map_noise = noise_embedding()
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        if self.s_embed:
            self.map_noise_s = noise_embedding()
            self.map_layer0_s = Linear(noise_channels, emb_channels, **init)
            self.map_layer1_s = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                elif encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder.  Only the "_block<i>" entries consume a skip connection.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = self.img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

        # Static routing: what each entry of enc/dec does in forward().
        self._enc_roles = [self._role(name) for name in self.enc]
        self._dec_roles = [self._role(name) for name in self.dec]

    @staticmethod
    def _role(name: str) -> str:
        for role in ("aux_down", "aux_skip", "aux_residual", "aux_up", "aux_norm", "aux_conv"):
            if role in name:
                return role
        if "_block" in name:
            return "block"
        return "conv" if name.endswith("_conv") else "unet"

    def _embed_time(self, noise_labels: torch.Tensor, embedding: nn.Module) -> torch.Tensor:
        """Sinusoidal/Fourier features of a 1-D noise label, in float32 (or float64 if given)."""
        labels = noise_labels.reshape(-1)
        if not labels.is_floating_point() or labels.dtype in (torch.float16, torch.bfloat16):
            labels = labels.to(torch.float32)
        return embedding(labels)

    def _mapping(self, noise_labels_t, noise_labels_s, class_labels, augment_labels, batch, device):
        """The conditioning vector ``emb`` [B or 1, emb_channels] fed to every block."""
        dtype = self.map_layer0.weight.dtype
        emb = self._embed_time(noise_labels_t, self.map_noise).to(dtype)
        if self.map_label is not None:
            labels = class_labels
            if labels is None:
                labels = torch.zeros(batch, self.map_label.in_features, device=device, dtype=dtype)
            labels = labels.to(dtype)
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.s_embed:
            emb_s = self._embed_time(noise_labels_s, self.map_noise_s).to(dtype)
            emb = emb + self.map_layer1_s(F.silu(self.map_layer0_s(emb_s)))
        return F.silu(emb)

    def forward(self, x: torch.Tensor, noise_labels_t: torch.Tensor, noise_labels_s: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.s_embed and noise_labels_s is None:
            raise InputError("this SongUNet has s_embed=True and needs noise_labels_s")
        emb = self._mapping(noise_labels_t, noise_labels_s, class_labels, augment_labels, x.shape[0], x.device)

        # Encoder: every main entry's output is kept as a skip connection.
        skips = []
        aux = x
        for role, block in zip(self._enc_roles, self.enc.values()):
            if role == "aux_down":
                aux = block(aux)
            elif role == "aux_skip":
                x = skips[-1] = x + block(aux)
            elif role == "aux_residual":
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            elif role == "conv":
                x = block(x)
                skips.append(x)
            else:
                x = call_block(self, block, x, emb)
                skips.append(x)

        # Decoder: "_block<i>" entries take the matching skip; aux_* build the output image.
        aux = tmp = None
        for role, block in zip(self._dec_roles, self.dec.values()):
            if role == "aux_up":
                aux = block(aux)
            elif role == "aux_norm":
                tmp = block(x)
            elif role == "aux_conv":
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if role == "block":
                    x = torch.cat([x, skips.pop()], dim=1)
                x = call_block(self, block, x, emb)
        return aux
