"""Tiny diffusers pipelines built from configs (random weights), for tests and the offline demo:
SD 1.x, SDXL, SD3 and FLUX.1.

They have the real component classes (UNet2DConditionModel / SD3Transformer2DModel /
FluxTransformer2DModel, AutoencoderKL, CLIP and T5 encoders, DDIM / FlowMatchEuler schedulers), so
everything that works on them works on the real checkpoints; `save_tiny_pipeline` writes them with
`save_pretrained` so the real `from_pretrained` path is exercised. Sizes follow the smallest configs
diffusers' own pipeline tests use.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from reward_plugins.testing import seeded
from reward_plugins.tokenization import tiny_clip_tokenizer


def _text_config(projection_dim: int | None = None) -> CLIPTextConfig:
    tok = tiny_clip_tokenizer()
    kw = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, layer_norm_eps=1e-5,
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=2, pad_token_id=tok.pad_token_id,
        max_position_embeddings=77, **kw,
    )


def _vae(latent_channels: int = 4, flow: bool = False):
    """AutoencoderKL with 2x downsampling; the flow models' VAE has SD3/FLUX's shift and scale and no
    quant convs (as theirs)."""
    from diffusers import AutoencoderKL

    kw = dict(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False) if flow else {}
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, layers_per_block=1, sample_size=32, **kw,
    )


def tiny_t5_tokenizer():
    """A real T5 (Unigram, sentencepiece-style) tokenizer with a tiny character vocabulary, offline."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -1.5) for c in string.ascii_lowercase]
    tk = Tokenizer(models.Unigram(pieces, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tiny_t5_tokenizer()), d_model=d_model, d_ff=37, d_kv=8, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0,
    )).eval()


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def tiny_sd_pipeline(seed: int = 0, sample_size: int = 16, prediction_type: str = "epsilon"):
    """A random tiny `StableDiffusionPipeline`: latents `sample_size`^2, images 2x that (32 px default)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    with seeded(seed):
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
        )
        vae = _vae()
        text_encoder = CLIPTextModel(_text_config())
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(), scheduler=_scheduler(prediction_type),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 16, prediction_type: str = "epsilon"):
    """A random tiny `StableDiffusionXLPipeline` (two text encoders, text_time added conditioning)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    with seeded(seed):
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=8,
        )
        vae = _vae()
        te1 = CLIPTextModel(_text_config())
        te2 = CLIPTextModelWithProjection(_text_config(projection_dim=32))
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(), scheduler=_scheduler(prediction_type), force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0, sample_size: int = 16):
    """A random tiny `StableDiffusion3Pipeline`: CLIP-L, CLIP-G and T5 encoders, a one-layer MMDiT,
    the SD3 VAE scale/shift and SD3's shifted FlowMatchEuler scheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
            out_channels=4,
        )
        vae = _vae(4, flow=True)
        te1 = CLIPTextModelWithProjection(_text_config(projection_dim=32))
        te2 = CLIPTextModelWithProjection(_text_config(projection_dim=32))
        te3 = _t5(64)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=te1, tokenizer=tiny_clip_tokenizer(), text_encoder_2=te2, tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=te3, tokenizer_3=tiny_t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, sample_size: int = 16, guidance_embeds: bool = True):
    """A random tiny `FluxPipeline` (FLUX.1-dev layout: guidance embedding; ``guidance_embeds=False`` is
    schnell's): CLIP + T5, one double- and one single-stream block, FLUX's dynamic-shift scheduler.
    `sample_size` sets the pipeline's default latent side (not saved by `save_pretrained`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
            axes_dims_rope=[4, 4, 8],
        )
        vae = _vae(4, flow=True)
        te1 = CLIPTextModel(_text_config())
        te2 = _t5(32)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=te1, tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=te2, tokenizer_2=tiny_t5_tokenizer(),
    )
    pipe.default_sample_size = sample_size  # latent side of the default size (FluxPipeline: 128)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_families() -> tuple[str, ...]:
    """Families with a tiny builder (every registered family that implements `tiny_pipeline`)."""
    from alignment.pipelines import PipelineAdapter, families

    return tuple(n for n, c in families().items() if c.tiny_pipeline.__func__ is not PipelineAdapter.tiny_pipeline.__func__)


def tiny_pipeline(family: str = "sd", seed: int = 0, **kwargs):
    """A random tiny pipeline of a registered `family` (``sd``, ``sdxl``, ``sd3``, ``flux``, ...)."""
    from alignment.pipelines import adapter_class

    if family not in tiny_families():
        raise ValueError(f"no tiny pipeline for family {family!r}; available: {list(tiny_families())}.")
    return adapter_class(family).tiny_pipeline(seed=seed, **kwargs)


def save_tiny_pipeline(
    path: str | os.PathLike, sdxl: bool = False, seed: int = 0, family: str | None = None, **kwargs
) -> Path:
    """Write a tiny pipeline with `save_pretrained`; load it back with `DiffusionPipeline.from_pretrained`."""
    pipe = tiny_pipeline(family or ("sdxl" if sdxl else "sd"), seed=seed, **kwargs)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def load_pipeline(source: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """`DiffusionPipeline.from_pretrained` for a dir or hub id, with a clear error and no safety checker."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(str(source), dtype=dtype)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"cannot load a diffusers pipeline from {str(source)!r} ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Pass a local dir written by save_pretrained or a cached hub id such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5."
        ) from None
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
