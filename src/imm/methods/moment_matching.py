# Copyright 2025 The imm authors.
# SPDX-License-Identifier: Apache-2.0
"""The Inductive Moment Matching training loss (paper Sec. 3-4, Alg. 1/3, App. C). Pure math, no I/O.

One optimizer step (Algorithm 3) on a batch of B = G * M samples split into G groups of M particles:

1. per group, t ~ U(eps, T), s ~ U(eps, t) and r = r(s, t) (App. C.6-C.7);
2. eps ~ N(0, sigma_d^2 I), x_t = alpha_t x + sigma_t eps and x_r = DDIM(x_t, x, r, t) (Eq. 11), which
   with the same eps and x is alpha_r x + sigma_r eps (App. C.2);
3. y_t = f^theta_{s,t}(x_t) with gradient, y_r = f^{theta^-}_{s,r}(x_r) without, where theta^- is the
   stop-gradient of the *current* weights (the "previous iterate" of Eq. 8, not an EMA);
4. per group the V-statistic MMD^2 between {y_t} and {y_r} (Eq. 67, diagonal included) with the
   time-dependent Laplace kernel (App. C.8), weighted by w(s, t) (Eq. 13, App. C.9);
5. the loss is the mean over the groups whose loss is finite.

``IMMLoss`` is a loss object called once per step, like the loss classes of EDM2 (Karras et al., CVPR
2024); its pieces are module-level functions, which the tests and the baselines (``imm.methods.flow_matching``, ``imm.methods.consistency``) use alone.
Where the paper leaves a detail open (the target pass's precision, dropout masks and labels, the kernel
clamp, log-normal times), the choice is an option of ``IMMLoss``; docs/sources.md lists them.
"""

from __future__ import annotations

import math

import torch

from imm.core.errors import InputError
from imm.model import schedules
from imm.model.network import c_skip_c_out

TIME_SAMPLINGS = ("uniform", "lognormal", "lognormal_authors")
MAPPINGS = ("eta_decrement", "time_decrement", "logsnr_decrement", "inverse_eta_increment")
KERNELS = ("laplace", "rbf", "energy", "pseudo_huber")

# Time range (eps_t, T) that sets the default step of each ablated mapping as range / 2^k (App. C.6, I.6):
# decrement in t with T = 1, eps = 0; in log-SNR with eps = 0.001, T = 0.994 (lambda is infinite at 0 and
# 1); increment in 1/eta with eps = 0.005, T = 1 (1/eta is infinite at 0). The eta decrement uses the
# training range (net.eps, net.T) itself, where the paper rounds it to eta_max = 160, eta_min = 0.
_MAPPING_RANGES = {"time_decrement": (0.0, 1.0), "logsnr_decrement": (0.001, 0.994),
                   "inverse_eta_increment": (0.005, 1.0)}


