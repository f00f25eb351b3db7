"""The toy world's rewards (`alignment.toyworld`): two oracles measured from pixels and a learned CLIP.

- ``toyworld``: the soft oracle, differentiable, in [0, 1] per dimension (``color``, ``shape``,
  ``position``; ``overall`` = their mean). For gradient methods and reward-weighted training.
- ``toyworld-exact``: the exact oracle, 1.0 / 0.0 per dimension (``overall`` = all three right); not
  differentiable. It is the evaluation metric of the efficacy benchmark and is never trained on.
- ``toyworld-clip``: the tiny CLIP trained on the scenes (shipped weights), ``exp(logit_scale) * cos``;
  good but imperfect, so optimising it hard can be caught by the exact oracle.

The oracles read the caption grammar ("a red circle on the left"); any other prompt raises a
ValueError that shows the grammar. Their `-tiny` twins are the same oracles (they have no weights);
``toyworld-clip-tiny`` is a random CLIP of the same architecture and tokenizer.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..base import RewardModel
from ..clip_reward import ClipSimilarityReward
from ..preprocess import ImageTransform
from ..registry import register_reward
from ..testing import seeded

EXAMPLE_PROMPTS = (
    "a red circle on the left", "a blue square at the top", "a green triangle in the center",
    "a yellow circle at the bottom", "a purple square on the right", "a cyan triangle at the top",
)


class ToyWorldOracle(RewardModel):
    """Base of the two oracles: per-dimension scores from pixels, no learned part.

    The palette is held as a frozen parameter so that `.to(device, dtype)` and `.dtype` behave as for
    any reward; the measurement itself always runs in float32.
    """

    dimensions = ("color", "shape", "position", "overall")
    default_dimension = "overall"
    requires_prompts = True
    score_range = (0.0, 1.0)
    example_prompts: ClassVar[tuple[str, ...]] = EXAMPLE_PROMPTS

    def __init__(self) -> None:
        super().__init__()
        from alignment.toyworld.oracle import palette

        self.palette = nn.Parameter(palette(), requires_grad=False)


class ToyWorldSoftOracle(ToyWorldOracle):
    """Differentiable oracle: soft colour closeness, template-IoU softmax, Gaussian of the centroid distance."""

    is_differentiable = True

    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        from alignment.toyworld.oracle import soft_scores

        return soft_scores(images, prompts)


class ToyWorldExactOracle(ToyWorldOracle):
    """Hard attribute accuracy per image (segment by colour, classify the shape, locate the centroid)."""

    is_differentiable = False

    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        from alignment.toyworld.oracle import exact_scores

        return {k: v.to(images.device) for k, v in exact_scores(images.detach(), prompts).items()}


def _logit_scaled(cos: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    return logit_scale.exp() * cos


class ToyWorldClip(ClipSimilarityReward):
    """The learned reward: `exp(logit_scale) * cos(image, caption)` from the toy world's tiny CLIP."""

    dimensions = ("clip",)
    default_dimension = "clip"
    score_range = None

    def __init__(self, model, tokenizer) -> None:
        super().__init__(model, tokenizer, ImageTransform(32, "crop"), _logit_scaled)


@register_reward("toyworld", aliases=("toyworld-soft",))
def toyworld() -> ToyWorldSoftOracle:
    """Toy-world soft oracle (differentiable): color, shape, position in [0, 1]; overall = their mean."""
    return ToyWorldSoftOracle()


@register_reward("toyworld-tiny", tiny=True)
def toyworld_tiny() -> ToyWorldSoftOracle:
    """The soft oracle itself (it has no weights to shrink)."""
    return ToyWorldSoftOracle()


@register_reward("toyworld-exact")
def toyworld_exact() -> ToyWorldExactOracle:
    """Toy-world exact oracle (not differentiable): 1/0 per dimension; overall = all three right."""
    return ToyWorldExactOracle()


@register_reward("toyworld-exact-tiny", tiny=True)
def toyworld_exact_tiny() -> ToyWorldExactOracle:
    """The exact oracle itself (it has no weights to shrink)."""
    return ToyWorldExactOracle()


@register_reward("toyworld-clip")
def toyworld_clip(checkpoint: str | None = None) -> ToyWorldClip:
    """The toy world's trained tiny CLIP (shipped with the package, or a `save_pretrained` dir)."""
    from alignment.toyworld.models import load_clip

    return ToyWorldClip(*load_clip(checkpoint))


@register_reward("toyworld-clip-tiny", tiny=True)
def toyworld_clip_tiny(seed: int = 0) -> ToyWorldClip:
    """A random CLIP of the toy world's architecture and tokenizer (no trained weights)."""
    from transformers import CLIPModel

    from alignment.toyworld.models import build_tokenizer, clip_config

    tokenizer = build_tokenizer()
    with seeded(seed):
        model = CLIPModel(clip_config(tokenizer))
    return ToyWorldClip(model.eval(), tokenizer)
