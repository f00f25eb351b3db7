"""The toy world's models: its tokenizer, the component configs of the tiny text-to-image pipeline and the
tiny CLIP, and loaders for the trained weights shipped in `weights/`.

The pipeline is a real diffusers `StableDiffusionPipeline` (AutoencoderKL with 8 x 8 x 4 latents for
32 px images, UNet2DConditionModel, CLIPTextModel, DDIM scheduler); the reward model is a real
transformers `CLIPModel`. Both load with `from_pretrained` from the package folder, offline.

Example:
    >>> pipe = load_pipeline()
    >>> images = pipe(["a red circle on the left"] * 4, num_inference_steps=10, output_type="pt").images
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .world import vocabulary

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR = WEIGHTS_DIR / "pipeline"
CLIP_DIR = WEIGHTS_DIR / "clip"
MANIFEST = WEIGHTS_DIR / "MANIFEST.json"
# Sampling defaults the benchmark, the demo and the tests use (few steps: 16 images in well under 2 s).
DEFAULT_STEPS = 10
DEFAULT_GUIDANCE = 7.0
TEXT_LENGTH = 77


def grammar_merges() -> list[str]:
    """BPE merges for the grammar's words: a left-to-right merge chain per word, shared prefixes once.

    BPE applies merges by rank, so where an earlier word's merge takes a pair first the later chain
    breaks: 18 of the 20 words are one token, "cyan" is two ("cy", "an") and "triangle" seven. The
    shipped models were trained with exactly this tokenizer (saved beside them), so it stays as is.
    """
    merges: list[str] = []
    seen: set[str] = set()
    for word in vocabulary():
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            m = f"{left} {right}"
            if m not in seen:
                seen.add(m)
                merges.append(m)
            left = left + right
    return merges


def build_tokenizer():
    """A real `CLIPTokenizer` (byte-level BPE, 512 byte symbols + grammar merges + BOS/EOT last).

    Grammar words are one token each except "cyan" (2) and "triangle" (7); any other text still
    tokenizes (into bytes). Captions are at most 15 ids with BOS and EOT.
    """
    from reward_plugins.tokenization import _make_clip_tokenizer, clip_vocab_from_merges

    merges = grammar_merges()
    return _make_clip_tokenizer(clip_vocab_from_merges(merges), merges, TEXT_LENGTH)


def text_config(tokenizer, hidden: int = 64, layers: int = 2, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kw = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        layer_norm_eps=1e-5, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=TEXT_LENGTH, hidden_act="gelu", **kw,
    )


def build_vae():
    """AutoencoderKL: 32 px RGB <-> 8 x 8 x 4 latents (two downsamplings)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )


