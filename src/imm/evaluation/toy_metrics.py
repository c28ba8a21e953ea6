"""Sample-quality metrics for the 2-D toy data (pure math): the sliced 2-Wasserstein distance (Bonneel
et al., "Sliced and Radon Wasserstein Barycenters of Measures", JMIV 2015) and the unbiased squared MMD
(Gretton et al., "A Kernel Two-Sample Test", JMLR 2012) with a sum of Gaussian kernels.
"""

from __future__ import annotations

import torch

from imm.core.errors import InputError


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced W2 between samples ``x`` [N, D] and ``y`` [M, D] (any N, M; flattened beyond dim 0).

    For each random unit direction the 1-D W2 between the projections is computed from matched
    quantiles (``min(N, M)`` of them); the result is sqrt of the mean over directions of W2^2.
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise InputError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    dirs = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    n = min(x.shape[0], y.shape[0])
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    px = torch.quantile((x @ dirs), q, dim=0) if x.shape[0] != n else (x @ dirs).sort(dim=0).values
    py = torch.quantile((y @ dirs), q, dim=0) if y.shape[0] != n else (y @ dirs).sort(dim=0).values
    return float(((px - py) ** 2).mean().sqrt())


def _kernel_sum(x: torch.Tensor, y: torch.Tensor, bandwidths, exclude_diagonal: bool, chunk: int = 2048) -> float:
    """Sum over pairs (x_i, y_j) of sum_h exp(-||x_i - y_j||^2 / (2 h^2)), in chunks (float64 sums)."""
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        d2 = torch.cdist(x[i:i + chunk], y).square_()
        if exclude_diagonal:  # x is y: drop the i == j terms
            d2.diagonal(offset=i).fill_(float("inf"))
        for h in bandwidths:
            total += torch.exp(d2 * (-0.5 / h**2)).sum(dtype=torch.float64).item()
    return total


def mmd_self_term(y: torch.Tensor, bandwidths=(0.1, 0.3, 1.0)) -> float:
    """The mean k(y_i, y_j) over i != j: the O(M^2) term of :func:`mmd` that depends on ``y`` alone."""
    y = y.reshape(y.shape[0], -1).to(torch.float32)
    return _kernel_sum(y, y, bandwidths, True) / (y.shape[0] * (y.shape[0] - 1))


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.1, 0.3, 1.0), y_self_term: float | None = None) -> float:
    """Unbiased MMD^2 between samples ``x`` [N, D] and ``y`` [M, D] (flattened beyond dim 0) with the kernel
    k(a, b) = sum_h exp(-||a - b||^2 / (2 h^2)) (Gretton et al. 2012, Eq. 3). Can be slightly negative
    when the two distributions are equal; cost O((N + M)^2 D). ``y_self_term`` (``mmd_self_term(y)``)
    skips recomputing y's own term when many ``x`` are compared with one ``y``."""
    x = x.reshape(x.shape[0], -1).to(torch.float32)
    y = y.reshape(y.shape[0], -1).to(torch.float32)
    if x.shape[1] != y.shape[1]:
        raise InputError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise InputError("mmd needs at least 2 samples on each side")
    k_yy = mmd_self_term(y, bandwidths) if y_self_term is None else y_self_term
    k_xx = _kernel_sum(x, x, bandwidths, True) / (n * (n - 1))
    k_xy = _kernel_sum(x, y, bandwidths, False) / (n * m)
    return k_xx + k_yy - 2 * k_xy


def toy2d_sliced_w2(points: dict, dataset_name: str) -> tuple[dict, torch.Tensor]:
    """Sliced W2 (fixed projections, seed 0) of each ``{key: [N, 2] points}`` against max(N, 2000)
    fixed-seed points of the toy target ``dataset_name`` (``imm.data.datasets.toy2d_sample``, seed 1), and those
    target points."""
    from imm.data.datasets import toy2d_sample

    n = next(iter(points.values())).shape[0]
    target = toy2d_sample(dataset_name, max(n, 2000), torch.Generator().manual_seed(1))
    sw2 = {k: sliced_wasserstein(x, target, generator=torch.Generator().manual_seed(0)) for k, x in points.items()}
    return sw2, target
