"""SDXL (`StableDiffusionXLPipeline`): two CLIP text encoders, pooled embeds and size/crop micro-conditioning."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import PromptEmbeds, register_family
from .ddpm import DDPMAdapter


@register_family
class SDXLAdapter(DDPMAdapter):
    """SDXL: token embeddings of both encoders, the second's pooled projection and `time_ids`
    (original size, crop, target size; here square `resolution`, no crop)."""

    family = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    text_encoder_attrs = ("text_encoder", "text_encoder_2")

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> PromptEmbeds:
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        res = resolution or self.default_resolution
        te2 = self.pipe.text_encoder_2
        proj_dim = te2.config.projection_dim if te2 is not None else None
        time_ids = self.pipe._get_add_time_ids((res, res), (0, 0), (res, res), embeds.dtype, proj_dim)
        return PromptEmbeds(embeds, pooled, time_ids.to(self.device).repeat(len(prompts), 1))

    def negative_embeds(self, cond: PromptEmbeds) -> PromptEmbeds | None:
        """Zeros for pipelines with ``force_zeros_for_empty_prompt`` (SDXL base), else the empty prompt."""
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            return PromptEmbeds(torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled), cond.time_ids)
        return super().negative_embeds(cond)

    @classmethod
    def tiny_pipeline(cls, seed: int = 0, sample_size: int = 16, prediction_type: str | None = None):
        from ..tiny import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline(seed=seed, sample_size=sample_size, prediction_type=prediction_type or "epsilon")
