"""The transformers CLIP that every CLIP-family reward runs on, with its configs and feature helpers.

LeScore, MPS, PickScore and HPS all use the ViT-H/14 architecture of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`; CLIPScore and the aesthetic predictor use OpenAI's ViT-L/14.
Their configs are written out here (values from the official config files), so building the
architecture needs no hub; the tokenizer still comes from `backbone=` or a BPE file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

from . import clip_cpu_inference
from .tokenization import clip_tokenizer_from_bpe, load_tokenizer, tiny_clip_tokenizer

LAION_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_L14 = "openai/clip-vit-large-patch14"


def _config(text: dict, vision: dict, projection_dim: int, act: str) -> CLIPConfig:
    text = {"hidden_act": act, "layer_norm_eps": 1e-5, "max_position_embeddings": 77, "vocab_size": 49408,
            "bos_token_id": 49406, "eos_token_id": 2, "pad_token_id": 1, **text}
    vision = {"hidden_act": act, "layer_norm_eps": 1e-5, "image_size": 224, "patch_size": 14, **vision}
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    cfg.logit_scale_init_value = 2.6592
    return cfg


def vit_h14_config() -> CLIPConfig:
    """laion/CLIP-ViT-H-14-laion2B-s32B-b79K: exact GELU, vision 1280x32, text 1024x24, projection 1024."""
    return _config(
        text={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
        vision={"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16},
        projection_dim=1024, act="gelu",
    )


def vit_l14_config() -> CLIPConfig:
    """openai/clip-vit-large-patch14: quick_gelu, vision 1024x24, text 768x12, projection 768."""
    return _config(
        text={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        vision={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
        projection_dim=768, act="quick_gelu",
    )


def tiny_clip_config(act: str = "gelu", projection_dim: int = 32, vocab_size: int = 521) -> CLIPConfig:
    """A tiny CLIP with real input geometry (224 px, 77 tokens) for tests and the offline demo."""
    cfg = _config(
        text={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": vocab_size, "bos_token_id": vocab_size - 2},
        vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "patch_size": 32},
        projection_dim=projection_dim, act=act,
    )
    return cfg


KNOWN_CONFIGS = {LAION_H14: vit_h14_config, OPENAI_L14: vit_l14_config}


def clip_config(backbone: str | os.PathLike | CLIPConfig) -> CLIPConfig:
    """A CLIPConfig from a config object, a known hub id (built in, no network) or a model dir/hub id."""
    if isinstance(backbone, CLIPConfig):
        return backbone
    if str(backbone) in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[str(backbone)]()
    try:
        return CLIPConfig.from_pretrained(str(backbone))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"cannot read a CLIP config from backbone={str(backbone)!r} ({type(e).__name__}). Pass a local "
            f"CLIP model dir, a cached hub id, or one of {sorted(KNOWN_CONFIGS)}."
        ) from None


def clip_tokenizer(backbone: str | os.PathLike | None, tokenizer: str | os.PathLike | None = None):
    """The CLIP tokenizer: `tokenizer=` a BPE .txt.gz file or tokenizer dir, else the backbone's."""
    if tokenizer is not None:
        p = Path(tokenizer)
        if p.is_file():
            return clip_tokenizer_from_bpe(p)
        return load_tokenizer(tokenizer)
    if backbone is None:
        return tiny_clip_tokenizer()
    return load_tokenizer(backbone)


def build_clip(config: CLIPConfig) -> CLIPModel:
    """A randomly initialised transformers CLIPModel (SDPA attention), in float32."""
    config._attn_implementation = "sdpa"
    return CLIPModel(config).float()


def load_hf_clip(path: str | os.PathLike) -> CLIPModel:
    """`CLIPModel.from_pretrained` (dir or hub id) with an error that says what to pass."""
    try:
        return CLIPModel.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"cannot load a CLIPModel from {str(path)!r} ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Pass a local dir written by save_pretrained, or a hub id in your cache."
        ) from None


def image_embeds(model: CLIPModel | CLIPVisionModelWithProjection, pixels: torch.Tensor) -> torch.Tensor:
    """visual_projection(post_layernorm(CLS)): the standard CLIP image embedding, (B, P).

    Scoring in bf16 on CPU (no gradients) runs the tower on `clip_cpu_inference`'s fused path.
    """
    vision = model.vision_model
    if clip_cpu_inference.applies(vision, pixels):
        return model.visual_projection(clip_cpu_inference.vision_forward(vision, pixels, pooled=True))
    return model.visual_projection(vision(pixel_values=pixels).pooler_output)


def image_tokens(model: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    """visual_projection of the whole vision sequence, **without** post_layernorm (LeScore/MPS), (B, N, P)."""
    vision = model.vision_model
    if clip_cpu_inference.applies(vision, pixels):
        return model.visual_projection(clip_cpu_inference.vision_forward(vision, pixels, pooled=False))
    return model.visual_projection(vision(pixel_values=pixels).last_hidden_state)


def text_embeds(model: CLIPModel, ids: torch.Tensor) -> torch.Tensor:
    """text_projection of the EOT-pooled final-layernormed state, (B, P)."""
    return model.text_projection(model.text_model(input_ids=ids).pooler_output)


def text_tokens_and_embeds(model: CLIPModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token projected features (B, L, P), pooled projected embedding (B, P)) with no attention mask."""
    out = model.text_model(input_ids=ids)
    return model.text_projection(out.last_hidden_state), model.text_projection(out.pooler_output)
