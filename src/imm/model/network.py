"""The IMM network f_{s,t}(x_t): preconditioning around a backbone G (paper Sec. 4.2, App. C.5).

    f_{s,t}(x_t) = c_skip(s,t) x_t + c_out(s,t) G(c_in(t) x_t, c_noise(t), c_noise(s or t-s), labels)

with c_in(t) = 1 / (sigma_d sqrt(alpha_t^2 + sigma_t^2)) and c_noise(t) = time_scale * t. The three
``f_type`` parametrizations (table in App. C.5):

* ``simple_edm``: c_skip = (alpha_t alpha_s + sigma_t sigma_s) / (alpha_t^2 + sigma_t^2),
                  c_out = -(alpha_s sigma_t - alpha_t sigma_s) sigma_d / sqrt(alpha_t^2 + sigma_t^2)
* ``euler_fm``:   c_skip = 1, c_out = -(t - s) sigma_d   (OT-FM only; sigma_d G is the velocity)
* ``identity``:   DDIM(x_t, G, t, s), Eq. 11, with G as the x-prediction.

``IMMNetwork`` takes the constructor keys of ``IMMPrecond`` in the official release
(github.com/lumalabs/imm, ``training/preconds.py``), so the release's configurations and state_dicts
(backbone under ``.model``) carry over unchanged.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from imm.core.config import check_kind
from imm.core.errors import InputError
from imm.model import schedules
from imm.model.backbones import BACKBONES, build_backbone

F_TYPES = ("euler_fm", "simple_edm", "identity")
TEMB_TYPES = ("identity", "stride")
MIXED_PRECISION = {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MODEL_TYPE = "SongUNet"


def c_skip_c_out(s, t, f_type: str, schedule: str, sigma_data: float):
    """(c_skip, c_out) of f_{s,t}(x_t) = c_skip x_t + c_out G for each parametrization (App. C.5)."""
    alpha_t, sigma_t = schedules.alpha_sigma(t, schedule)
    alpha_s, sigma_s = schedules.alpha_sigma(s, schedule)
    if f_type == "simple_edm":
        norm2 = alpha_t**2 + sigma_t**2
        c_skip = (alpha_t * alpha_s + sigma_t * sigma_s) / norm2
        c_out = -(alpha_s * sigma_t - alpha_t * sigma_s) * torch.rsqrt(norm2) * sigma_data
    elif f_type == "euler_fm":
        c_skip = torch.ones_like(t)
        c_out = -(t - s) * sigma_data
    elif f_type == "identity":
        c_skip = sigma_s / sigma_t
        c_out = alpha_s - alpha_t * sigma_s / sigma_t
    else:
        raise InputError(f"unknown f_type {f_type!r}; choose one of {', '.join(F_TYPES)}")
    return c_skip, c_out


class IMMNetwork(torch.nn.Module):
    """f_{s,t}(x_t) around a DDPM++/NCSN++ UNet or a DiT backbone (the release's ``IMMPrecond``)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        mixed_precision: str | None = None,  # None | 'bf16' | 'fp16': autocast of the backbone
        noise_schedule: str = "fm",
        model_type: str = DEFAULT_MODEL_TYPE,
        sigma_data: float = 0.5,
        f_type: str = "euler_fm",
        T: float = 0.994,
        eps: float = 0.0,
        temb_type: str = "identity",  # second time input: 'identity' -> s, 'stride' -> t - s
        time_scale: float = 1000.0,
        **model_kwargs,
    ):
        super().__init__()
        if mixed_precision not in MIXED_PRECISION:
            raise InputError(f"unknown mixed_precision {mixed_precision!r}; choose None, 'bf16' or 'fp16'")
        schedules.check_schedule(noise_schedule)
        if f_type not in F_TYPES:
            raise InputError(f"unknown f_type {f_type!r}; choose one of {', '.join(F_TYPES)}")
        if f_type == "euler_fm" and noise_schedule != "fm":
            raise InputError("f_type='euler_fm' needs noise_schedule='fm'")
        if temb_type not in TEMB_TYPES:
            raise InputError(f"unknown temb_type {temb_type!r}; choose one of {', '.join(TEMB_TYPES)}")
        self.config = dict(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
            mixed_precision=mixed_precision, noise_schedule=noise_schedule, model_type=model_type,
            sigma_data=sigma_data, f_type=f_type, T=T, eps=eps, temb_type=temb_type,
            time_scale=time_scale, **model_kwargs,
        )
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.mixed_precision = mixed_precision
        self.noise_schedule = noise_schedule
        self.sigma_data = sigma_data
        self.f_type = f_type
        self.T = T
        self.eps = eps
        self.temb_type = temb_type
        self.time_scale = time_scale
        self.model = build_backbone(
            model_type, img_resolution=img_resolution, img_channels=img_channels,
            in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs,
        )

    # -- schedule helpers, in the release's names ------------------------------------------
    def eta(self, t: torch.Tensor) -> torch.Tensor:
        return schedules.eta(t, self.noise_schedule)

    def nt_to_t(self, nt: torch.Tensor) -> torch.Tensor:
        return schedules.eta_to_t(nt, self.noise_schedule)

    def c_skip_c_out(self, s: torch.Tensor, t: torch.Tensor):
        return c_skip_c_out(s, t, self.f_type, self.noise_schedule, self.sigma_data)

    def one_hot(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        """Class ids (or one-hot rows) -> float one-hot [batch, label_dim]; None -> all-zero (unconditional)."""
        if self.label_dim == 0:
            return None
        if labels is None:
            return torch.zeros(batch, self.label_dim, device=device)
        if labels.ndim == 1 and not labels.is_floating_point():
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.label_dim):
                raise InputError(f"class labels must lie in [0, {self.label_dim}); got "
                                 f"{int(labels.min())}..{int(labels.max())}")
            return torch.nn.functional.one_hot(labels.to(device), self.label_dim).to(torch.float32)
        return labels.to(device=device, dtype=torch.float32).reshape(-1, self.label_dim)

    # -- the network -------------------------------------------------------------------------
    def compute_dtype(self) -> torch.dtype:
        """The dtype the backbone computes in: its parameters' when they are bf16 or fp16 (a working copy,
        :func:`imm.model.precision.working_copy`) or float64 (finite-difference checks), else float32 (autocast,
        when set, lowers it per operation)."""
        dtype = next(self.model.parameters()).dtype
        return dtype if dtype in (torch.bfloat16, torch.float16, torch.float64) else torch.float32

    def backbone(self, x, t, s, class_labels=None, force_fp32: bool = False) -> torch.Tensor:
        """G(c_in x_t, c_noise(t), c_noise(s) or c_noise(t - s), labels), returned in float32 (float64 for a
        float64 network): the input and the noise labels are computed in float32 (float64), the input then cast
        to :meth:`compute_dtype`."""
        wide = torch.float64 if self.compute_dtype() == torch.float64 else torch.float32
        x = x.to(wide)
        t = t.to(wide).reshape(-1).expand(x.shape[0])
        s = s.to(wide).reshape(-1).expand(x.shape[0])
        alpha_t, sigma_t = schedules.alpha_sigma(t, self.noise_schedule)
        c_in = torch.rsqrt(alpha_t**2 + sigma_t**2) / self.sigma_data
        c_noise_t = t * self.time_scale
        c_noise_s = (s if self.temb_type == "identity" else t - s) * self.time_scale
        use_amp = self.mixed_precision is not None and not force_fp32
        amp = (
            torch.autocast(x.device.type, dtype=MIXED_PRECISION[self.mixed_precision])
            if use_amp else contextlib.nullcontext()
        )
        with amp:
            x_in = (c_in.reshape(-1, 1, 1, 1) * x).to(self.compute_dtype())
            return self.model(x_in, c_noise_t, c_noise_s, class_labels=class_labels).to(wide)

    def forward(self, x, t, s, class_labels=None, cfg_scale: float | None = None, force_fp32: bool = False,
                backbone_only: bool = False):
        """f_{s,t}(x): x [B,C,H,W]; t, s scalars or [B]; class_labels one-hot [B, label_dim] or None.

        With ``cfg_scale`` w, classifier-free guidance is applied to the backbone output before
        c_skip/c_out (Eq. 14): G = G(x, ∅) + w (G(x, c) - G(x, ∅)), in one batched call on [x, x]
        with an all-zero label as ∅. The output is computed in the wider of x's and t's dtype.
        ``backbone_only`` returns G itself (after guidance): the flow-matching baseline's velocity / sigma_d.
        """
        t = torch.as_tensor(t, device=x.device)
        s = torch.as_tensor(s, device=x.device)
        labels = self.one_hot(class_labels, x.shape[0], x.device)
        if cfg_scale is not None and labels is not None:
            t2 = t.reshape(-1).expand(x.shape[0]).repeat(2)
            s2 = s.reshape(-1).expand(x.shape[0]).repeat(2)
            both = self.backbone(torch.cat([x, x]), t2, s2, torch.cat([torch.zeros_like(labels), labels]), force_fp32)
            uncond, cond = both.chunk(2)
            out = uncond + cfg_scale * (cond - uncond)
        else:
            out = self.backbone(x, t, s, labels, force_fp32)
        if backbone_only:
            return out
        dtype = torch.promote_types(x.dtype, t.dtype)
        out, x = out.to(dtype), x.to(dtype)
        t = t.to(dtype).reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t.to(dtype)
        s = s.to(dtype).reshape(-1, *([1] * (x.ndim - 1))) if s.ndim else s.to(dtype)
        if self.f_type == "identity":
            return schedules.ddim(x, out, t, s, self.noise_schedule)
        c_skip, c_out = self.c_skip_c_out(s, t)
        return c_skip * x + c_out * out


def network_arguments(section) -> dict:
    """:class:`IMMNetwork`'s keyword arguments from a config's ``network`` section in the canonical form
    (:mod:`imm.core.release`): its ``kind`` names the backbone, which the constructor (and every network
    file's configuration) calls ``model_type``."""
    arguments = dict(section or {})
    if "kind" in arguments:
        arguments["model_type"] = check_kind("network", arguments.pop("kind"), BACKBONES)
    return arguments


IMM_NETWORK_KEYS = tuple(p for p in inspect.signature(IMMNetwork.__init__).parameters if p not in ("self", "model_kwargs"))
