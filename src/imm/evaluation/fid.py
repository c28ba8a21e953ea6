"""FID, Inception Score and precision/recall from Inception features (math; I/O only for .npz statistics).

The FID follows pytorch-fid (github.com/mseitzer/pytorch-fid) and EDM's ``fid.py`` (github.com/NVlabs/edm)
so that its numbers compare with published ones: the mean and the unbiased covariance
(``np.cov(rowvar=False)``) in float64, and ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` with
scipy's ``linalg.sqrtm`` (tiny imaginary parts dropped; a singular product is retried on
``(S1 + eps I)(S2 + eps I)``). Reference statistics are ``.npz`` files with ``mu`` and ``sigma``: EDM's
``fid-refs/*.npz`` or the ``VIRTUAL_*.npz`` of ADM's evaluation suite (Dhariwal & Nichol, "Diffusion
Models Beat GANs on Image Synthesis", NeurIPS 2021), whose images in ``arr_0`` are never read.
The Inception Score is that of Salimans et al. ("Improved Techniques for Training GANs", NeurIPS 2016),
from the 1008-way logits; precision and recall those of Kynkäänniemi et al. ("Improved Precision and
Recall Metric for Assessing Generative Models", NeurIPS 2019), from k-NN manifolds.

Typical use::

    from imm.evaluation.inception import load_inception
    from imm.evaluation import fid
    net = load_inception(device="cuda")
    mu, sigma = fid.feature_statistics(net.features(samples_uint8, progress=True))
    mu_ref, sigma_ref = fid.load_statistics("cifar10-32x32.npz")
    score = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)

Needs scipy (``pip install scipy``) for :func:`frechet_distance`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from imm.core.errors import InputError, MissingError, MissingPackageError
from imm.io.arrays import NpzFile, write_npz

__all__ = [
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "load_statistics",
    "precision_recall",
    "save_statistics",
]


def _as_float64_matrix(x, name: str) -> np.ndarray:
    """A real 2-D [N, D] array of floating dtype, as float64 (no copy when already float64)."""
    return _as_float_matrix(x, name).astype(np.float64, copy=False)


def _as_float_matrix(x, name: str) -> np.ndarray:
    """A real 2-D [N, D] numpy array of floating dtype (torch tensors are converted, dtype kept)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype.kind != "f":
        hint = " (images? compute features with imm.evaluation.inception first)" if x.dtype.kind in "ui" else ""
        raise InputError(f"{name} must be a floating-point array, got dtype {x.dtype}{hint}")
    if x.ndim != 2:
        raise InputError(f"{name} must be 2-D [N samples, D features], got shape {x.shape}")
    return x


