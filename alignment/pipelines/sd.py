"""Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`): one CLIP text encoder, a UNet, ε or v."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import PromptEmbeds, register_family
from .ddpm import DDPMAdapter


@register_family
class SDAdapter(DDPMAdapter):
    """SD 1.x/2.x: CLIP token embeddings into the UNet's cross-attention."""

    family = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> PromptEmbeds:
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return PromptEmbeds(embeds)

    @classmethod
    def tiny_pipeline(cls, seed: int = 0, sample_size: int = 16, prediction_type: str | None = None):
        from ..tiny import tiny_sd_pipeline

        return tiny_sd_pipeline(seed=seed, sample_size=sample_size, prediction_type=prediction_type or "epsilon")
