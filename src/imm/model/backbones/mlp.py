"""A small MLP backbone for low-dimensional data (toy 2-D point clouds stored as [C, 1, 1] "images").

Time inputs get the same treatment as in the image backbones: sinusoidal features of c_noise(t)
and of the second time input (s or t - s), each through its own two-layer MLP, summed; class
labels (one-hot, all-zero = null) are embedded linearly and added.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _time_features(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    wide = torch.promote_types(x.dtype, torch.float32)  # float32, float64 for a float64 network
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=wide) / half)
    angles = x.to(wide)[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class MLP(nn.Module):
    """Residual MLP G(x, c_noise(t), c_noise(s), labels) on flattened inputs."""

    def __init__(self, img_resolution: int = 1, in_channels: int = 2, out_channels: int | None = None,
                 label_dim: int = 0, hidden: int = 256, depth: int = 3, time_dim: int = 64,
                 img_channels: int | None = None):  # what IMMNetwork passes; the input is in_channels
        super().__init__()
        self.in_features = in_channels * img_resolution * img_resolution
        self.out_shape = (out_channels or in_channels, img_resolution, img_resolution)
        self.time_dim = time_dim
        self.embed_t = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.embed_s = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.embed_label = nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        self.inp = nn.Linear(self.in_features, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, math.prod(self.out_shape)))

    def forward(self, x, noise_labels_t, noise_labels_s, class_labels=None):
        batch = x.shape[0]
        dtype = self.inp.weight.dtype  # the time features in float32, then in the layers' precision
        emb = self.embed_t(_time_features(noise_labels_t.expand(batch), self.time_dim).to(dtype))
        emb = emb + self.embed_s(_time_features(noise_labels_s.expand(batch), self.time_dim).to(dtype))
        if self.embed_label is not None and class_labels is not None:
            emb = emb + self.embed_label(class_labels.to(emb.dtype))
        h = self.inp(x.reshape(batch, -1)) + emb
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h).reshape(batch, *self.out_shape)
