"""FLUX.1 (`FluxPipeline`): CLIP pooled + T5 tokens, a double/single-stream transformer on 2x2-packed
latent tokens with rotary image/text ids, a distilled guidance embedding instead of CFG (dev)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .base import PromptEmbeds, register_family
from .flow import FlowMatchingAdapter


@register_family
class FluxAdapter(FlowMatchingAdapter):
    """FLUX.1 dev/schnell. Latents stay (B, C, h, w) outside; `predict` packs them into (B, hw/4, 4C)
    tokens with their image ids, calls the transformer with timestep σ (= t/1000) and the guidance
    embedding, and unpacks the velocity.

    Training defaults follow diffusers' `train_dreambooth_lora_flux.py`: uniform u over the (unshifted:
    FLUX shifts dynamically at sampling) training schedule, the guidance embedding set to 3.5.
    Guidance-distilled: no classifier-free guidance (`uses_cfg = False`); a sampler's
    `guidance_scale` goes into the embedding.
    """

    family = "flux"
    pipeline_classes = ("FluxPipeline",)
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    uses_cfg = False
    default_weighting_scheme = "none"
    lora_target_modules = (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )
    #: T5 tokens (the pipeline's default is 512)
    max_sequence_length = 512
    #: FSDP units: the 19 double-stream and 38 single-stream blocks of FLUX.1 (~0.34 / 0.14 B parameters each)
    fsdp_block_classes = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    #: value of the distilled guidance embedding during training (the script's --guidance_scale)
    train_guidance = 3.5

    @property
    def has_guidance_embeds(self) -> bool:
        return bool(self.denoiser.config.get("guidance_embeds", False))

    @property
    def resolution_multiple(self) -> int:
        return self.vae_scale * 2  # 2x2 packing

    def image_seq_len(self, resolution: int) -> int:
        side = resolution // self.resolution_multiple
        return side * side

    def inference_sigmas(self, num_steps: int):
        return np.linspace(1.0, 1.0 / num_steps, num_steps)  # FluxPipeline.__call__'s schedule

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> PromptEmbeds:
        prompts = list(prompts)
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        cond = PromptEmbeds(embeds, pooled, shared={"text_ids": text_ids})
        return self.with_guidance(cond, self.train_guidance)

    def with_guidance(self, cond: PromptEmbeds, guidance_scale: float) -> PromptEmbeds:
        if not self.has_guidance_embeds:
            return cond
        g = torch.full((len(cond),), float(guidance_scale), device=cond.embeds.device, dtype=torch.float32)
        return PromptEmbeds(cond.embeds, cond.pooled, cond.time_ids, {**cond.extra, "guidance": g}, dict(cond.shared))

    def negative_embeds(self, cond: PromptEmbeds) -> PromptEmbeds | None:
        return None

    def predict(self, latents, t, cond, model=None) -> torch.Tensor:
        from diffusers import FluxPipeline

        model = model if model is not None else self.denoiser
        b, c, h, w = latents.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX latents need even sides (2x2 packing); got {h}x{w}.")
        packed = FluxPipeline._pack_latents(latents, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        t = torch.as_tensor(t, device=latents.device).reshape(-1).expand(b).to(latents.dtype)
        guidance = cond.extra.get("guidance")
        out = model(
            hidden_states=packed, timestep=t / 1000, guidance=guidance, pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds, txt_ids=cond.shared["text_ids"], img_ids=img_ids, return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, h * self.vae_scale, w * self.vae_scale, self.vae_scale)

    def pipeline_latents(self, latents: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """FluxPipeline's ``output_type="latent"`` gives packed (B, hw/4, 4C) tokens: unpack them."""
        if latents.ndim == 4:
            return latents
        from diffusers import FluxPipeline

        height, width = height or self.default_resolution, width or self.default_resolution
        return FluxPipeline._unpack_latents(latents, height, width, self.vae_scale)

    @classmethod
    def tiny_pipeline(
        cls, seed: int = 0, sample_size: int = 16, prediction_type: str | None = None, guidance_embeds: bool = True
    ):
        from ..tiny import tiny_flux_pipeline

        return tiny_flux_pipeline(seed=seed, sample_size=sample_size, guidance_embeds=guidance_embeds)
