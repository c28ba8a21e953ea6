"""An IMM network as a diffusers pipeline (https://huggingface.co/docs/diffusers): three components that
diffusers saves and loads like its own, found by importing this module (``model_index.json`` names
``["imm.interop.diffusers_pipeline", CLASS]``; diffusers resolves a library it does not know by
importing it):

* :class:`IMMNetworkModel` (``ModelMixin`` + ``ConfigMixin``): the network, its constructor arguments as
  the config (``network_config``) and its weights in safetensors, so ``save_pretrained``,
  ``from_pretrained(torch_dtype=...)`` and ``.to()`` behave as for any diffusers model;
* :class:`IMMScheduler` (``SchedulerMixin`` + ``ConfigMixin``): the sampler: the training method whose
  sampler draws the samples (:func:`imm.methods.registry.entry_sampler`), the time schedule
  (``noise_schedule``, ``f_type``, ``temb_type``, ``T``, ``eps``), the checkpoint's recorded sampling
  entries and the encoder that decodes the samples;
* :class:`IMMPipeline` (``DiffusionPipeline``): ``pipe(...)`` in diffusers' conventions, which also takes
  the release's sampling-entry keys, so ``pipe(**entry)`` draws what ``imm generate`` draws for that
  entry. A latent network's VAE is the ``vae`` component when the folder holds one (a diffusers
  ``AutoencoderKL``), else it is loaded from the Hub id its encoder names (only a known one).

diffusers' own flow-map scheduler (``FlowMatchEulerDiscreteScheduler``) steps ``z_r = z_t - (sigma_t -
sigma_r) u`` from a velocity; an IMM network returns the flow map ``f(x_t, t, s)`` itself (its ``f_type``
is inside the network), so the samplers of :mod:`imm.model.sampling` and :mod:`imm.methods` run the loop
and the scheduler holds what they need.
"""

from __future__ import annotations

import json

import torch
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from imm.core.errors import printable
from imm.core.release import SAMPLER_NAMES
from imm.data.encoders import KNOWN_VAES, StabilityVAEEncoder, build_encoder
from imm.io.images import to_hwc, to_pil
from imm.methods import registry as methods
from imm.model import schedules
from imm.model.network import IMMNetwork
from imm.model.sampling import SamplingEntry, time_grid

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class IMMNetworkModel(ModelMixin, ConfigMixin):
    """An :class:`imm.model.network.IMMNetwork` as a diffusers model: ``network_config`` is its
    ``config`` (the constructor arguments), ``network`` the module itself. ``forward`` is the network's
    flow map ``f(x_t, t, s)`` (the release's ``IMMPrecond.forward``)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, network_config: dict | None = None):
        super().__init__()
        self.network = IMMNetwork(**(network_config or {}))

    def forward(self, sample: torch.Tensor, timestep, target_timestep, class_labels=None, cfg_scale=None):
        return self.network(sample, timestep, target_timestep, class_labels, cfg_scale=cfg_scale)


class IMMScheduler(SchedulerMixin, ConfigMixin):
    """The sampler of an IMM-family network (see the module docstring). ``entries`` maps entry names to
    sampling entries (:class:`imm.model.sampling.SamplingEntry`'s keys: the release's ``num_steps``,
    ``discretization``, ``mid_nt``, ``cfg_scale``, ``cfg_interval``, plus ``sampler`` and ``solver``);
    ``encoder`` is the ``encoder:`` section that decodes samples (:func:`imm.data.encoders.build_encoder`).
    :meth:`set_timesteps` puts the time grid of an entry in ``timesteps`` (T down to eps, float64)."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, method: str = methods.DEFAULT_METHOD, entries: dict | None = None, encoder: dict | None = None,
                 noise_schedule: str = "fm", f_type: str = "euler_fm", temb_type: str = "identity", T: float = 0.994,
                 eps: float = 0.0, sigma_data: float = 0.5):
        methods.get(method)  # a known method, else one line naming the known ones
        self.entries = {name: SamplingEntry(**values) for name, values in (entries or {}).items()}
        self.timesteps = None

    # the schedule helpers imm.model.sampling.time_grid reads
    @property
    def T(self) -> float:  # noqa: N802 (the paper's name)
        return self.config.T

    @property
    def eps(self) -> float:
        return self.config.eps

    def eta(self, t: torch.Tensor) -> torch.Tensor:
        return schedules.eta(t, self.config.noise_schedule)

    def nt_to_t(self, nt: torch.Tensor) -> torch.Tensor:
        return schedules.eta_to_t(nt, self.config.noise_schedule)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, discretization: str | None = None,
                      mid_nt=None) -> None:
        """``timesteps``: the time grid of ``num_inference_steps`` steps (uniform unless ``discretization``
        or ``mid_nt`` says otherwise; see :func:`imm.model.sampling.time_grid`)."""
        if num_inference_steps is not None and discretization is None and mid_nt is None:
            discretization = "uniform"
        self.timesteps = time_grid(self, num_inference_steps, discretization, mid_nt, device=device)

    def resolve(self, entry: str | None = None, num_inference_steps: int | None = None, whole: bool = False,
                **keys) -> SamplingEntry:
        """The sampling entry to draw: the recorded entry ``entry`` with ``num_inference_steps`` (a uniform grid
        of that many steps) and any field of :class:`~imm.model.sampling.SamplingEntry` given in ``keys``
        replacing its values. Without ``entry``, a time grid
        given (``num_inference_steps``, ``num_steps``, ``discretization`` or ``mid_nt``), or ``whole`` (a
        release entry, which names its sampler: its ``mid_nt: null`` is one step), is the whole entry
        (``pipe(**entry)`` draws that entry, unguided unless it says otherwise); else the first recorded
        entry (one step when none is) is the base."""
        if entry is not None and entry not in self.entries:
            raise ValueError(f"unknown sampling entry {entry!r}; this scheduler records {list(self.entries)}")
        grid_given = whole or num_inference_steps is not None or any(
            keys.get(k) is not None for k in ("num_steps", "discretization", "mid_nt"))
        if entry is not None:
            base = self.entries[entry]
        else:
            base = SamplingEntry() if grid_given else next(iter(self.entries.values()), SamplingEntry())
        values = base.kwargs()
        if num_inference_steps is not None:
            if keys.get("num_steps") not in (None, num_inference_steps):
                raise ValueError(f"num_inference_steps={num_inference_steps} and num_steps={keys['num_steps']} differ")
            values.pop("mid_nt", None)
            values.update(num_steps=int(num_inference_steps), discretization="uniform")
        given = {k: v for k, v in keys.items() if v is not None}
        if "mid_nt" in given:
            values.pop("discretization", None)
        if "discretization" in given:
            values.pop("mid_nt", None)
        values.update(given)
        resolved = SamplingEntry(**values)
        methods.check_entry(self.config.method, resolved)
        return resolved


