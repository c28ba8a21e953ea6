"""DINOv2 features for FD_DINOv2: the Frechet distance in the feature space of a DINOv2 ViT.

Stein et al., "Exposing flaws of generative model evaluation metrics and their unfair treatment of
diffusion models" (NeurIPS 2023) propose the Frechet distance of DINOv2 ViT-L/14 features
(FD_DINOv2) beside the Inception FID; Karras et al., "Analyzing and Improving the Training Dynamics
of Diffusion Models" (EDM2, CVPR 2024) report it as their second metric. The network is
``transformers.Dinov2Model`` (Oquab et al. 2023), by default the hub id ``facebook/dinov2-large``
(ViT-L/14), or any folder written by ``save_pretrained``.

Preprocessing (as EDM2 describes it): uint8 images -> float in [0, 1], grayscale repeated to three
channels, bicubic resize with antialiasing to 224x224 (``F.interpolate(..., antialias=True)``, the
same filter as PIL's bicubic resize), ImageNet normalisation (mean 0.485, 0.456, 0.406; std 0.229,
0.224, 0.225). The feature is the class token after the final layer norm: ``Dinov2Model``'s
``pooler_output`` (``layernorm(last_hidden_state)[:, 0]``), 1024-d for ViT-L.

Loading never waits on the network for long: the Hugging Face cache is tried first without any
request; when the model is not there, ``HF_HUB_OFFLINE=1`` (or one failed request to the Hub) gives
one error line saying how to get it. Usage::

    net = load_dinov2(device="cuda")                      # or load_dinov2("/models/dinov2-large")
    feats = net.features(images_uint8, batch_size=64)     # np.float32 [N, 1024]
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imm.core.errors import InputError, MissingError, MissingPackageError
from imm.io import hub
from imm.io.checkpoint import CheckpointError
from imm.io.images import images_per_batch

DEFAULT_MODEL = "facebook/dinov2-large"
RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 1|3, H, W]`` -> float32 ``[N, 3, 224, 224]``, ImageNet-normalised (see the module doc)."""
    x = images.to(torch.float32) / 255
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _as_nchw(images) -> torch.Tensor:
    """A uint8 batch (tensor or array) as NCHW: ``[N, C, H, W]`` when dim 1 holds 1 or 3 channels, else
    NHWC ``[N, H, W, C]`` is transposed."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 tensors/arrays, got {getattr(images, 'dtype', type(images))}; "
                        "convert x in [-1, 1] with (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)")
    if images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
        images = images.permute(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"images must be [N, 1 or 3, H, W] or [N, H, W, 1 or 3], got shape {tuple(images.shape)}")
    return images


class DINOv2Features(nn.Module):
    """A ``Dinov2Model`` in eval mode that maps uint8 images to final-layer-normed class tokens."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images ``[N, 1|3, H, W]`` -> features ``[N, D]``."""
        return self.model(pixel_values=preprocess(images.to(self.device))).pooler_output

    @torch.inference_mode()
    def features(self, images, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Features ``np.float32 [N, D]`` of uint8 images, ``batch_size`` at a time: one tensor/array (NCHW
        or NHWC, see :func:`_as_nchw`) or an iterable of such batches, as ``InceptionV3.features`` takes."""
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        single = isinstance(images, (torch.Tensor, np.ndarray))
        if not single and (not isinstance(images, Iterable) or isinstance(images, (str, bytes, os.PathLike))):
            raise TypeError(f"images must be a uint8 tensor/array or an iterable of them, got {type(images)}")
        from tqdm.auto import tqdm

        feats = []
        with tqdm(total=images.shape[0] if single else None, disable=not progress, unit="img", desc="dinov2") as bar:
            for batch in [images] if single else images:
                batch = _as_nchw(batch)
                step = images_per_batch(batch_size, batch.shape[1:])
                for i in range(0, batch.shape[0], step):
                    chunk = batch[i:i + step]
                    feats.append(self(chunk).float().cpu().numpy())
                    bar.update(chunk.shape[0])
        return np.concatenate(feats) if feats else np.zeros((0, self.feature_dim), np.float32)


def _read(source: str, what: str, local_files_only: bool = True):
    """``Dinov2Model.from_pretrained``; an ``OSError`` (files not found) passes through, anything else that
    is not a complete DINOv2 model is a :class:`CheckpointError` naming ``what``."""
    try:
        from transformers import Dinov2Model
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise MissingPackageError("FD_DINOv2 needs transformers: pip install 'imm[dinov2]'") from None
    bars = hf_logging.is_progress_bar_enabled()
    if local_files_only:
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar (downloads keep theirs)
    try:
        model, info = Dinov2Model.from_pretrained(source, local_files_only=local_files_only, output_loading_info=True)
    except OSError:
        raise
    except Exception as e:  # corrupt weights, a config of another kind, ...
        raise CheckpointError(f"{what}: not a loadable DINOv2 model ({hub.first_line(e)})") from None
    finally:
        if bars and local_files_only:
            hf_logging.enable_progress_bar()
    if info["missing_keys"]:
        raise CheckpointError(f"{what}: not DINOv2 weights (missing {sorted(info['missing_keys'])[:4]})")
    return model


def _is_hub_id(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and not os.path.isabs(name)


def load_dinov2(model=None, device="cpu") -> DINOv2Features:
    """The FD_DINOv2 network on ``device`` from a folder (``save_pretrained``) or a hub id (default
    ``facebook/dinov2-large``).

    A hub id is read from the Hugging Face cache without a request; when it is not cached and
    ``HF_HUB_OFFLINE`` is set, or one request to the Hub fails, raises a one-line
    ``FileNotFoundError`` (as ``imm.evaluation.inception.load_inception`` does for missing weights); otherwise it
    is downloaded into the cache. A folder that holds no complete DINOv2 model: ``CheckpointError``."""
    name = str(model or DEFAULT_MODEL)
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            return DINOv2Features(_read(str(path), str(path))).to(device)
        except OSError as e:
            raise CheckpointError(f"{path}: not a DINOv2 model folder ({hub.first_line(e)})") from None
    if not _is_hub_id(name):
        raise MissingError(f"DINOv2 model folder not found: {path} (--dinov2 takes a folder written by "
                                f"save_pretrained or a hub id such as {DEFAULT_MODEL})")
    from huggingface_hub import try_to_load_from_cache

    what = f"DINOv2 model {name!r}"
    if isinstance(try_to_load_from_cache(name, "config.json"), str):  # cached: read it without any request
        try:
            return DINOv2Features(_read(name, what)).to(device)
        except OSError:
            pass  # its weights are not in the cache
    advice = (f"download it where there is internet (hf download {name} --local-dir DIR) and pass --dinov2 DIR, or "
              "fill the cache ($HF_HOME)")
    hub.check_reachable(what, advice, name)  # offline: one line at once, not huggingface_hub's retries
    try:
        return DINOv2Features(_read(name, what, local_files_only=False)).to(device)
    except OSError as e:
        raise MissingError(f"{what}: download failed ({hub.first_line(e)}): {advice}") from None
