"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): two CLIP encoders + T5, an MMDiT transformer,
rectified flow with a shifted σ schedule, classifier-free guidance."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import PromptEmbeds, register_family
from .flow import FlowMatchingAdapter


@register_family
class SD3Adapter(FlowMatchingAdapter):
    """SD3/3.5: token embeddings (CLIP-L ⊕ CLIP-G padded, then T5 along the sequence) and the pooled
    CLIP projections; the transformer gets the timestep σ·1000 as the scheduler holds it.

    Training defaults follow diffusers' `train_dreambooth_lora_sd3.py`: logit-normal(0, 1) timesteps
    over the shifted training schedule, LoRA on the joint attention's projections.
    """

    family = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    text_encoder_attrs = ("text_encoder", "text_encoder_2", "text_encoder_3")
    default_weighting_scheme = "logit_normal"
    lora_target_modules = (
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
    )
    #: T5 tokens (the pipeline's default)
    max_sequence_length = 256
    #: FSDP units: the joint (MM-DiT) blocks, 24 in SD3.5-M
    fsdp_block_classes = ("JointTransformerBlock",)

    @property
    def resolution_multiple(self) -> int:
        return self.vae_scale * self.denoiser.config.patch_size

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> PromptEmbeds:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(embeds, pooled)

    def predict(self, latents, t, cond, model=None) -> torch.Tensor:
        model = model if model is not None else self.denoiser
        t = torch.as_tensor(t, device=latents.device).reshape(-1).expand(latents.shape[0])
        return model(
            hidden_states=latents, timestep=t, encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled, return_dict=False,
        )[0]

    @classmethod
    def tiny_pipeline(cls, seed: int = 0, sample_size: int = 16, prediction_type: str | None = None):
        from ..tiny import tiny_sd3_pipeline

        return tiny_sd3_pipeline(seed=seed, sample_size=sample_size)