def _check(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


# ----------------------------------------------------------------------------------------------------
# Times


def _truncated_lognormal(u: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, p_mean: float, p_std: float):
    """exp(N(p_mean, p_std^2)) conditioned on [lo, hi], by the inverse CDF of u ~ U(0, 1). Float64."""
    lo_cdf = torch.special.ndtr((torch.log(lo) - p_mean) / p_std)  # log(0) = -inf -> cdf 0
    hi_cdf = torch.special.ndtr((torch.log(hi) - p_mean) / p_std)
    q = (lo_cdf + u * (hi_cdf - lo_cdf)).clamp(1e-300, 1 - 1e-16)
    return torch.exp(p_mean + p_std * torch.special.ndtri(q)).clamp(lo, hi)


def sample_times(
    n: int,
    T: float,
    eps: float,
    schedule: str = "fm",
    mode: str = "uniform",
    P_mean: float = -1.1,
    P_std: float = 2.0,
    generator: torch.Generator | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample n pairs (t, s) with eps <= s <= t <= T (Alg. 3 line 2; App. C.7).

    * ``uniform`` (the paper, Table 5): t ~ U(eps, T), then s ~ U(eps, t).
    * ``lognormal`` (not in the paper, which trains with uniform times): the log-normal law of EDM's
      training noise levels (Karras et al., NeurIPS 2022, Sec. 5: ln sigma ~ N(P_mean, P_std^2))
      applied to eta: eta_t ~ LogNormal(P_mean, P_std) restricted to [eta(eps), eta(T)], then eta_s
      from the same law restricted to [eta(eps), eta_t]; both mapped back with eta^-1. The restriction
      is an exact truncation (inverse CDF); ``eta_s = min(eta_s, eta_t).clamp(min=eta(eps))`` then
      keeps rounding from putting s above t or below eps.
    * ``lognormal_authors`` (not in the paper): ``lognormal`` with the first draw's lower bound
      max(eta(eps), 1e-8) applied to log eta instead of eta, so eta_t >= exp(max(eta(eps), 1e-8)) >= 1,
      i.e. t >= 1/2 on the OT-FM path; the second draw's lower bound is eta = 1e-8, so s still covers
      [eps, t] (after the same clamp). docs/benchmarks.md measures its effect: better 1-step, worse
      4-step quality than uniform times.

    Drawn in float64 and returned in ``dtype``; the draws are two ``rand(n)`` calls on ``generator``.
    """
    _check("time_sampling", mode, TIME_SAMPLINGS)
    if not 0 <= eps < T <= 1:
        raise InputError(f"need 0 <= eps < T <= 1, got eps={eps}, T={T}")
    u_t = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    u_s = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    if mode == "uniform":
        t = eps + (T - eps) * u_t
        s = torch.minimum(eps + (t - eps) * u_s, t)
    else:
        bounds = torch.tensor([eps, T], dtype=torch.float64, device=u_t.device)
        eta_lo, eta_hi = schedules.eta(bounds, schedule).unbind()
        t_lo, s_lo = eta_lo, eta_lo
        if mode == "lognormal_authors":
            t_lo, s_lo = torch.exp(eta_lo.clamp(min=1e-8)), torch.full_like(eta_lo, 1e-8)
        nt = _truncated_lognormal(u_t, t_lo, eta_hi, P_mean, P_std)
        ns = _truncated_lognormal(u_s, s_lo.expand_as(nt), nt, P_mean, P_std)
        ns = torch.minimum(ns, nt).clamp(min=eta_lo)
        t = schedules.eta_to_t(nt, schedule).clamp(eps, T)
        s = torch.minimum(schedules.eta_to_t(ns, schedule).clamp(min=eps), t)
    return t.to(dtype), s.to(dtype)


def mapping_step(mapping: str, schedule: str, T: float, eps: float, k: int) -> float:
    """Default step of a mapping, (upper - lower) / 2^k in the mapping's own variable (App. C.6).

    ``eta_decrement``: (eta(T) - eta(eps)) / 2^k over the network's own range (the paper rounds the
    range to eta_max = 160, eta_min = 0).
    The ablated alternatives use the ranges of App. I.6 (``_MAPPING_RANGES``) whatever the training range.
    """
    _check("mapping", mapping, MAPPINGS)
    lo, hi = (eps, T) if mapping == "eta_decrement" else _MAPPING_RANGES[mapping]
    ends = torch.tensor([lo, hi], dtype=torch.float64)
    if mapping in ("eta_decrement", "time_decrement"):
        vals = schedules.eta(ends, schedule) if mapping == "eta_decrement" else ends
    elif mapping == "logsnr_decrement":
        vals = schedules.logsnr(ends, schedule)
    else:
        vals = 1 / schedules.eta(ends, schedule)
    return abs(float(vals[1] - vals[0])) / 2**k


def map_r(
    s: torch.Tensor,
    t: torch.Tensor,
    schedule: str = "fm",
    T: float = 0.994,
    eps: float = 0.0,
    k: int = 12,
    mapping: str = "eta_decrement",
    min_gap: float | None = None,
    step: float | None = None,
) -> torch.Tensor:
    """The mapping r(s, t) with s <= r <= t (App. B.3, C.6, I.6), computed in float64.

    * ``eta_decrement`` (default): r = eta^-1(clamp(eta_t - step, eta(eps), eta(T))),
      step = (eta(T) - eta(eps)) / 2^k;
    * ``time_decrement``: r = t - step, step = 1 / 2^k;
    * ``logsnr_decrement``: lambda_r = lambda_t + step, step = (lambda(0.001) - lambda(0.994)) / 2^k;
    * ``inverse_eta_increment``: 1/eta_r = 1/eta_t + step, step = (1/eta(0.005) - 1/eta(1)) / 2^k.

    ``step`` overrides the default (``step=0`` gives r = t). Then, with ``min_gap`` Delta,
    r = min(r, t - Delta) (the FP16 variant of App. I.6); last r = max(r, s).clamp(min=eps), so r >= s
    holds even where the gap would cross s. Returned in t's dtype; rounding keeps s <= r <= t.
    """
    _check("mapping", mapping, MAPPINGS)
    if step is None:
        step = mapping_step(mapping, schedule, T, eps, k)
    s64, t64 = s.to(torch.float64), t.to(torch.float64)
    if mapping == "eta_decrement":
        bounds = torch.tensor([eps, T], dtype=torch.float64, device=t64.device)
        eta_lo, eta_hi = schedules.eta(bounds, schedule).unbind()
        nr = (schedules.eta(t64, schedule) - step).clamp(eta_lo, eta_hi)
        r = schedules.eta_to_t(nr, schedule)
    elif mapping == "time_decrement":
        r = t64 - step
    elif mapping == "logsnr_decrement":
        lam_r = schedules.logsnr(t64, schedule) + step
        r = schedules.eta_to_t(torch.exp(-0.5 * lam_r), schedule)
    else:
        r = schedules.eta_to_t(1 / (1 / schedules.eta(t64, schedule) + step), schedule)
    if min_gap is not None:
        r = torch.minimum(r, t64 - min_gap)
    r = torch.minimum(torch.maximum(r, s64).clamp(min=eps), t64)
    return r.to(t.dtype)


# ----------------------------------------------------------------------------------------------------
# Weights


def weighting(t: torch.Tensor, schedule: str = "fm", a: float = 1.0, b: float = 4.0) -> torch.Tensor:
    """w(s, t) = 1/2 sigmoid(b - lambda_t) (-dlambda_t/dt) alpha_t^a / (alpha_t^2 + sigma_t^2), Eq. 13.

    The VDM sigmoid-ELBO weight times alpha_t^a (v- to eps-error, a = 2 emphasises small t) times the
    1/(alpha^2 + sigma^2) factor that favours middle t (App. C.9). Depends on t only; computed in float64
    and returned in t's dtype. At t = 0 it is 0 * inf = NaN (the loss then drops that group).
    """
    t64 = t.to(torch.float64)
    alpha, sigma = schedules.alpha_sigma(t64, schedule)
    w = 0.5 * torch.sigmoid(b - schedules.logsnr(t64, schedule)) * (-schedules.dlogsnr_dt(t64, schedule))
    w = w * alpha**a / (alpha**2 + sigma**2)
    return w.to(t.dtype)


_MAX_KERNEL_WEIGHT = 1e20  # 1/|c_out| at s = t is inf; a finite cap keeps gradients at 0 instead of NaN


def kernel_weight_from_c_out(c_out: torch.Tensor) -> torch.Tensor:
    """w~ = 1/|c_out(s, t)|, capped at 1e20 so that s = t (c_out = 0) gives a finite weight."""
    return 1 / c_out.abs().clamp(min=1 / _MAX_KERNEL_WEIGHT)


def kernel_weight(s: torch.Tensor, t: torch.Tensor, f_type: str = "euler_fm", schedule: str = "fm",
                  sigma_data: float = 0.5) -> torch.Tensor:
    """Kernel weight w~(s, t) = 1/|c_out(s, t)| of App. C.8.

    euler_fm: 1/((t - s) sigma_d); simple_edm: sqrt(alpha_t^2 + sigma_t^2)/(sigma_d |alpha_s sigma_t -
    alpha_t sigma_s|); identity: sigma_t/|alpha_s sigma_t - sigma_s alpha_t|. Since y = c_skip x_t +
    c_out G, w~ ||y - y'|| is the distance of the backbone outputs G, which makes the kernel t-invariant.
    """
    return kernel_weight_from_c_out(c_skip_c_out(s, t, f_type, schedule, sigma_data)[1])


# ----------------------------------------------------------------------------------------------------
# Kernels and the MMD


def _pairwise_sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_j - b_k||^2 for a, b [G, M, D] -> [G, M, M], from explicit differences.

    Not the ||a||^2 + ||b||^2 - 2ab expansion (cdist's mm path), which loses the small distances
    between y_t and y_r that the loss is made of.
    """
    return (a.unsqueeze(2) - b.unsqueeze(1)).square().sum(-1)


def kernel_matrix(
    sqdist: torch.Tensor,
    kernel: str,
    weight: torch.Tensor | None,
    dim: int,
    kernel_eps: float = 1e-8,
    clamp_squared: bool = False,
    huber_c: float = 0.00054,
) -> torch.Tensor:
    """k(x, y) from squared distances [G, M, M] and the per-group kernel weight w~ [G] (App. C.8).

    * ``laplace``: exp(-w~ max(||x - y||, kernel_eps) / D) (App. C.8); with ``clamp_squared`` the clamp is
      max(||x - y||^2, kernel_eps) before the root instead, a floor of sqrt(kernel_eps) on the distance
      (an option; both keep the gradient at x = y finite).
    * ``rbf``: exp(-(w~ ||x - y||)^2 / D). Our scaling: the same t-invariant distance w~ ||x - y|| (the
      distance of the backbone outputs G) as the Laplace kernel, squared, over D, i.e. a Gaussian whose
      bandwidth is one unit of G per dimension (G is unit-variance by construction).
    * ``energy``: -||x - y||^2 / 2 (Lemma 1). No w~ and no D: with M = 1 a group's MMD^2 is then exactly
      ||y_t - y_r||^2, the consistency-model loss.
    * ``pseudo_huber``: (c - sqrt(||x - y||^2 + c^2)) / 2 with c = huber_c sqrt(D) (Lemma 2; iCT's
      c = 0.00054 sqrt(D)), on y itself like iCT: with M = 1 the MMD^2 is the iCT loss
      sqrt(||y_t - y_r||^2 + c^2) - c.
    """
    if kernel == "laplace":
        floor = kernel_eps if clamp_squared else kernel_eps**2  # sqrt(clamp(d^2, eps^2)) = max(d, eps)
        return torch.exp(-weight.view(-1, 1, 1) * sqdist.clamp(min=floor).sqrt() / dim)
    if kernel == "rbf":
        return torch.exp(-weight.view(-1, 1, 1).square() * sqdist / dim)
    if kernel == "energy":
        return -0.5 * sqdist
    if kernel == "pseudo_huber":
        c = huber_c * math.sqrt(dim)
        return 0.5 * (c - (sqdist + c * c).sqrt())
    raise InputError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")


def group_mmd(
    y_t: torch.Tensor,
    y_r: torch.Tensor,
    weight: torch.Tensor | None,
    kernel: str = "laplace",
    kernel_weight: torch.Tensor | None = None,
    kernel_eps: float = 1e-8,
    clamp_squared: bool = False,
    huber_c: float = 0.00054,
    return_terms: bool = False,
):
    """Per-group weighted MMD^2, w(s,t) [mean K_tt + mean K_rr - 2 mean K_tr] (Eq. 12, 67).

    ``y_t``, ``y_r``: [G, M, ...] (each particle flattened to D = numel); ``weight`` w(s, t) [G] or
    None (1); ``kernel_weight`` w~ [G] (needed by laplace and rbf). The V-statistic keeps the j = k
    terms. Three M x M matrices per group: O(B M D) work, batched over groups. K_rr carries no gradient
    when y_r has none; it is kept so that identical y_t and y_r give exactly 0. Computed in float32 (or
    float64 if given). Returns the loss per group [G], and with ``return_terms`` also a dict of
    detached per-group terms: ``mmd2`` (unweighted), ``k_tt``, ``k_rr``, ``k_tr`` (matrix means).
    """
    _check("kernel", kernel, KERNELS)
    if y_t.shape != y_r.shape or y_t.ndim < 2:
        raise InputError(f"y_t and y_r must share a shape [G, M, ...]; got {tuple(y_t.shape)}, {tuple(y_r.shape)}")
    if kernel in ("laplace", "rbf") and kernel_weight is None:
        raise InputError(f"the {kernel} kernel needs kernel_weight (1/|c_out(s,t)|)")
    dtype = torch.promote_types(torch.promote_types(y_t.dtype, y_r.dtype), torch.float32)
    g, m = y_t.shape[:2]
    a = y_t.reshape(g, m, -1).to(dtype)
    b = y_r.reshape(g, m, -1).to(dtype)
    dim = a.shape[-1]
    kw = None if kernel_weight is None else kernel_weight.reshape(g).to(dtype)
    opts = {"kernel": kernel, "weight": kw, "dim": dim, "kernel_eps": kernel_eps,
            "clamp_squared": clamp_squared, "huber_c": huber_c}
    k_tt = kernel_matrix(_pairwise_sqdist(a, a), **opts).mean((1, 2))
    k_rr = kernel_matrix(_pairwise_sqdist(b, b), **opts).mean((1, 2))
    k_tr = kernel_matrix(_pairwise_sqdist(a, b), **opts).mean((1, 2))
    mmd2 = k_tt + k_rr - 2 * k_tr
    loss = mmd2 if weight is None else weight.reshape(g).to(dtype) * mmd2
    if not return_terms:
        return loss
    terms = {"mmd2": mmd2.detach(), "k_tt": k_tt.detach(), "k_rr": k_rr.detach(), "k_tr": k_tr.detach()}
    return loss, terms


def finite_mean(group_loss: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``weight * group_loss`` over the groups where it is finite (0 if none), and the number of
    non-finite groups (a tensor: no host sync).

    Both factors are zeroed in the dropped groups *before* they are multiplied, so no 0 * NaN reaches
    the gradient (e.g. w(t = 0) = NaN in Eq. 13 would otherwise poison the MMD's gradient).
    """
    full = group_loss if weight is None else weight * group_loss
    finite = torch.isfinite(full.detach())
    zero = torch.zeros_like(full)
    total = torch.where(finite, group_loss, zero)
    if weight is not None:
        total = torch.where(finite, weight, zero) * total
    n_finite = finite.sum()
    return total.sum() / n_finite.clamp(min=1).to(total.dtype), (~finite).sum()


# ----------------------------------------------------------------------------------------------------
# The loss


def _unwrap(net):
    """The IMMNetwork under DDP (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    while not hasattr(net, "c_skip_c_out"):
        inner = getattr(net, "module", None)
        inner = getattr(net, "_orig_mod", None) if inner is None else inner
        if inner is None:
            raise TypeError(f"{type(net).__name__} has no c_skip_c_out; pass an IMMNetwork (or a wrapper of one)")
        net = inner
    return net


def dropped_labels(meta, labels, batch: int, device, label_dropout: float, generator):
    """``(one-hot labels, the same with each row dropped to the all-zero null label with probability
    label_dropout, keep mask [B] bool)`` for classifier-free guidance training; the mask is None without
    dropout, and all three are None without labels (or for an unconditional network)."""
    if labels is None or not getattr(meta, "label_dim", 0):
        return None, None, None
    onehot = meta.one_hot(labels, batch, device)
    if label_dropout <= 0:
        return onehot, onehot, None
    keep = torch.rand(batch, generator=generator, device=device) >= label_dropout
    return onehot, onehot * keep.unsqueeze(1).to(onehot.dtype), keep


class _SharedRNG:
    """Save the CPU (and the device's CUDA) RNG state once; ``restore()`` rewinds to it (shared dropout)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.index = device.index if device.index is not None else (torch.cuda.current_device() if self.cuda else None)
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(self.index) if self.cuda else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.index)


class IMMLoss:
    """Inductive Moment Matching loss, Eq. 8 estimated as in Algorithm 3 with Eq. 67.

    Call ``loss, stats = IMMLoss(...)(net, images, labels)``: ``loss`` is a scalar with gradient (mean of
    the finite group losses), ``stats`` a dict of detached tensors (no host sync):
    ``loss`` [G] per-group loss, ``mmd2`` [G] unweighted MMD^2, ``t``, ``s``, ``r``, ``weight`` w(s,t),
    ``kernel_weight`` w~(s,t), ``k_tt``, ``k_rr``, ``k_tr`` [G] kernel-matrix means, ``nonfinite``
    (number of dropped groups, int64 scalar), ``label_dropped`` (fraction of labels dropped).

    Options (paper defaults; CIFAR-10 uses k=15, b=5):
      group_size M=4; time_sampling of ``TIME_SAMPLINGS`` ('uniform', Table 5; the log-normal ones
      with P_mean, P_std in eta, see ``sample_times``);
      mapping r(s,t) of ``MAPPINGS`` with k=12, optional ``mapping_step`` and ``min_gap`` Delta;
      gap annealing (ours, not in the paper): with ``k_start`` the mapping's k moves linearly from
      k_start to k over the first ``k_anneal_steps`` steps (default: the whole run), so the gap
      range/2^k shrinks geometrically from coarse (fast propagation of the data signal to long jumps)
      to the final fine gap; the trainer calls ``set_progress(step, total_steps)`` before each step;
      kernel of ``KERNELS`` ('laplace'), kernel_eps=1e-8, clamp_squared=False, huber_c;
      weighting exponents a=1, b=4;
      target_fp32 (on by default): the no-grad pass runs with ``force_fp32=True``, the argument of
      ``IMMPrecond.forward`` in the official release (github.com/lumalabs/imm) that turns mixed precision
      off; share_dropout (on by default): both passes draw the same dropout masks; the paper states neither;
      label_dropout p (0 unless ImageNet, 0.1) with same_dropped_labels=True (Alg. 3: both passes see
      the dropped labels) or False (the target pass sees the undropped labels).
    """

    def __init__(
        self,
        group_size: int = 4,
        time_sampling: str = "uniform",
        P_mean: float = -1.1,
        P_std: float = 2.0,
        mapping: str = "eta_decrement",
        k: int = 12,
        mapping_step: float | None = None,
        min_gap: float | None = None,
        k_start: float | None = None,
        k_anneal_steps: int | None = None,
        kernel: str = "laplace",
        kernel_eps: float = 1e-8,
        clamp_squared: bool = False,
        huber_c: float = 0.00054,
        a: float = 1.0,
        b: float = 4.0,
        target_fp32: bool = True,
        share_dropout: bool = True,
        label_dropout: float = 0.0,
        same_dropped_labels: bool = True,
    ):
        if int(group_size) != group_size or group_size < 1:
            raise InputError(f"group_size must be a positive integer, got {group_size!r}")
        if not 0 <= label_dropout <= 1:
            raise InputError(f"label_dropout must lie in [0, 1], got {label_dropout}")
        if min_gap is not None and min_gap < 0:
            raise InputError(f"min_gap must be >= 0, got {min_gap}")
        self.group_size = int(group_size)
        self.time_sampling = _check("time_sampling", time_sampling, TIME_SAMPLINGS)
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.mapping = _check("mapping", mapping, MAPPINGS)
        if k_start is not None and mapping_step is not None:
            raise InputError("k_start anneals k and so the mapping's default step; it cannot be used with mapping_step")
        if k_anneal_steps is not None and k_anneal_steps < 1:
            raise InputError(f"k_anneal_steps must be a positive number of steps, got {k_anneal_steps}")
        self.k_end = float(k)
        self.k_start = None if k_start is None else float(k_start)
        self.k_anneal_steps = k_anneal_steps
        self.k = self.k_end if self.k_start is None else self.k_start  # the k in use; see set_progress
        self.mapping_step = mapping_step
        self.min_gap = min_gap
        self.kernel = _check("kernel", kernel, KERNELS)
        self.kernel_eps = float(kernel_eps)
        self.clamp_squared = bool(clamp_squared)
        self.huber_c = float(huber_c)
        self.a, self.b = float(a), float(b)
        self.target_fp32 = bool(target_fp32)
        self.share_dropout = bool(share_dropout)
        self.label_dropout = float(label_dropout)
        self.same_dropped_labels = bool(same_dropped_labels)

    def set_progress(self, step: int, total_steps: int) -> None:
        """Gap annealing: k at ``step`` (0-based) = k_start + (k_end - k_start) min(1, step / N), with N =
        ``k_anneal_steps`` or ``total_steps``; a no-op without ``k_start``."""
        if self.k_start is not None:
            frac = min(1.0, step / max(1, self.k_anneal_steps or total_steps))
            self.k = self.k_start + (self.k_end - self.k_start) * frac

    # -- step 1-5 of Alg. 3: everything random except the networks' own dropout ------------------------
    def sample(self, net, images: torch.Tensor, labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> dict:
        """Draw (t, s, r) per group, the noise and the label-dropout mask, in that order on ``generator``.

        Returns ``t``, ``s``, ``r`` [G] (images' float dtype, at least float32), ``noise`` (N(0, sigma_d^2),
        like images), ``labels`` (the one-hot fed to the online pass or None), ``target_labels`` and
        ``label_keep`` [B] bool (or None). Override to force times in tests.
        """
        batch = images.shape[0]
        if batch % self.group_size:
            raise InputError(
                f"batch size {batch} is not divisible by group_size M={self.group_size}; "
                f"use a per-device batch that is a multiple of {self.group_size}"
            )
        meta = _unwrap(net)
        device = images.device
        tdtype = torch.promote_types(images.dtype, torch.float32)
        sched = meta.noise_schedule
        t, s = sample_times(batch // self.group_size, meta.T, meta.eps, sched, self.time_sampling,
                            self.P_mean, self.P_std, generator, device, tdtype)
        r = map_r(s, t, sched, meta.T, meta.eps, self.k, self.mapping, self.min_gap, self.mapping_step)
        noise = torch.randn(images.shape, generator=generator, device=device, dtype=tdtype) * meta.sigma_data
        target_labels, onehot, keep = dropped_labels(meta, labels, batch, device, self.label_dropout, generator)
        if self.same_dropped_labels:
            target_labels = onehot
        return {"t": t, "s": s, "r": r, "noise": noise, "labels": onehot, "target_labels": target_labels,
                "label_keep": keep}

    def __call__(self, net, images: torch.Tensor, labels: torch.Tensor | None = None, target_net=None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """(loss, stats) for one batch. ``net`` (possibly DDP-wrapped) runs the gradient pass;
        ``target_net`` (default: ``net``; pass the unwrapped module under DDP) runs the no-grad pass with the
        same weights (theta^- = stop-grad theta, Eq. 8). Both nets should be in train mode."""
        target_net = net if target_net is None else target_net
        meta = _unwrap(target_net)
        sched, m = meta.noise_schedule, self.group_size
        d = self.sample(meta, images, labels, generator)
        t, s, r = d["t"], d["s"], d["r"]
        t_b, s_b, r_b = (v.repeat_interleave(m) for v in (t, s, r))  # every particle of a group shares (s, r, t)
        bshape = (-1,) + (1,) * (images.ndim - 1)
        x = images.to(t.dtype)
        noise = d["noise"].to(t.dtype)
        x_t = schedules.add_noise(x, t_b.view(bshape), noise, sched)  # x_t = alpha_t x + sigma_t eps
        # x_r = DDIM(x_t, x, r, t) (Eq. 11) with the same eps: alpha_r x + sigma_r eps, which is exact and
        # stays finite at t = 0 (App. C.2; the release's IMMPrecond.ddim(..., noise=eps) computes the same).
        x_r = schedules.add_noise(x, r_b.view(bshape), noise, sched)

        # Two passes over the whole batch (Alg. 3). The no-grad pass goes first so its temporaries are freed
        # before the gradient pass stores activations; with share_dropout both passes start from the same
        # RNG state and so draw the same dropout masks.
        rng = _SharedRNG(images.device) if self.share_dropout else None
        with torch.no_grad():
            y_r = target_net(x_r, r_b, s_b, class_labels=d["target_labels"], force_fp32=self.target_fp32)
        if rng is not None:
            rng.restore()
        y_t = net(x_t, t_b, s_b, class_labels=d["labels"])
        y_r = y_r.detach()

        weight = weighting(t, sched, self.a, self.b)  # Eq. 13, float64 inside
        kw = kernel_weight_from_c_out(meta.c_skip_c_out(s, t)[1])  # w~ = 1/|c_out(s,t)|, App. C.8
        g = t.shape[0]
        mmd2, terms = group_mmd(
            y_t.reshape(g, m, -1), y_r.reshape(g, m, -1), None, self.kernel, kw,
            self.kernel_eps, self.clamp_squared, self.huber_c, return_terms=True,
        )
        weight = weight.to(mmd2.dtype)
        group_loss = weight * mmd2  # Eq. 67 per group, times w(s,t)
        loss, nonfinite = finite_mean(mmd2, weight)  # mean over the finite groups
        stats = dict(loss=group_loss.detach(), t=t, s=s, r=r, weight=weight, kernel_weight=kw.detach(),
                     nonfinite=nonfinite, **terms)
        keep = d["label_keep"]
        if keep is not None:
            stats["label_dropped"] = 1 - keep.float().mean()
        return loss, stats
