"""Converting between pixels and the space the network works in ("model space").

The interface is EDM2's (``training/encoders.py`` of NVlabs/edm2, which the IMM release copies):

* **raw pixels**: ``uint8`` tensors, NCHW, 3 channels, values 0..255;
* **raw latents**: what a dataset stores (``encode_pixels`` makes them once, offline);
* **final latents**: what the network sees and produces (``encode_latents`` makes them from raw
  latents just in time, so that e.g. the whitening can change without re-encoding a dataset);
* ``decode`` goes straight from final latents back to ``uint8`` pixels;
* ``encode(x) == encode_latents(encode_pixels(x))``; ``init(device)`` forces lazy set-up now.

Two encoders exist, as in the release (``encoder.kind``: ``rgb``, ``sd_vae``; ``identity`` passes 2-D toy data through):

* :class:`StandardRGBEncoder` (CIFAR-10): raw latents are the pixels themselves, final latents are
  ``x / 127.5 - 1`` in [-1, 1]; decoding is ``(x * 127.5 + 128)`` clipped to [0, 255] and truncated
  to ``uint8``, which rounds to the nearest level and makes ``uint8 -> encode -> decode`` exact.
* :class:`StabilityVAEEncoder` (ImageNet 256): the Stable Diffusion VAE (``diffusers``
  ``AutoencoderKL``, ``stabilityai/sd-vae-ft-ema`` in the release). Raw latents are the posterior's
  per-pixel mean and standard deviation concatenated on the channel axis (8 channels for the
  4-channel SD VAE); final latents are a posterior sample, whitened per channel:
  ``(mean + std * eps - raw_mean) / raw_std * final_std + final_mean`` with ``eps ~ N(0, I)``.

Pixel convention of the VAE (what we found, and where):

* EDM2 (NVlabs/edm2 ``training/encoders.py``) feeds the VAE ``x / 255`` (pixels in [0, 1]) and
  decodes with ``clamp(0, 1) * 255``; its default statistics ``raw_mean=[5.81, 3.25, 0.12, -2.15]``,
  ``raw_std=[4.17, 4.62, 3.71, 3.28]`` (for sd-vae-ft-mse) belong to that convention.
* The IMM release's ImageNet config (``encoder:`` block of ``im256_generate_images.yaml``:
  ``class_name: training.encoders.StabilityVAEEncoder``, ``vae_name: stabilityai/sd-vae-ft-ema``,
  ``final_std: 0.5``, ``raw_mean: [0.86488, -0.27787343, 0.21616915, 0.3738409]``,
  ``raw_std: [4.85503674, 5.31922414, 3.93725398, 3.9870003]``, ``use_fp16: true``) uses
  statistics of the **[-1, 1]** convention: the release's own ``training/encoders.py``
  (``StabilityVAEEncoder.encode_pixels``) feeds the VAE ``x / 127.5 - 1``. The rest agrees: (1) Luma's
  sibling release lumalabs/tvm (same first author, same EDM2-derived code base) ships the identical
  encoder block (``configs/im256_w2.yaml``, only
  ``final_std`` differs) with a ``training/encoders.py`` (commit 78607b52) whose VAE encoder takes
  ``x / 127.5 - 1``, runs the VAE in fp16 when ``use_fp16``, stores ``cat([mean, std])`` of
  ``latent_dist`` and decodes with ``(y * 0.5 + 0.5).clamp(0, 1) * 255`` truncated to ``uint8``;
  (2) an independent IMM re-implementation that uses the same statistics also encodes
  ``input / 127.5 - 1``; (3) the numbers themselves: a mean near 0.9 for channel 0 (against 5.81
  with [0, 1] inputs) is what sd-vae gives for [-1, 1] inputs, and ports of iMF/MeanFlow, which
  feed [-1, 1], use these same values.

So :class:`StabilityVAEEncoder` feeds the VAE ``x / 127.5 - 1`` and maps its output ``y`` (about
[-1, 1]) back with ``uint8(clamp(y * 0.5 + 0.5, 0, 1) * 255)`` (truncation, as the TVM code does, so
that sample statistics such as FID follow the same pipeline).

``diffusers`` is an optional dependency (``pip install "imm[vae]"``), imported only when a VAE is
first loaded. Nothing here does I/O except that loading.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from imm.core.config import ConfigError, check_keys, check_kind, declared_keys
from imm.core.errors import InputError, MissingError, MissingPackageError, StateError
from imm.core.release import plain
from imm.io import hub

__all__ = ["Encoder", "StandardRGBEncoder", "StabilityVAEEncoder", "IdentityEncoder", "build_encoder", "ENCODER_CLASSES"]

# The release's ImageNet-256 settings (im256_generate_images.yaml), used as defaults below.
SD_VAE_NAME = "stabilityai/sd-vae-ft-ema"
KNOWN_VAES = (SD_VAE_NAME, "stabilityai/sd-vae-ft-mse")  # what a checkpoint's recorded settings may name
SD_VAE_RAW_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)
SD_VAE_RAW_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)

_INSTALL_HINT = 'the VAE encoder needs diffusers: pip install "imm[vae]" (or pip install diffusers)'


def _check_nchw(x: torch.Tensor, channels: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{what} must be an NCHW tensor with {channels} channels, got {shape}")


class Encoder:
    """Base class: pixels <-> model space (see the module docstring for the three representations).

    Attributes ``channels`` (channels of final latents, what the network sees) and ``raw_channels``
    (channels of raw latents, what a dataset stores) are set by subclasses.
    """

    channels: int
    raw_channels: int

    def init(self, device: torch.device | str = "cpu") -> None:
        """Do lazy set-up (loading weights) now, on ``device``. Nothing to do by default."""

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw pixels -> final latents: ``encode_latents(encode_pixels(x))``."""
        return self.encode_latents(self.encode_pixels(x), generator=generator)

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels (uint8 NCHW) -> raw latents (what a dataset stores)."""
        raise NotImplementedError

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw latents -> final latents (float32, what the network sees)."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final latents -> raw pixels (uint8 NCHW, 3 channels)."""
        raise NotImplementedError