class IMMPipeline(DiffusionPipeline):
    """Sampling an IMM-family network with diffusers (see the module docstring).

    ``pipe(batch_size=1, num_inference_steps=None, class_labels=None, guidance_scale=None, generator=None,
    latents=None, output_type="pil", return_dict=True, entry=None, **entry_keys)``:

    * ``latents``: the starting point x_T as :func:`imm.sample` takes it (``sigma_data * N(0, I)``), else
      drawn from ``generator``; ``class_labels``: class ids (a conditional network without them draws
      them from ``generator``, after the noise);
    * the sampling entry: ``entry`` (a recorded entry's name; default the first recorded), then
      ``num_inference_steps`` (a uniform grid) and the release's keys ``num_steps``, ``discretization``,
      ``mid_nt``, ``cfg_scale``, ``cfg_interval``, ``name`` (``pushforward_generator_fn`` or
      ``restart_generator_fn``; or ``sampler``) and ``solver``; ``guidance_scale`` is ``cfg_scale``;
    * ``output_type``: ``"pil"``, ``"np"`` (float NHWC in [0, 1]), ``"pt"`` (float NCHW in [0, 1]) or
      ``"latent"`` (the sampler's output in model space, before decoding). The images are those ``imm
      generate`` writes: decoded to uint8 first, so ``"np"``/``"pt"`` times 255 are its pixel values.

    A network of 2-D points (the toy2d preset) returns them for ``"np"`` / ``"pt"`` / ``"latent"``.
    """

    model_cpu_offload_seq = "network->vae"
    _optional_components = ["vae"]

    def __init__(self, network: IMMNetworkModel, scheduler: IMMScheduler, vae=None):
        super().__init__()
        self.register_modules(network=network, scheduler=scheduler, vae=vae)

    def encoder(self):
        """The encoder that decodes samples (the scheduler's ``encoder`` section): with the ``vae`` component
        when there is one, else with the VAE the encoder names when that is a Hub id of
        :data:`imm.data.encoders.KNOWN_VAES`. Built once and kept while the ``vae`` component and the encoder
        section stay the same (a VAE named by the section is loaded once, not at every call)."""
        key = (self.vae, json.dumps(self.scheduler.config.encoder, sort_keys=True))
        kept = getattr(self, "_decoding", None)
        if kept is not None and kept[0][0] is key[0] and kept[0][1] == key[1]:
            return kept[1]
        encoder = build_encoder(self.scheduler.config.encoder)
        if isinstance(encoder, StabilityVAEEncoder):
            if self.vae is not None:
                encoder.use_vae(self.vae)
            elif encoder.vae_name not in KNOWN_VAES:  # a folder's config cannot choose which folder or repo is read
                raise ValueError(f"the scheduler's encoder names the VAE {printable(encoder.vae_name)[:200]!r}, not "
                                 f"one of {', '.join(KNOWN_VAES)}: pass vae=AutoencoderKL.from_pretrained(...) to "
                                 "from_pretrained to choose it yourself")
        self._decoding = (key, encoder)
        return encoder

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int | None = None, class_labels=None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 entry: str | None = None, num_steps: int | None = None, discretization: str | None = None,
                 mid_nt=None, cfg_scale: float | None = None, cfg_interval=None, sampler: str | None = None,
                 solver: str | None = None, name: str | None = None):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if name is not None:  # the release's key for the sampler: pushforward_generator_fn, restart_generator_fn
            if SAMPLER_NAMES.get(name, name) != (sampler or SAMPLER_NAMES.get(name, name)):
                raise ValueError(f"name={name!r} and sampler={sampler!r} differ")
            sampler = SAMPLER_NAMES.get(name, name)
        if guidance_scale is not None and cfg_scale is not None and guidance_scale != cfg_scale:
            raise ValueError(f"guidance_scale={guidance_scale} and cfg_scale={cfg_scale} differ (they are one setting)")
        net = self.network.network
        device = self.network.device
        try:
            sampling = self.scheduler.resolve(
                entry, num_inference_steps, whole=name is not None, num_steps=num_steps, discretization=discretization, mid_nt=mid_nt,
                cfg_scale=cfg_scale if cfg_scale is not None else guidance_scale, cfg_interval=cfg_interval,
                sampler=sampler, solver=solver)
        except ValueError as e:  # imm's InputError / ConfigError are ValueErrors: one message, as diffusers raises
            raise ValueError(str(e)) from None
        shape = (net.img_channels, net.img_resolution, net.img_resolution)
        if latents is None:
            if not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
            latents = torch.randn((batch_size, *shape), generator=generator,
                                  device=generator.device if generator is not None else "cpu") * net.sigma_data
        elif not isinstance(latents, torch.Tensor) or latents.ndim != 4 or tuple(latents.shape[1:]) != shape:
            raise ValueError(f"latents must be a tensor [B, {', '.join(map(str, shape))}], got "
                             f"{getattr(latents, 'shape', type(latents).__name__)}")
        labels = self._labels(class_labels, latents.shape[0], generator)
        x = methods.entry_sampler(self.scheduler.config.method)(
            net, latents.to(device, torch.float32), None if labels is None else labels.to(device),
            generator=generator, **sampling.kwargs())
        if output_type == "latent":
            images = x
        else:
            images = self._decode(x, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _labels(self, class_labels, batch: int, generator) -> torch.Tensor | None:
        label_dim = self.network.network.label_dim
        if class_labels is None:
            if not label_dim:
                return None
            return torch.randint(0, label_dim, (batch,), generator=generator,
                                 device=generator.device if generator is not None else "cpu")
        if not label_dim:
            raise ValueError("class_labels given, but the network is unconditional (label_dim 0)")
        labels = torch.as_tensor(class_labels)
        if labels.ndim == 0:
            labels = labels.expand(batch)
        if labels.dtype.is_floating_point or labels.ndim != 1 or labels.shape[0] != batch:
            raise ValueError(f"class_labels must be {batch} integer class ids, got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= label_dim):
            raise ValueError(f"class_labels must lie in [0, {label_dim}); got {labels.tolist()}")
        return labels.long()

    def _decode(self, x: torch.Tensor, output_type: str):
        decoded = self.encoder().decode(x)
        if decoded.dtype != torch.uint8:  # 2-D points of a toy network: no images
            if output_type == "pil":
                raise ValueError("this network makes 2-D points, not images: use output_type 'pt', 'np' or 'latent'")
            return decoded.cpu().numpy() if output_type == "np" else decoded
        if output_type == "pil":
            return [to_pil(a) for a in to_hwc(decoded)]
        images = decoded.float() / 255
        return images.permute(0, 2, 3, 1).cpu().numpy() if output_type == "np" else images
