"""The DDPM side of the interface, shared by the UNet families (SD 1.x/2.x, SDXL): ε / v targets,
uniform integer training timesteps, and schedulers rebuilt from the pipeline's config."""

from __future__ import annotations

import inspect

import torch

from .base import PipelineAdapter

DDPM_SAMPLING_SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
)


def scheduler_from_config(scheduler_cls, config, **overrides):
    """`scheduler_cls.from_config(config)` with `clip_sample` set explicitly.

    DDPM and DDIM default to ``clip_sample=True`` when the config lacks the key (an Euler config,
    SDXL's default, has none), which clips x̂₀ to [-1, 1] in *latent* space. SD and SDXL latents are
    not bounded by 1 and their pipelines never clip, so the pipeline config's value is used and absent
    means False.
    """
    if "clip_sample" in inspect.signature(scheduler_cls.__init__).parameters:
        overrides.setdefault("clip_sample", bool(config.get("clip_sample", False)))
    return scheduler_cls.from_config(config, **overrides)


class DDPMAdapter(PipelineAdapter):
    """Base of the UNet families: DDPM forward process, uniform timesteps, ε or v-prediction target."""

    sampling_schedulers = DDPM_SAMPLING_SCHEDULERS
    #: FSDP units: the UNet's attention and residual blocks
    fsdp_block_classes = ("BasicTransformerBlock", "ResnetBlock2D")

    @property
    def default_resolution(self) -> int:
        return self.denoiser.config.sample_size * self.vae_scale

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    @property
    def resolution_multiple(self) -> int:
        # the UNet halves the latent once per down block after the first
        return self.vae_scale * 2 ** (len(self.denoiser.config.down_block_types) - 1)

    @property
    def noise_scheduler(self):
        """DDPM over the pipeline scheduler's config: the training forward process q(x_t | x_0).

        Training must not noise with the sampler: Euler's `add_noise` gives `x + sigma * eps` (SDXL's
        default scheduler) and, after a sampling run, uses its end-of-schedule sigma; diffusers' training
        scripts use DDPM for the same reason.
        """
        if self._noise_scheduler is None:
            from diffusers import DDPMScheduler

            self._noise_scheduler = scheduler_from_config(DDPMScheduler, self.scheduler.config)
        return self._noise_scheduler

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """t ~ U{0, ..., T−1}, as diffusers' SD/SDXL training scripts draw it."""
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator)
        return t.to(device or self.device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at integer training timesteps."""
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet regresses: the noise (epsilon) or the velocity (v-prediction)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}; use epsilon or v_prediction.")

    def predict(self, latents, t, cond, model=None) -> torch.Tensor:
        model = model if model is not None else self.denoiser
        return model(latents, t, **cond.unet_kwargs(), return_dict=False)[0]

    def predicted_x0(self, x_t, pred, t, scheduler) -> torch.Tensor:
        """x̂₀ from ε or v at an integer timestep (the schedulers' own `pred_original_sample` formula)."""
        abar = self.noise_scheduler.alphas_cumprod.to(x_t.device)[t.long()].float()
        a, s = abar.sqrt(), (1 - abar).sqrt()
        if self.prediction_type == "epsilon":
            return (x_t - s * pred) / a
        return a * x_t - s * pred