def feature_statistics(feats, chunk_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])`` of features ``[N, D]`` (numpy or torch, float), in float64.

    ``sigma`` is the unbiased covariance (divides by N - 1), as EDM and pytorch-fid compute it; computed
    in two passes over chunks of ``chunk_size`` rows (no float64 copy of all features).
    Raises ``ValueError`` for N < 2, non-2-D input, non-float dtypes or non-finite values; warns when
    N < D (the covariance is then singular and the FID biased, but it is still computed).
    """
    feats = _as_float_matrix(feats, "features")
    n, d = feats.shape
    if n < 2:
        raise InputError(f"need at least 2 samples for a covariance, got {n}")
    if n < d:
        warnings.warn(f"only {n} samples for {d}-d features: the covariance is singular and the FID estimate "
                      f"strongly biased (use >= {d}, typically 50000)", stacklevel=2)
    total = np.zeros(d, np.float64)
    for i in range(0, n, chunk_size):
        block = feats[i:i + chunk_size].astype(np.float64)
        if not np.isfinite(block).all():
            raise InputError("features contain NaN or infinity")
        total += block.sum(axis=0)
    mu = total / n
    sigma = np.zeros((d, d), np.float64)
    for i in range(0, n, chunk_size):
        block = feats[i:i + chunk_size].astype(np.float64) - mu
        sigma += block.T @ block
    sigma /= n - 1
    return mu, sigma


def check_statistics(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu.detach().cpu() if isinstance(mu, torch.Tensor) else mu))
    sigma = np.atleast_2d(np.asarray(sigma.detach().cpu() if isinstance(sigma, torch.Tensor) else sigma))
    for value, what in ((mu, "mu"), (sigma, "sigma")):
        if value.dtype.kind not in "fiu":
            raise InputError(f"{what}{name} must be real numbers, got dtype {value.dtype}")
    if mu.ndim != 1:
        raise InputError(f"mu{name} must be 1-D [D], got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise InputError(f"sigma{name} must be [D, D] = {(mu.shape[0],) * 2} to match mu{name}, got {sigma.shape}")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputError(f"mu{name} / sigma{name} contain NaN or infinity")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID for Inception statistics).

    ``d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2))`` in float64, with
    ``scipy.linalg.sqrtm``. If that square root is not finite (singular product), it is recomputed on
    ``(sigma1 + eps I) @ (sigma2 + eps I)`` (pytorch-fid's fallback, with a warning). An imaginary part
    on the diagonal above 1e-3 raises ``ValueError``; smaller ones (round-off) are discarded.
    """
    try:
        from scipy import linalg
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingPackageError("frechet_distance needs scipy: pip install scipy") from e
    mu1, sigma1 = check_statistics(mu1, sigma1, "1")
    mu2, sigma2 = check_statistics(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise InputError(f"statistics of different dimension: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"sigma1 @ sigma2 is singular, its square root not finite; adding {eps} to the diagonals",
                      stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise InputError(f"matrix square root with a large imaginary component: {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(feats1, feats2) -> float:
    """FID between two feature sets ``[N, D]`` (each through :func:`feature_statistics`)."""
    return frechet_distance(*feature_statistics(feats1), *feature_statistics(feats2))


def frechet_distance_to_features(feats, mu_ref, sigma_ref, mu=None, sigma=None) -> float:
    """FID between features ``feats`` [N, D] (statistics ``mu``, ``sigma``, computed when not given) and
    reference statistics. With fewer samples than dimensions (``feats`` [N, D], N < D, whose statistics are ``mu``,
    ``sigma``) ``sigma = A^T A`` has rank < N with ``A = (feats - mu) / sqrt(N - 1)``, and
    ``tr sqrtm(sigma @ sigma_ref)`` (the sum of the square roots of its eigenvalues, which are real and
    >= 0) equals the sum of the square roots of the eigenvalues of the small symmetric PSD matrix
    ``A @ sigma_ref @ A^T`` [N, N]: exact, and much faster and more accurate than scipy's ``sqrtm`` of a
    singular 2048 x 2048 product (which warns, and takes ~10 s on one core). Otherwise
    :func:`frechet_distance` (scipy ``sqrtm``, as EDM / pytorch-fid)."""
    if mu is None or sigma is None:
        mu, sigma = feature_statistics(feats)
    if feats.shape[0] >= feats.shape[1]:
        return frechet_distance(mu, sigma, mu_ref, sigma_ref)
    mu_ref, sigma_ref = check_statistics(mu_ref, sigma_ref, "_ref")
    if mu_ref.shape != mu.shape:
        raise InputError(f"statistics of different dimension: {mu.shape[0]} vs {mu_ref.shape[0]}")
    a = (feats.astype(np.float64) - mu) / np.sqrt(feats.shape[0] - 1)
    small = a @ sigma_ref @ a.T
    eig = np.linalg.eigvalsh((small + small.T) / 2)
    # Eigenvalues under numpy.linalg.matrix_rank's round-off bound are zeros (their square roots, ~1e-9,
    # would not cancel when the two sets are the same).
    eig[eig <= max(eig.max(), 0.0) * small.shape[0] * np.finfo(np.float64).eps] = 0.0
    tr_covmean = float(np.sqrt(eig).sum())
    diff = mu - mu_ref
    return float(diff @ diff + np.trace(sigma) + np.trace(sigma_ref) - 2 * tr_covmean)


def load_statistics(path, keys: tuple[str, str] = ("mu", "sigma"), missing_hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` float64 from an ``.npz`` under ``keys`` (``mu`` and ``sigma``: EDM ``fid-refs``, ADM
    ``VIRTUAL_*.npz``, :func:`save_statistics`); other entries (ADM's images ``arr_0``) are not read.
    ``missing_hint`` ends the message when the keys are missing.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for anything else that is not
    such a file (not an npz, pickled objects, missing keys, wrong shapes or dtypes), read within the
    bounds of :class:`imm.io.arrays.NpzFile`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingError(
            f"reference statistics not found: {path} (make them with `imm eval ref --data DATA --out {path}`, use "
            "EDM's or ADM's reference files, e.g. https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz, "
            "or --ref mnist for the bundled MNIST digits)")
    with NpzFile(path, "statistics .npz") as f:
        missing = [k for k in keys if k not in f.keys]
        if missing:
            hint = " (it holds images in 'arr_0': compute their statistics first)" if "arr_0" in f.keys else ""
            raise InputError(f"{path} has no {' / '.join(repr(k) for k in missing)} entry; "
                             f"keys are {f.keys}{hint}{missing_hint}")
        (mu_shape, _), (sigma_shape, _) = f.header(keys[0]), f.header(keys[1])
        if len(mu_shape) != 1 or sigma_shape != mu_shape * 2:  # before reading: sigma is [D, D] for mu's D
            raise InputError(f"{path}: malformed statistics: {keys[0]} has shape {mu_shape} and {keys[1]} "
                             f"{sigma_shape}; expected [D] and [D, D]")
        mu, sigma = f.read(keys[0]), f.read(keys[1])
    try:
        return check_statistics(mu, sigma, "")
    except ValueError as e:
        raise InputError(f"{path}: malformed statistics: {e}") from None


def save_statistics(path, mu=None, sigma=None, **extra) -> Path:
    """Write ``mu``, ``sigma`` (float64, checked; may be left out when ``extra`` holds other statistics)
    and any ``extra`` arrays to ``path`` as an uncompressed ``.npz`` (exactly that path, atomically).
    Readable by :func:`load_statistics` and EDM's ``fid.py``."""
    arrays = {k: np.asarray(v) for k, v in extra.items()}
    if mu is not None or sigma is not None:
        for key in ("mu", "sigma"):
            if key in extra:
                raise InputError(f"{key!r} given twice")
        arrays["mu"], arrays["sigma"] = check_statistics(mu, sigma, "")
    path = Path(path).expanduser()
    write_npz(path, arrays)
    return path


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``(mean, std)`` over ``splits`` equal parts from 1008-way logits ``[N, C]``.

    Per part: ``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y|x) = softmax(logits)`` and ``p(y)`` the
    part's mean (Salimans et al. 2016; NVlabs' split rule ``part i = [i N // splits, (i+1) N // splits)``).
    Use the bias-free logits (``InceptionV3.logits``) to match the original implementation.
    """
    logits = _as_float64_matrix(logits, "logits")
    n = logits.shape[0]
    if not isinstance(splits, (int, np.integer)) or splits < 1:
        raise InputError(f"splits must be a positive integer, got {splits!r}")
    if n < splits:
        raise InputError(f"need at least one sample per split: {n} samples, {splits} splits")
    if not np.isfinite(logits).all():
        raise InputError("logits contain NaN or infinity")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        p = np.exp(part)
        log_py = np.log(p.mean(axis=0, keepdims=True))
        kl = (p * (part - log_py)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    radii = []
    for i in range(0, x.shape[0], batch_size):
        d = torch.cdist(x[i:i + batch_size], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the point itself is at distance 0
    return torch.cat(radii)


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, probes: torch.Tensor, batch_size: int) -> float:
    """Fraction of probes inside some ball B(manifold_j, radii_j)."""
    inside = []
    for i in range(0, probes.shape[0], batch_size):
        d = torch.cdist(probes[i:i + batch_size], manifold)
        inside.append((d <= radii[None]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real_feats, fake_feats, k: int = 3, batch_size: int = 4096) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds, in float64.

    precision = fraction of fake samples within the k-th-nearest-neighbour radius of some real sample;
    recall = fraction of real samples within that radius of some fake sample (Euclidean distances).
    """
    real = _as_float64_matrix(real_feats, "real_feats")
    fake = _as_float64_matrix(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise InputError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    for x, name in ((real, "real_feats"), (fake, "fake_feats")):
        if x.shape[0] < k + 1:
            raise InputError(f"{name}: need more than k = {k} samples, got {x.shape[0]}")
        if not np.isfinite(x).all():
            raise InputError(f"{name} contain NaN or infinity")
    real_t, fake_t = torch.from_numpy(real), torch.from_numpy(fake)
    precision = _coverage(real_t, _kth_neighbour_radii(real_t, k, batch_size), fake_t, batch_size)
    recall = _coverage(fake_t, _kth_neighbour_radii(fake_t, k, batch_size), real_t, batch_size)
    return precision, recall
