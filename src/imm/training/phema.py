"""EMA of the weights: the trainer's fixed-decay EMAs (:func:`update_ema`, :func:`ema_decay`) and post-hoc
EMA, power-function EMA profiles and their least-squares recombination after training.

From Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2, CVPR 2024),
Sec. 3 ("Post-hoc EMA") and Appendix C; written from the paper's equations. Notation as there:

* A power-function EMA of exponent ``gamma`` averages the training weights theta(tau), tau in [0, t], with
  the profile p(tau; t, gamma) = (gamma + 1) tau^gamma / t^(gamma + 1). Step by step it is the EMA
  theta_hat(t) = beta(t) theta_hat(t - 1) + (1 - beta(t)) theta(t) with beta(t) = (1 - 1/t)^(gamma + 1),
  t = 1, 2, ... counting optimizer steps (:func:`power_beta`; beta(1) = 0, so the initial weights never enter).
* Its width relative to its length t is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))
  (:func:`gamma_to_sigma_rel`), solved for gamma by :func:`sigma_rel_to_gamma`.
* Training stores snapshots theta_hat_i of two such profiles every few steps; any other profile p_r is
  approximated by sum_i x_i p_i in the least-squares sense, and the same weights x_i combine the snapshots
  into its EMA (:func:`reconstruction_weights`).

The recursion is exact, not only a continuous approximation: unrolled, theta(t) enters theta_hat(T) with
weight (t^(gamma+1) - (t-1)^(gamma+1)) / T^(gamma+1), the integral of p(tau; T, gamma) over [t-1, t]. So the
stepwise EMA *is* the continuous profile applied to the piecewise-constant weights of training, and a profile
that lies in the span of the snapshots' profiles is reconstructed exactly (up to round-off).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from imm.core.distributed import full_state_dict
from imm.core.errors import InputError


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net for the parameters; buffers are copied."""
    ema_params = [p for p in ema.parameters()]
    net_params = [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(ema_params, net_params, 1 - decay)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


def ema_decay(decay: float, step: int, warmup: bool) -> float:
    """The EMA decay at ``step``; with warm-up, min(decay, (1 + step) / (10 + step)) so early EMAs track."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


# sigma_rel(gamma) rises from 0 at gamma = -1 to its maximum at gamma = (sqrt(5) - 3) / 2 (the root of
# d log sigma_rel / d gamma = 0, i.e. gamma^2 + 3 gamma + 1 = 0), then falls towards 0 as gamma grows.
GAMMA_AT_WIDEST = (math.sqrt(5.0) - 3.0) / 2.0


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))): the standard deviation of the profile
    p(tau; t, gamma) divided by t (EDM2, Sec. 3)."""
    gamma = float(gamma)
    if not gamma > -1:
        raise InputError(f"a power-function EMA needs gamma > -1, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_AT_WIDEST)  # about 0.3003: no power-function profile is wider


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the profile of relative width ``sigma_rel`` (EDM2, Sec. 3 / App. C).

    Squared and multiplied out, the width's formula is the cubic s gamma^3 + 7 s gamma^2 + (16 s - 1) gamma
    + (12 s - 1) = 0 with s = sigma_rel^2; its largest real root is the gamma >= GAMMA_AT_WIDEST on the branch
    where wider means smaller gamma (sigma_rel 0.05 -> 16.97, 0.10 -> 6.94)."""
    s = float(sigma_rel)
    if not 0 < s <= SIGMA_REL_MAX:
        raise InputError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}] (no power-function EMA is wider), "
                         f"got {sigma_rel}")
    roots = np.roots([s * s, 7 * s * s, 16 * s * s - 1, 12 * s * s - 1])
    # the other two real roots lie below GAMMA_AT_WIDEST; at SIGMA_REL_MAX ours is a double root there, which
    # round-off may split into a complex pair, hence the real parts and the floor
    return max(GAMMA_AT_WIDEST, float(roots.real.max()))


def power_beta(step: int, gamma: float) -> float:
    """beta(t) = (1 - 1/t)^(gamma + 1), the decay of the power-function EMA at optimizer step t >= 1."""
    if step < 1:
        raise InputError(f"power-function EMA steps count from 1, got {step}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_products(steps_a, gammas_a, steps_b, gammas_b) -> torch.Tensor:
    """The L2 inner products <p(.; t_a, gamma_a), p(.; t_b, gamma_b)> of power-function profiles, float64 [A, B].

    Integrated in closed form over [0, min(t_a, t_b)]: (gamma_a + 1)(gamma_b + 1) m^(gamma_a + gamma_b + 1)
    / ((gamma_a + gamma_b + 1) t_a^(gamma_a + 1) t_b^(gamma_b + 1)) with m = min(t_a, t_b), evaluated through
    logarithms (t^(gamma + 1) overflows for long runs)."""
    ta, ga, tb, gb = (torch.as_tensor(v, dtype=torch.float64) for v in (steps_a, gammas_a, steps_b, gammas_b))
    ta, ga, tb, gb = ta[:, None], ga[:, None], tb[None, :], gb[None, :]
    g = ga + gb + 1
    log = g * torch.minimum(ta, tb).log() - (ga + 1) * ta.log() - (gb + 1) * tb.log()
    return (ga + 1) * (gb + 1) / g * log.exp()


def reconstruction_weights(steps, gammas, sigma_rel: float, step: int | None = None) -> torch.Tensor:
    """Weights x_i (float64) such that sum_i x_i theta_hat_i is the EMA of relative width ``sigma_rel`` at
    ``step`` (default: the newest snapshot), from snapshots theta_hat_i taken at ``steps[i]`` of profiles
    with exponents ``gammas[i]`` (EDM2, Sec. 3 and App. C).

    x minimises || sum_i x_i p_i - p_r ||^2 over [0, inf): the normal equations A x = b with the Gram matrix
    A_ij = <p_i, p_j> and b_i = <p_i, p_r> (:func:`profile_inner_products`), solved by least squares (SVD,
    so duplicate or nearly dependent snapshots cannot make it fail). Snapshots newer than ``step`` get 0."""
    steps = [int(t) for t in steps]
    gammas = [float(g) for g in gammas]
    if not steps or len(steps) != len(gammas) or min(steps) < 1:
        raise InputError("reconstruction_weights needs one step >= 1 and one gamma per snapshot")
    step = max(steps) if step is None else int(step)
    target_gamma = sigma_rel_to_gamma(sigma_rel)
    use = [i for i, t in enumerate(steps) if t <= step]
    if not use:
        raise InputError(f"no snapshot at or before step {step} (the first is at step {min(steps)})")
    t_use, g_use = [steps[i] for i in use], [gammas[i] for i in use]
    gram = profile_inner_products(t_use, g_use, t_use, g_use)
    rhs = profile_inner_products(t_use, g_use, [step], [target_gamma])
    x = torch.linalg.lstsq(gram, rhs, driver="gelsd").solution[:, 0]
    weights = torch.zeros(len(steps), dtype=torch.float64)
    weights[use] = x
    return weights


class PowerEMA:
    """One power-function EMA of a network per relative width in ``sigma_rels`` (EDM2, Sec. 3), kept next to
    the trainer's classic EMAs. :meth:`update` after every optimizer step; parameters are averaged, buffers
    copied, as :func:`update_ema` does for the classic ones."""

    def __init__(self, net: torch.nn.Module, sigma_rels):
        self.sigma_rels = [float(s) for s in sigma_rels]
        if not self.sigma_rels or len(set(self.sigma_rels)) < len(self.sigma_rels):
            raise InputError(f"post-hoc EMA needs at least one sigma_rel and no repeats, got {list(sigma_rels)}")
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.emas = {s: copy.deepcopy(net).eval().requires_grad_(False) for s in self.sigma_rels}

    def update(self, net: torch.nn.Module, step: int) -> None:
        """Fold in ``net``'s weights after optimizer step ``step`` (1 for the first): decay power_beta(step, gamma)."""
        for ema, gamma in zip(self.emas.values(), self.gammas):
            update_ema(ema, net, power_beta(step, gamma))

    def state_dict(self) -> dict:
        """{'sigma_rels': [...], 'emas': {repr(sigma_rel): full CPU state_dict}} (FSDP2 shards gathered)."""
        return {"sigma_rels": list(self.sigma_rels), "emas": {repr(s): full_state_dict(e) for s, e in self.emas.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue the profiles of :meth:`state_dict`; the widths must be the same ones (ValueError otherwise)."""
        if sorted(state["sigma_rels"]) != sorted(self.sigma_rels):
            raise InputError(f"it tracks post-hoc EMA widths {state['sigma_rels']}, the config asks for "
                             f"{self.sigma_rels}")
        for s, ema in self.emas.items():
            ema.load_state_dict(state["emas"][repr(s)])
