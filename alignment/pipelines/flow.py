"""The rectified-flow side of the interface, shared by the transformer families (SD3/3.5, FLUX.1, and
the next ones: Qwen-Image, Z-Image, FLUX.2 follow the same process).

Forward process and target, as diffusers' official SD3 and FLUX training scripts
(examples/dreambooth/train_dreambooth_lora_{sd3,flux}.py) compute them:

    u ~ density(weighting_scheme)                       diffusers.training_utils.compute_density_for_timestep_sampling
    t = train_scheduler.timesteps[int(u · T)]           the (shifted, where the config says so) training schedule
    σ = t / T
    x_t = (1 − σ) x₀ + σ ε                              rectified flow
    target = ε − x₀                                     the velocity; the sampler steps x ← x + (σ' − σ) v

`weighting_scheme` is one of ``logit_normal`` (SD3's default: u = sigmoid(N(mean, std))), ``mode``
(SD3 paper's mode sampling with `mode_scale`), ``none``/``uniform`` (FLUX's script default), or
``sigma_sqrt`` / ``cosmap`` (uniform u with the matching loss weights of
`compute_loss_weighting_for_sd3`).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import PipelineAdapter

WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "uniform", "sigma_sqrt", "cosmap")


def calculate_shift(image_seq_len: int, config) -> float:
    """The resolution-dependent shift μ of dynamic-shifting schedulers (the pipelines' `calculate_shift`)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (top - base) / (max_len - base_len)
    return image_seq_len * m + base - m * base_len


class FlowMatchingAdapter(PipelineAdapter):
    """Base of the rectified-flow families (FlowMatchEulerDiscreteScheduler, velocity target)."""

    is_flow = True
    sampling_schedulers = ("FlowMatchEulerDiscreteScheduler",)
    lora_layers_kwarg = "transformer_lora_layers"
    lora_convert_keys = False  # mixing diffusers' old lora.down/up keys with peft keys breaks the loader
    denoiser_attr = "transformer"
    #: the family's training-script default timestep density
    default_weighting_scheme = "logit_normal"

    def __init__(
        self, pipe, weighting_scheme: str | None = None, logit_mean: float = 0.0, logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ) -> None:
        super().__init__(pipe)
        self.configure_timesteps(weighting_scheme or self.default_weighting_scheme, logit_mean, logit_std, mode_scale)

    def configure_timesteps(
        self, weighting_scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29
    ) -> None:
        """Choose the training timestep density (the scripts' ``--weighting_scheme`` and its parameters)."""
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}; got {weighting_scheme!r}.")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0; got {logit_std}.")
        self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale = (
            weighting_scheme, float(logit_mean), float(logit_std), float(mode_scale))

    @property
    def default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * self.vae_scale

    @property
    def noise_scheduler(self):
        """A fresh FlowMatchEulerDiscreteScheduler from the pipeline's config: its `timesteps` are the
        training schedule the official scripts index with u (shifted unless the config shifts
        dynamically, as FLUX's does)."""
        if self._noise_scheduler is None:
            from diffusers import FlowMatchEulerDiscreteScheduler

            self._noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        return self._noise_scheduler

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        scheme = "none" if self.weighting_scheme in ("uniform", "sigma_sqrt", "cosmap") else self.weighting_scheme
        u = compute_density_for_timestep_sampling(
            weighting_scheme=scheme, batch_size=batch, logit_mean=self.logit_mean, logit_std=self.logit_std,
            mode_scale=self.mode_scale, generator=generator,
        )
        n = self.num_train_timesteps
        indices = (u * n).long().clamp(0, n - 1)  # sigmoid can round to 1.0 in fp32
        return self.noise_scheduler.timesteps[indices].to(device or self.device)

    def sigmas(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ = t / T, shaped to broadcast against `like`."""
        sigma = torch.as_tensor(timesteps, device=like.device).float() / self.num_train_timesteps
        sigma = sigma.reshape(-1) if sigma.ndim else sigma.reshape(1)
        return sigma.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = (1 − σ) x₀ + σ ε."""
        s = self.sigmas(timesteps, latents)
        return (1.0 - s) * latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity ε − x₀ (dx_t/dσ)."""
        return noise - latents

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigma = torch.as_tensor(timesteps).float().reshape(-1) / self.num_train_timesteps
        return compute_loss_weighting_for_sd3(self.weighting_scheme, sigma).float()

    def predicted_x0(self, x_t, pred, t, scheduler) -> torch.Tensor:
        """x̂₀ = x_t − σ·v (one Euler step from σ to 0)."""
        return x_t - self.sigmas(t, x_t) * pred

    def renoise(self, scheduler, latents, noise, t) -> torch.Tensor:
        return self.add_noise(latents, noise, t)

    # sampling schedule --------------------------------------------------------------------------------

    def image_seq_len(self, resolution: int) -> int:
        """Tokens the transformer sees for a square image of `resolution` pixels (for μ)."""
        side = resolution // self.resolution_multiple
        return side * side

    def inference_sigmas(self, num_steps: int):
        """Explicit σ schedule the pipeline passes to the scheduler (None: the scheduler's own)."""
        return None

    def set_timesteps(self, scheduler, num_steps: int, resolution: int | None = None) -> None:
        kw = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kw["mu"] = calculate_shift(self.image_seq_len(resolution or self.default_resolution), scheduler.config)
        sigmas = self.inference_sigmas(num_steps)
        if sigmas is not None:
            scheduler.set_timesteps(sigmas=np.asarray(sigmas, dtype=np.float32), device=self.device, **kw)
        else:
            scheduler.set_timesteps(num_steps, device=self.device, **kw)
