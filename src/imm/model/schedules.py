"""Flow interpolants and noise schedules (paper Sec. 2 and App. C; ``training/preconds.py`` of the
official release, github.com/lumalabs/imm).

A schedule gives x_t = alpha_t * x + sigma_t * eps with eps ~ N(0, sigma_d^2 I):

* ``fm`` (OT flow matching):  alpha_t = 1 - t,          sigma_t = t
* ``vp_cosine``:               alpha_t = cos(pi t / 2),  sigma_t = sin(pi t / 2)

eta_t = sigma_t / alpha_t (the release calls it ``nt``) and lambda_t = 2 log(alpha_t / sigma_t)
(log-SNR). Like the release, log-SNR and eta -> t are computed in float64 and returned in the
input dtype. Pure math: no I/O, no global state.
"""

from __future__ import annotations

import math

import torch

from imm.core.errors import InputError

SCHEDULES = ("fm", "vp_cosine")


def check_schedule(name: str) -> str:
    if name not in SCHEDULES:
        raise InputError(f"unknown noise_schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return name


def alpha_sigma(t: torch.Tensor, schedule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the interpolant x_t = alpha_t x + sigma_t eps."""
    if schedule == "fm":
        return 1 - t, t
    if schedule == "vp_cosine":
        return torch.cos(t * (math.pi / 2)), torch.sin(t * (math.pi / 2))
    raise InputError(f"unknown noise_schedule {schedule!r}")


def logsnr(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """lambda_t = 2 log(alpha_t / sigma_t), computed in float64."""
    t64 = t.to(torch.float64)
    if schedule == "fm":
        out = 2 * (torch.log(1 - t64) - torch.log(t64))
    elif schedule == "vp_cosine":
        out = -2 * torch.log(torch.tan(t64 * (math.pi / 2)))
    else:
        raise InputError(f"unknown noise_schedule {schedule!r}")
    return out.to(t.dtype)


def dlogsnr_dt(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """d lambda_t / dt: fm -2 / (t (1 - t)); vp_cosine -pi / (sin(pi t/2) cos(pi t/2)). Float64."""
    t64 = t.to(torch.float64)
    if schedule == "fm":
        out = -2 / (t64 * (1 - t64))
    elif schedule == "vp_cosine":
        half = t64 * (math.pi / 2)
        out = -math.pi / (torch.sin(half) * torch.cos(half))
    else:
        raise InputError(f"unknown noise_schedule {schedule!r}")
    return out.to(t.dtype)


def eta(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """eta_t = sigma_t / alpha_t = exp(-lambda_t / 2), through log-SNR in float64 as the release."""
    return torch.exp(-0.5 * logsnr(t.to(torch.float64), schedule)).to(t.dtype)


def eta_to_t(nt: torch.Tensor, schedule: str) -> torch.Tensor:
    """Inverse of eta (the release's ``nt_to_t``): fm nt / (1 + nt); vp_cosine atan(nt) / (pi/2).

    Computed in float64; NaN (from nt = inf) maps to t = 1.
    """
    nt64 = nt.to(torch.float64)
    if schedule == "fm":
        t = nt64 / (1 + nt64)
    elif schedule == "vp_cosine":
        t = torch.atan(nt64) / (math.pi / 2)
    else:
        raise InputError(f"unknown noise_schedule {schedule!r}")
    return torch.nan_to_num(t, nan=1.0).to(nt.dtype)


def ddim(x_t: torch.Tensor, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, schedule: str) -> torch.Tensor:
    """DDIM interpolant, Eq. 11: (alpha_s - (sigma_s / sigma_t) alpha_t) x + (sigma_s / sigma_t) x_t.

    Moves x_t at time t to time s along the straight line through the clean sample x.
    """
    alpha_t, sigma_t = alpha_sigma(t, schedule)
    alpha_s, sigma_s = alpha_sigma(s, schedule)
    ratio = sigma_s / sigma_t
    return (alpha_s - alpha_t * ratio) * x + ratio * x_t


def add_noise(x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: str) -> torch.Tensor:
    """x_t = alpha_t x + sigma_t noise (noise already scaled by sigma_d)."""
    alpha_t, sigma_t = alpha_sigma(t, schedule)
    return alpha_t * x + sigma_t * noise
