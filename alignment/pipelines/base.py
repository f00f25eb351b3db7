"""The interface every model family implements, and the registry that maps pipeline classes to families.

A family adapter owns everything that differs between model families: prompt encoding, the denoiser
call (UNet or transformer), the training forward process and its regression target, the training
timestep distribution, the sampling schedule, and VAE encode/decode. Trainers, the sampling loop,
best-of-N and pair mining talk to a pipeline only through an adapter, so a new family is one file
that subclasses `PipelineAdapter` and decorates itself with `@register_family`.

Latents are always (B, C, h, w) image-shaped tensors at the adapter boundary; a family whose
denoiser wants tokens (FLUX) packs and unpacks inside `predict`. Timesteps are in the units of the
family's scheduler (`scheduler.timesteps`): integer DDPM steps for SD/SDXL, σ·1000 for flow models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

_FAMILIES: dict[str, type[PipelineAdapter]] = {}


def register_family(cls: type[PipelineAdapter]) -> type[PipelineAdapter]:
    """Class decorator: make `cls` the adapter for the pipeline classes named in `cls.pipeline_classes`.

    Raises:
        ValueError: a family name or pipeline class that another adapter already claims.

    Example:
        >>> @register_family
        ... class QwenImageAdapter(FlowMatchingAdapter):
        ...     family = "qwen_image"
        ...     pipeline_classes = ("QwenImagePipeline",)
    """
    if not cls.family or not cls.pipeline_classes:
        raise ValueError(f"{cls.__name__} must set `family` and `pipeline_classes` to be registered.")
    if cls.family in _FAMILIES and _FAMILIES[cls.family] is not cls:
        raise ValueError(f"model family {cls.family!r} is already registered by {_FAMILIES[cls.family].__name__}.")
    claimed = {name: fam for fam, c in _FAMILIES.items() if c is not cls for name in c.pipeline_classes}
    for name in cls.pipeline_classes:
        if name in claimed:
            raise ValueError(f"pipeline class {name} is already handled by family {claimed[name]!r}.")
    _FAMILIES[cls.family] = cls
    return cls


def families() -> dict[str, type[PipelineAdapter]]:
    """Registered families: name -> adapter class (a copy)."""
    return dict(_FAMILIES)


def supported_pipeline_classes() -> tuple[str, ...]:
    """Every pipeline class name some registered family handles."""
    return tuple(name for cls in _FAMILIES.values() for name in cls.pipeline_classes)


def adapter_class(pipe_or_family) -> type[PipelineAdapter]:
    """The adapter class for a pipeline (matched on its class and base classes) or a family name.

    Raises:
        TypeError: an unsupported pipeline class (the message names the supported ones).
        ValueError: an unknown family name.
    """
    if isinstance(pipe_or_family, str):
        if pipe_or_family not in _FAMILIES:
            raise ValueError(f"unknown model family {pipe_or_family!r}; registered: {sorted(_FAMILIES)}.")
        return _FAMILIES[pipe_or_family]
    by_class = {name: cls for cls in _FAMILIES.values() for name in cls.pipeline_classes}
    for klass in type(pipe_or_family).__mro__:  # most derived first: a subclass of a supported class works
        if klass.__name__ in by_class:
            return by_class[klass.__name__]
    raise TypeError(
        f"unsupported pipeline class {type(pipe_or_family).__name__}; supported: "
        f"{', '.join(supported_pipeline_classes())} (load one with diffusers' from_pretrained)."
    )


def check_pipeline(pipe) -> str:
    """The pipeline's family name ('sd', 'sdxl', 'sd3', 'flux', ...); TypeError for unsupported classes."""
    return adapter_class(pipe).family


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch.

    Attributes:
        embeds: (B, L, D) token embeddings.
        pooled: (B, D') pooled embeddings (SDXL, SD3, FLUX) or None.
        time_ids: (B, 6) SDXL micro-conditioning or None.
        extra: other per-row tensors a family needs (first dim B), e.g. FLUX's ``guidance``; they follow
            `cat` and `repeat`.
        shared: tensors common to all rows (e.g. FLUX's ``text_ids``, (L, 3)); copied as they are.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)

    def unet_kwargs(self) -> dict:
        """Keyword arguments of diffusers' UNet2DConditionModel (SD and SDXL)."""
        kw = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kw

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn, other: PromptEmbeds | None = None) -> PromptEmbeds:
        def f(a, b):
            return None if a is None else (fn(a) if other is None else fn(a, b))

        o = other or self
        return PromptEmbeds(
            f(self.embeds, o.embeds), f(self.pooled, o.pooled), f(self.time_ids, o.time_ids),
            {k: f(v, o.extra.get(k)) for k, v in self.extra.items()}, dict(self.shared),
        )

    def cat(self, other: PromptEmbeds) -> PromptEmbeds:
        """Concatenate along the batch (classifier-free guidance: [uncond, cond])."""
        return self._map(lambda a, b: torch.cat([a, b]), other)

    def repeat(self, n: int) -> PromptEmbeds:
        """Each row repeated n times in place (row i -> rows i*n ... i*n+n-1)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def select(self, index: torch.Tensor | slice) -> PromptEmbeds:
        """The rows at `index`."""
        return self._map(lambda t: t[index])


class PipelineAdapter:
    """Uniform access to a diffusers pipeline of a supported family.

    `PipelineAdapter(pipe)` returns the registered family's adapter (`SDAdapter`, `SDXLAdapter`,
    `SD3Adapter`, `FluxAdapter`, ...). Subclasses set the class attributes and implement the methods
    that raise `NotImplementedError` here.

    Example:
        >>> ad = PipelineAdapter(pipe)
        >>> cond = ad.encode_prompts(["a cat"])
        >>> t = ad.sample_timesteps(1, generator)
        >>> x_t = ad.add_noise(x0, noise, t); loss = ((ad.predict(x_t, t, cond) - ad.target(x0, noise, t)) ** 2).mean()
        >>> images = ad.decode(latents)     # (B, 3, H, W) in [0, 1]
    """

    #: family name used in configs and settings files ("sd", "sdxl", "sd3", "flux", ...)
    family: str = ""
    #: diffusers pipeline class names this adapter handles (subclasses of them match too)
    pipeline_classes: tuple[str, ...] = ()
    #: attribute of the pipeline holding the denoiser ("unet" or "transformer")
    denoiser_attr: str = "unet"
    #: text encoders to freeze (attribute names on the pipeline)
    text_encoder_attrs: tuple[str, ...] = ("text_encoder",)
    #: rectified flow (x_t = (1-σ)x0 + σε, velocity target) rather than DDPM
    is_flow: bool = False
    #: classifier-free guidance with a second (unconditional) pass; False for guidance-distilled models
    uses_cfg: bool = True
    #: default peft LoRA target modules on the denoiser (diffusers' training scripts' choice)
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    #: scheduler class names the gradient sampling loop supports for this family
    sampling_schedulers: tuple[str, ...] = ()
    #: keyword of the pipeline class's `save_lora_weights` for the denoiser's layers
    lora_layers_kwarg: str = "unet_lora_layers"
    #: denoiser block classes that become one FSDP unit each under ``train.distributed: fsdp`` (empty: the
    #: denoiser's own ``_no_split_modules``, accelerate's default)
    fsdp_block_classes: tuple[str, ...] = ()

    def __new__(cls, pipe=None, *args, **kwargs):
        if cls is PipelineAdapter:
            cls = adapter_class(pipe)
        return super().__new__(cls)

    def __init__(self, pipe) -> None:
        if type(self) is not adapter_class(pipe):
            raise TypeError(f"{type(self).__name__} cannot adapt a {type(pipe).__name__}; use PipelineAdapter(pipe).")
        self.pipe = pipe
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self._noise_scheduler = None

    # ---- components -------------------------------------------------------------------------------

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network trained by every method: the UNet or the transformer."""
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def unet_model(self) -> torch.nn.Module:
        """Alias of `denoiser` (kept for code written against SD/SDXL)."""
        return self.denoiser

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (the VAE's downsampling factor)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def resolution_multiple(self) -> int:
        """Image sides must be multiples of this (VAE downsampling times the denoiser's own)."""
        return self.vae_scale

    @property
    def default_resolution(self) -> int:
        raise NotImplementedError

    @property
    def prediction_type(self) -> str:
        """``epsilon`` / ``v_prediction`` (DDPM families) or ``flow`` (velocity ε − x0)."""
        return "flow" if self.is_flow else self.scheduler.config.get("prediction_type", "epsilon")

    # ---- text ---------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> PromptEmbeds:
        """Text conditioning for `prompts` (the text encoders are frozen: no gradient)."""
        raise NotImplementedError

    def negative_embeds(self, cond: PromptEmbeds) -> PromptEmbeds | None:
        """Unconditional embeddings for classifier-free guidance, as the pipeline builds them (the empty
        prompt); None for families without CFG."""
        if not self.uses_cfg:
            return None
        neg = self.encode_prompts([""] * len(cond))
        if cond.time_ids is not None:
            neg.time_ids = cond.time_ids
        return neg

    def with_guidance(self, cond: PromptEmbeds, guidance_scale: float) -> PromptEmbeds:
        """Conditioning with a distilled guidance value (FLUX-dev); unchanged for other families."""
        return cond

    # ---- denoiser -----------------------------------------------------------------------------------

    def predict(self, latents: torch.Tensor, t: torch.Tensor | float, cond: PromptEmbeds, model=None) -> torch.Tensor:
        """The denoiser's prediction (ε, v or flow velocity, per family) for noisy (B, C, h, w) `latents`
        at scheduler timestep `t`; `model` replaces the pipeline's denoiser (e.g. the LoRA-wrapped one)."""
        raise NotImplementedError

    def unet(self, latents: torch.Tensor, t, cond: PromptEmbeds, unet=None) -> torch.Tensor:
        """Alias of `predict` (kept for code written against SD/SDXL)."""
        return self.predict(latents, t, cond, model=unet)

    # ---- training forward process ---------------------------------------------------------------------

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    @property
    def noise_scheduler(self):
        """The training scheduler q(x_t | x_0) (a copy built from the pipeline's config)."""
        raise NotImplementedError

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training timesteps (B,) from the family's training distribution, in scheduler units."""
        raise NotImplementedError

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The training forward process x_t given x_0 = `latents` and ε = `noise`."""
        raise NotImplementedError

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser regresses at x_t."""
        raise NotImplementedError

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample weights (B,) of the denoising loss (ones unless the family's recipe weights it)."""
        return torch.ones(timesteps.shape[0], device=timesteps.device)

    # ---- sampling -------------------------------------------------------------------------------------

    def set_timesteps(self, scheduler, num_steps: int, resolution: int | None = None) -> None:
        """Prepare `scheduler` for `num_steps` sampling steps as the pipeline's own `__call__` does."""
        scheduler.set_timesteps(num_steps, device=self.device)

    def predicted_x0(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, scheduler) -> torch.Tensor:
        """The one-step estimate of the clean latent from a prediction at x_t."""
        raise NotImplementedError

    def renoise(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sampling-schedule noising of clean `latents` to timestep `t` (DRaFT-LV)."""
        return scheduler.add_noise(latents, noise, t.reshape(1).expand(latents.shape[0]))

    def pipeline_latents(self, latents: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """What the pipeline returns with ``output_type="latent"`` -> (B, C, h, w) latents for `decode`
        (FLUX unpacks its tokens; image-shaped families return them as they are)."""
        return latents

    # ---- VAE ------------------------------------------------------------------------------------------

    def _latent_stats(self, like: torch.Tensor):
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return None, None
        shape = (1, -1, 1, 1)
        return torch.tensor(mean).view(shape).to(like), torch.tensor(std).view(shape).to(like)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], differentiable; what the pipeline's `output_type="pt"` returns.

        Undoes `encode_images`: z = latents·std/scaling + mean (VAEs with `latents_mean`/`latents_std`,
        else latents/scaling), then + `shift_factor` where the VAE has one (SD3/FLUX). Runs outside autocast, in the VAE's own
        dtype, except that an fp16 VAE whose config says `force_upcast` (SDXL's: it overflows in fp16)
        decodes in fp32, as diffusers' pipelines do.
        """
        vae, cfg = self.vae, self.vae.config
        mean, std = self._latent_stats(latents)
        z = latents * std / cfg.scaling_factor + mean if mean is not None else latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        upcast = vae.dtype == torch.float16 and getattr(cfg, "force_upcast", False)
        with torch.autocast(device_type=z.device.type, enabled=False):
            if upcast:
                vae.to(torch.float32)
            try:
                img = vae.decode(z.to(vae.dtype), return_dict=False)[0]
            finally:
                if upcast:
                    vae.to(torch.float16)
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """Images in [0, 1] -> latents in the denoiser's space, the exact inverse of `decode`:
        z' = z − shift_factor (where present: SD3/FLUX), then (z' − latents_mean)·scaling/latents_std
        where the VAE has them (SDXL-family VAEs such as Playground's), else z'·scaling. `z` is a sample
        of the VAE posterior, or its mean (`sample=False`)."""
        cfg = self.vae.config
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        if getattr(cfg, "shift_factor", None):
            z = z - cfg.shift_factor
        mean, std = self._latent_stats(z)
        if mean is not None:
            return (z - mean) * cfg.scaling_factor / std
        return z * cfg.scaling_factor

    # ---- LoRA export ----------------------------------------------------------------------------------

    #: convert peft's LoRA keys to diffusers' (the SD/SDXL scripts do; the SD3/FLUX scripts save peft keys)
    lora_convert_keys: bool = True

    @classmethod
    def save_lora(cls, pipeline_class, out_dir, state: dict, metadata: dict, weight_name: str) -> None:
        """Write the denoiser's LoRA `state` (peft keys) with the pipeline class's `save_lora_weights`,
        in the key format the family's official training script writes."""
        if cls.lora_convert_keys:
            from diffusers.utils import convert_state_dict_to_diffusers

            converted = convert_state_dict_to_diffusers(state)
            # diffusers' peft -> diffusers map knows only the attention projections (to_q/k/v/out.0): with
            # other targets (proj_in, proj_out, ff) the result mixes both key formats, and the loaders,
            # which pick the format from the first key, then silently load only part of the adapter.
            # A mixed result is written in peft's format instead, which every diffusers loader reads whole.
            if not any(".lora_A." in k or ".lora_B." in k for k in converted):
                state = converted
        kw = {cls.lora_layers_kwarg: state, cls.lora_layers_kwarg.replace("_layers", "_adapter_metadata"): metadata}
        pipeline_class.save_lora_weights(out_dir, weight_name=weight_name, **kw)

    @classmethod
    def tiny_pipeline(cls, seed: int = 0, **kwargs):
        """A random tiny pipeline of this family (real classes) for tests and the offline demo."""
        raise NotImplementedError(f"family {cls.family!r} has no tiny pipeline builder.")
