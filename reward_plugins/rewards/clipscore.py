"""CLIPScore (Hessel et al. 2021), in either of its two published conventions.

- ``convention="torchmetrics"`` (default): ``max(100 * cos, 0)`` with `openai/clip-vit-large-patch14`,
  no prompt prefix; what `torchmetrics.multimodal.CLIPScore` reports, with two differences:
  torchmetrics clamps after the batch mean and we clamp per image (the mean of our scores equals theirs
  whenever no cosine is negative); and on prompts longer than 77 tokens torchmetrics cuts the ids at 77
  without the end token, so its text feature is pooled at an ordinary word, while we keep the end token
  as CLIP was trained (``[BOS, 75 tokens, EOT]``). Long prompts can then differ by several points; pass
  ``truncation="torchmetrics"`` to reproduce its numbers on them.
- ``convention="paper"``: ``2.5 * max(cos, 0)`` with the caption prefixed by "A photo depicts ", as in the
  paper's reference code (which uses ViT-B/32: pass ``checkpoint="openai/clip-vit-base-patch32"``).

Both clamp at zero, so an image whose cosine is negative gets a zero score and a zero gradient.
"""

from __future__ import annotations

from functools import partial

import torch

from ..clip_backbone import OPENAI_L14, clip_tokenizer, load_hf_clip
from ..clip_reward import ClipSimilarityReward
from ..preprocess import ImageTransform
from ..registry import register_reward
from ..testing import tiny_clip
from ..tokenization import tiny_clip_tokenizer

# weight, prompt prefix, centre-crop rounding (HF processor in torchmetrics; torchvision in the paper's code)
CONVENTIONS = {"torchmetrics": (100.0, "", "floor"), "paper": (2.5, "A photo depicts ", "round")}


def clamped_cosine(cos: torch.Tensor, logit_scale: torch.Tensor, weight: float) -> torch.Tensor:
    return weight * cos.clamp(min=0)


class CLIPScore(ClipSimilarityReward):
    """CLIPScore: `w * max(cos, 0)`; w = 100 (torchmetrics) or 2.5 (paper).

    Args:
        model: a transformers CLIPModel.
        tokenizer: its CLIP tokenizer.
        convention: "torchmetrics" (default) or "paper".
        truncation: "keep_eot" (default; long prompts keep the end token) or "torchmetrics" (cut at 77 ids
            without it, as torchmetrics does).

    Example:
        >>> reward = create_reward("clipscore", truncation="torchmetrics")
        >>> reward(images, prompts).scores
    """

    dimensions = ("clipscore",)
    default_dimension = "clipscore"
    score_range = (0.0, 100.0)

    def __init__(self, model, tokenizer, convention: str = "torchmetrics", truncation: str = "keep_eot") -> None:
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}; got {convention!r}.")
        weight, prefix, rounding = CONVENTIONS[convention]
        transform = ImageTransform(224, "crop", crop_rounding=rounding)
        # The paper's code tokenizes with OpenAI's `clip.tokenize`, which cleans text first.
        super().__init__(
            model, tokenizer, transform, partial(clamped_cosine, weight=weight), prefix,
            clean_text=convention == "paper", truncation=truncation,
        )
        self.convention = convention


@register_reward("clipscore", aliases=("clip-score", "clip_score"))
def clipscore(
    checkpoint: str = OPENAI_L14, tokenizer: str | None = None, convention: str = "torchmetrics",
    truncation: str = "keep_eot",
) -> CLIPScore:
    """CLIPScore from an HF CLIPModel dir or hub id (its own tokenizer), in the named convention.

    ``truncation="torchmetrics"`` cuts prompts over 77 tokens as torchmetrics does (no end token).
    """
    return CLIPScore(load_hf_clip(checkpoint), clip_tokenizer(checkpoint, tokenizer), convention, truncation)


@register_reward("clipscore-tiny", tiny=True)
def clipscore_tiny(seed: int = 12, convention: str = "torchmetrics", truncation: str = "keep_eot") -> CLIPScore:
    """A random tiny CLIPScore (quick_gelu like OpenAI CLIP).

    CLIPScore clamps negative cosines to zero (zero gradient); random tiny weights give cosines of
    either sign, so the default seed is one whose cosines are positive on typical inputs.
    """
    return CLIPScore(tiny_clip(seed, act="quick_gelu"), tiny_clip_tokenizer(), convention, truncation)