def build_unet(cross_attention_dim: int = 64):
    """UNet2DConditionModel on 8 x 8 x 4 latents, cross-attention in every block plus pooled text conditioning."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=16,
        # A pooled text embedding added to the time embedding (diffusers' "text" addition embedding, as in
        # DeepFloyd IF): a global conditioning path that a tiny UNet learns far faster than cross-attention.
        addition_embed_type="text", addition_embed_type_num_heads=4,
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def clip_config(tokenizer):
    """A tiny transformers `CLIPConfig`: ViT on 32 px (patch 4, 64 tokens) and a 2-layer text tower."""
    from transformers import CLIPConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=32,
        patch_size=4, num_channels=3, layer_norm_eps=1e-5, hidden_act="gelu", projection_dim=64,
    )
    return CLIPConfig(text_config=text_config(tokenizer, projection_dim=64).to_dict(),
                      vision_config=vision.to_dict(), projection_dim=64)


def _missing(path: Path, what: str, script: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"the toy world's {what} is not at {path}. It ships with the package (package data); reinstall the "
        f"package, or rebuild it with `python {script}`."
    )


def load_pipeline(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32):
    """The trained toy text-to-image `StableDiffusionPipeline` (`from_pretrained`, offline).

    Args:
        path: a pipeline dir (default: the shipped one).
        device, dtype: where and in which precision to put it.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path) if path is not None else PIPELINE_DIR
    if not (path / "model_index.json").is_file():
        raise _missing(path, "pipeline", "examples/toyworld/train_pipeline.py")
    pipe = StableDiffusionPipeline.from_pretrained(str(path), dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_clip(path: str | os.PathLike | None = None):
    """The trained tiny CLIP and its tokenizer: ``(CLIPModel, CLIPTokenizer)``, both `from_pretrained`."""
    from transformers import CLIPModel, CLIPTokenizer

    path = Path(path) if path is not None else CLIP_DIR
    if not (path / "config.json").is_file():
        raise _missing(path, "CLIP reward model", "examples/toyworld/train_clip.py")
    model = CLIPModel.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    return model.eval(), CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_files(root: Path = WEIGHTS_DIR) -> list[Path]:
    """Every shipped file under `root` except the manifest and README, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in ("MANIFEST.json", "README.md"))


def read_manifest(path: Path = MANIFEST) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no weights manifest at {path}; the toy world's weights are not installed.")
    return json.loads(path.read_text())


def verify_weights(root: Path = WEIGHTS_DIR) -> dict[str, str]:
    """Check every shipped file against the sha256 in MANIFEST.json; returns {relative path: sha256}.

    Raises:
        ValueError: a file is missing, unlisted, or its hash differs.
    """
    listed: dict[str, str] = {}
    for part in read_manifest(root / "MANIFEST.json").get("models", {}).values():
        listed.update(part["files"])
    actual = {str(p.relative_to(root)): sha256(p) for p in weight_files(root)}
    problems = [f"{k}: missing" for k in listed if k not in actual]
    problems += [f"{k}: not in the manifest" for k in actual if k not in listed]
    problems += [f"{k}: sha256 {actual[k][:12]}... != manifest {v[:12]}..." for k, v in listed.items()
                 if k in actual and actual[k] != v]
    if problems:
        raise ValueError("toy-world weights do not match MANIFEST.json: " + "; ".join(problems))
    return actual


# ---- the flow-matching twin (issue 13): a StableDiffusion3Pipeline on the same world --------------------
FLOW_DIR = WEIGHTS_DIR / "flow"
# Caption tokens of the flow twin's CLIP tokenizers (captions are at most 15 ids with BOS and EOT; the CLIP
# text tower is causal, so its first 16 states are exactly those of the 77-token input it was trained on).
FLOW_TEXT_LENGTH = 16
# The twin has no T5 (`text_encoder_3=None`): the pipeline then feeds this many zero tokens in its place.
# Its default is 256, which would make every transformer call ~4x slower on these 64-token images, so the
# twin is trained with 16 and must be sampled with the same (`FLOW_PIPELINE_KWARGS`; the adapters and
# trainers take it as `model.max_sequence_length`).
FLOW_MAX_SEQUENCE_LENGTH = 16
FLOW_PIPELINE_KWARGS = {"max_sequence_length": FLOW_MAX_SEQUENCE_LENGTH}
# Unshifted σ schedule: SD3's resolution rule (shift = √(m/n), 1 at its 256² base resolution) would go
# below 1 for 8 x 8 latents; 1 keeps the plain rectified-flow schedule for training and sampling.
FLOW_SHIFT = 1.0


def flow_text_encoder(clip=None):
    """The toy CLIP's text tower and text projection as a `CLIPTextModelWithProjection` (what SD3's two
    CLIP encoders are), weights copied exactly; `clip` defaults to the shipped one."""
    from transformers import CLIPTextModelWithProjection

    clip = clip if clip is not None else load_clip()[0]
    cfg = clip.config.text_config
    cfg.projection_dim = clip.config.projection_dim
    te = CLIPTextModelWithProjection(cfg)
    state = {f"text_model.{k}": v for k, v in clip.text_model.state_dict().items()}
    state["text_projection.weight"] = clip.text_projection.weight.detach()
    te.load_state_dict(state, strict=True)
    return te.eval().requires_grad_(False)


def build_flow_transformer(dim: int = 64, layers: int = 6):
    """SD3Transformer2DModel on 8 x 8 x 4 latents (patch 1: 64 image tokens), `dim / 16` heads of 16, RMS
    q/k norm (SD3.5's); the context is the two 64-d CLIP states side by side (128) and the pooled input
    both CLIP projections (128)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=16,
        num_attention_heads=dim // 16, joint_attention_dim=128, caption_projection_dim=dim,
        pooled_projection_dim=128, pos_embed_max_size=8, qk_norm="rms_norm",
    )


def build_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)


def load_flow_pipeline(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32):
    """The trained toy flow-matching `StableDiffusion3Pipeline` (`from_pretrained`, offline; no T5).

    Sample it with ``**FLOW_PIPELINE_KWARGS`` (16 zero T5 tokens, as it was trained).

    Example:
        >>> pipe = load_flow_pipeline()
        >>> images = pipe(["a red circle on the left"] * 4, num_inference_steps=10, output_type="pt",
        ...               **FLOW_PIPELINE_KWARGS).images
    """
    from diffusers import StableDiffusion3Pipeline

    path = Path(path) if path is not None else FLOW_DIR
    if not (path / "model_index.json").is_file():
        raise _missing(path, "flow-matching pipeline", "examples/toyworld/train_flow_pipeline.py")
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), dtype=dtype, text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
