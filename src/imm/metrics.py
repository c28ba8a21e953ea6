"""Sample-quality metrics (pure math).

* :func:`sliced_wasserstein`: the sliced 2-Wasserstein distance between two point sets, for toy data.
"""

from __future__ import annotations

import torch


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced W2 between samples ``x`` [N, D] and ``y`` [M, D] (any N, M; flattened beyond dim 0).

    For each random unit direction the 1-D W2 between the projections is computed from matched
    quantiles (``min(N, M)`` of them); the result is sqrt of the mean over directions of W2^2.
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    dirs = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    n = min(x.shape[0], y.shape[0])
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    px = torch.quantile((x @ dirs), q, dim=0) if x.shape[0] != n else (x @ dirs).sort(dim=0).values
    py = torch.quantile((y @ dirs), q, dim=0) if y.shape[0] != n else (y @ dirs).sort(dim=0).values
    return float(((px - py) ** 2).mean().sqrt())