class StandardRGBEncoder(Encoder):
    """Pixels are the model space, scaled to [-1, 1] (the release's CIFAR-10 encoder).

    * ``encode_pixels``: identity (a pixel dataset stores pixels);
    * ``encode_latents``: ``x / 127.5 - 1`` as float32 (0 -> -1, 255 -> +1);
    * ``decode``: ``x * 127.5 + 128``, clipped to [0, 255], truncated to ``uint8``. The ``+128``
      (rather than ``+127.5``) makes the truncation round to the nearest level, so
      ``decode(encode(p)) == p`` for every ``uint8`` ``p``.
    """

    def __init__(self, channels: int = 3):
        """``channels``: 3 for RGB, 1 for grayscale data such as MNIST."""
        self.channels = self.raw_channels = int(channels)

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        _check_nchw(x, self.channels, "pixels")
        return x

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x / 127.5 - 1`` in float32; ``generator`` is accepted for a uniform interface and unused."""
        _check_nchw(x, self.channels, "pixels")
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        _check_nchw(x, self.channels, "images")
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

    def __repr__(self) -> str:
        return f"StandardRGBEncoder(channels={self.channels})"


class IdentityEncoder(Encoder):
    """Data that already is the model space (toy 2-D points stored as [2, 1, 1] float "images")."""

    def __init__(self, channels: int = 2):
        self.channels = self.raw_channels = int(channels)

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x.to(torch.float32)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32)

    def __repr__(self) -> str:
        return f"IdentityEncoder(channels={self.channels})"


def _per_channel(value, n: int, name: str) -> np.ndarray:
    """``value`` (a number or a sequence of ``n`` numbers) as a float64 array of length ``n``."""
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a number or a list of numbers, got {value!r}") from exc
    if arr.size == 1:
        arr = np.full(n, arr[0])
    if arr.size != n:
        raise InputError(f"{name} needs 1 or {n} values (one per latent channel), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def _looks_like_path(name: str) -> bool:
    """True for names that can only be a filesystem path (a hub id is ``name`` or ``org/name``)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or os.path.exists(os.path.expanduser(name)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class StabilityVAEEncoder(Encoder):
    """The Stable Diffusion VAE (``diffusers.AutoencoderKL``) with per-channel whitening.

    Args:
        vae_name: a Hugging Face hub id (``stabilityai/sd-vae-ft-ema``, the release's) or a local
            folder holding a diffusers ``AutoencoderKL`` (``config.json`` plus weights, as written
            by ``save_pretrained``). A hub id is looked up in the local Hugging Face cache first and
            downloaded only if missing; offline, pass a local folder.
        raw_mean, raw_std: per-channel mean and standard deviation of raw latent *samples* (the
            release's values for sd-vae-ft-ema with [-1, 1] inputs are the defaults).
        final_mean, final_std: desired mean and standard deviation of the final latents (a number
            or one per channel). The release uses 0 and 0.5 (= sigma_data).
        batch_size: images per VAE call in ``encode_pixels`` and ``decode``.
        use_fp16: run the VAE in float16 on CUDA (the release's ImageNet config sets it). On other
            devices the VAE silently stays float32. Inputs and outputs are float32 either way.

    Steps:
        * ``encode_pixels(uint8 [N, 3, H, W])``: ``x / 127.5 - 1``, VAE encoder in chunks of
          ``batch_size``, returns the posterior's ``cat([mean, std], dim=1)`` as float32
          ``[N, 2C, H/f, W/f]`` (``std = exp(logvar / 2)`` with diffusers' clamp of ``logvar`` to
          [-30, 20]; ``f = 8`` for the SD VAE);
        * ``encode_latents(raw, generator)``: splits ``raw`` into mean and std, draws
          ``z = mean + std * eps`` (``eps`` from ``generator``, which must live on ``raw``'s device)
          and returns ``(z - raw_mean) / raw_std * final_std + final_mean``, computed as
          ``z * scale + bias`` with ``scale = final_std / raw_std`` and
          ``bias = final_mean - raw_mean * scale`` in float32, as EDM2 and Luma's TVM release do;
        * ``decode(latents [N, C, h, w])``: inverts the whitening, VAE decoder in chunks of
          ``batch_size``, maps its output ``y`` to ``uint8(clamp(y * 0.5 + 0.5, 0, 1) * 255)``
          (truncation, as in Luma's TVM release; see the module docstring).

    The VAE is loaded on the first ``init(device)`` (also called by the methods above with the
    input's device) and is not pickled with the encoder. Its weights are frozen; no gradients flow.
    """

    def __init__(
        self,
        vae_name: str = SD_VAE_NAME,
        raw_mean: Sequence[float] = SD_VAE_RAW_MEAN,
        raw_std: Sequence[float] = SD_VAE_RAW_STD,
        final_mean: float | Sequence[float] = 0.0,
        final_std: float | Sequence[float] = 0.5,
        batch_size: int = 8,
        use_fp16: bool = False,
    ):
        super().__init__()
        if not isinstance(vae_name, (str, os.PathLike)) or not str(vae_name):
            raise InputError(f"vae_name must be a hub id or a folder, got {vae_name!r}")
        n = int(np.size(raw_mean))
        if n < 1:
            raise InputError("raw_mean needs one value per latent channel")
        raw_mean_arr = _per_channel(raw_mean, n, "raw_mean")
        raw_std_arr = _per_channel(raw_std, n, "raw_std")
        final_mean_arr = _per_channel(final_mean, n, "final_mean")
        final_std_arr = _per_channel(final_std, n, "final_std")
        if np.any(raw_std_arr <= 0) or np.any(final_std_arr <= 0):
            raise InputError("raw_std and final_std must be positive")
        if int(batch_size) < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")

        self.vae_name = os.fspath(vae_name)
        self.raw_mean = tuple(float(v) for v in raw_mean_arr)
        self.raw_std = tuple(float(v) for v in raw_std_arr)
        self.final_mean = tuple(float(v) for v in final_mean_arr)
        self.final_std = tuple(float(v) for v in final_std_arr)
        self.batch_size = int(batch_size)
        self.use_fp16 = bool(use_fp16)
        self.channels = n
        self.raw_channels = 2 * n
        # Whitening as an affine map, in float32 like EDM2 / TVM: final = raw * scale + bias.
        f32 = np.float32
        scale = final_std_arr.astype(f32) / raw_std_arr.astype(f32)
        bias = final_mean_arr.astype(f32) - raw_mean_arr.astype(f32) * scale
        self.scale = tuple(float(v) for v in scale.astype(np.float32))
        self.bias = tuple(float(v) for v in bias.astype(np.float32))
        self._vae = None

    # -- set-up ------------------------------------------------------------------------------------

    def vae_dtype(self, device: torch.device | str) -> torch.dtype:
        """float16 when ``use_fp16`` and ``device`` is CUDA, else float32."""
        return torch.float16 if self.use_fp16 and torch.device(device).type == "cuda" else torch.float32

    def init(self, device: torch.device | str = "cpu") -> None:
        """Load the VAE (first call) and put it on ``device`` in :meth:`vae_dtype`."""
        device = torch.device(device)
        dtype = self.vae_dtype(device)
        if self._vae is None:
            self._vae = self._load(dtype)
        p = next(self._vae.parameters())
        same_device = p.device.type == device.type and device.index in (None, p.device.index)
        if not same_device or p.dtype != dtype:
            self._vae.to(device=device, dtype=dtype)

    @property
    def vae(self):
        """The diffusers ``AutoencoderKL``, loaded on the CPU first if it is not loaded yet."""
        if self._vae is None:
            self.init("cpu")
        return self._vae

    def use_vae(self, vae) -> None:
        """Decode and encode with ``vae``, a loaded diffusers ``AutoencoderKL`` (a pipeline's ``vae``
        component), instead of loading ``vae_name``."""
        self._vae = vae.eval().requires_grad_(False)

    def _load(self, dtype: torch.dtype):
        name = self.vae_name
        folder = os.path.expanduser(name)
        is_folder = os.path.isdir(folder)
        if not is_folder and _looks_like_path(name):
            what = "is not a folder" if os.path.exists(folder) else "does not exist"
            raise MissingError(f"VAE folder {folder!r} {what}; vae_name must be a local folder "
                                    "holding a diffusers AutoencoderKL (config.json + weights) or a Hugging "
                                    f"Face hub id such as {SD_VAE_NAME!r}")
        try:
            import diffusers
        except ImportError as exc:
            raise MissingPackageError(_INSTALL_HINT) from exc
        kwargs = {"torch_dtype": dtype, "use_safetensors": True}  # never a pickled .bin
        if importlib.util.find_spec("accelerate") is None:
            kwargs["low_cpu_mem_usage"] = False  # what diffusers falls back to anyway, minus its warning

        def load(*args, **kw):
            with warnings.catch_warnings():  # a deprecation notice diffusers triggers in huggingface_hub
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                return diffusers.AutoencoderKL.from_pretrained(*args, **kw)

        if is_folder:
            try:
                vae = load(folder, **kwargs)
            except Exception as exc:
                raise StateError(f"could not load a diffusers AutoencoderKL from folder {folder!r} "
                                   f"({_first_line(exc)})") from exc
        else:
            try:
                vae = load(name, local_files_only=True, **kwargs)  # the local HF cache: no network
            except Exception:
                hub.check_reachable(f"VAE {name!r}", "pass vae_name=/path/to/folder holding a saved diffusers "
                                    "AutoencoderKL (config.json + weights)", name)  # offline: one line at once
                try:
                    vae = load(name, **kwargs)
                except Exception as exc:
                    raise StateError(
                        f"could not load VAE {name!r} from the Hugging Face hub or its local cache "
                        f"({_first_line(exc)}); offline, pass vae_name=/path/to/folder holding a saved "
                        "diffusers AutoencoderKL (config.json + weights)") from exc
        return vae.eval().requires_grad_(False)

    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), _vae=None)  # never pickle the VAE

    def __repr__(self) -> str:
        return (f"StabilityVAEEncoder(vae_name={self.vae_name!r}, raw_mean={list(self.raw_mean)}, "
                f"raw_std={list(self.raw_std)}, final_mean={list(self.final_mean)}, "
                f"final_std={list(self.final_std)}, batch_size={self.batch_size}, use_fp16={self.use_fp16})")

    def _affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.tensor(self.scale, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
        bias = torch.tensor(self.bias, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
        return scale, bias

    # -- conversions -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0..255) pixels [N, 3, H, W] -> float32 ``cat([mean, std])`` [N, 2C, h, w]."""
        _check_nchw(x, 3, "pixels")
        self.init(x.device)
        dtype = next(self._vae.parameters()).dtype
        x = x.to(torch.float32) / 127.5 - 1  # the VAE takes images in [-1, 1]
        out = []
        for chunk in x.split(self.batch_size):
            dist = self._vae.encode(chunk.to(dtype)).latent_dist
            out.append(torch.cat([dist.mean, dist.std], dim=1).to(torch.float32))
        return torch.cat(out)

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw ``cat([mean, std])`` -> whitened posterior sample (float32 [N, C, h, w])."""
        _check_nchw(x, self.raw_channels, "raw latents (posterior mean and std)")
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=mean.device)
        z = mean + eps * std
        scale, bias = self._affine(z)
        return z * scale + bias

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final latents [N, C, h, w] -> uint8 pixels [N, 3, h*f, w*f]."""
        _check_nchw(x, self.channels, "latents")
        self.init(x.device)
        dtype = next(self._vae.parameters()).dtype
        x = x.to(torch.float32)
        scale, bias = self._affine(x)
        x = (x - bias) / scale  # undo the whitening: raw VAE latents
        out = []
        for chunk in x.split(self.batch_size):
            y = self._vae.decode(chunk.to(dtype)).sample.to(torch.float32)  # about [-1, 1]
            out.append((y * 0.5 + 0.5).clamp(0, 1).mul(255).to(torch.uint8))
        return torch.cat(out)


ENCODER_CLASSES: dict[str, type[Encoder]] = {  # encoder.kind -> the class its other keys construct
    "rgb": StandardRGBEncoder,
    "sd_vae": StabilityVAEEncoder,
    "identity": IdentityEncoder,
}


def build_encoder(cfg: Mapping | Encoder | None = None) -> Encoder:
    """An encoder from the ``encoder:`` section of a config in the canonical form (:mod:`imm.core.release`
    translates the release's ``class_name: training.encoders.StabilityVAEEncoder`` to ``kind: sd_vae``).

    ``cfg`` is ``None`` or empty (-> :class:`StandardRGBEncoder`), an :class:`Encoder` (returned as
    is), or a mapping with ``kind`` (:data:`ENCODER_CLASSES`: ``rgb``, ``sd_vae``, ``identity``) plus the
    class's constructor arguments, e.g. ``{'kind': 'sd_vae', 'vae_name': ..., 'final_std': 0.5, 'raw_mean':
    [...], 'raw_std': [...], 'use_fp16': True}``. An unknown kind or an argument the class does not take raises
    :class:`imm.core.config.ConfigError` (a ``ValueError``). Nothing is loaded here: call ``init(device)`` on
    the result.
    """
    if isinstance(cfg, Encoder):
        return cfg
    if cfg is None:
        return StandardRGBEncoder()
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"the encoder config must be a mapping with a kind, got {type(cfg).__name__}")
    kwargs = plain(cfg)
    if not kwargs:
        return StandardRGBEncoder()
    if kwargs.get("kind") is None:
        raise ConfigError(f"the encoder config needs a kind ({', '.join(ENCODER_CLASSES)})")
    kind = check_kind("encoder", kwargs.pop("kind"), ENCODER_CLASSES)
    cls = ENCODER_CLASSES[kind]
    check_keys("encoder", kwargs, declared_keys(cls), f" for kind {kind!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad encoder config for kind {kind!r}: {exc}") from exc
