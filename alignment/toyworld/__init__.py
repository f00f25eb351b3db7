"""The toy world: procedural scenes with exact ground truth, oracle rewards, and the shipped tiny models.

    >>> from alignment.toyworld import world, render, oracle, models
    >>> world.heldout_prompts()[:1]
    ['a red circle on the left']
    >>> pipe = models.load_pipeline()          # the trained tiny StableDiffusionPipeline (offline)

Modules: `world` (palette, grammar, parser, train/held-out split, seeds), `render` (scenes),
`oracle` (exact and soft oracles), `models` (tokenizer, configs, `load_pipeline`, `load_clip`, manifest).
The rewards are registered as ``toyworld``, ``toyworld-exact`` and ``toyworld-clip``.
"""

from .world import (
    Attributes,
    caption,
    heldout_prompts,
    parse_caption,
    train_prompts,
)

__all__ = ["Attributes", "caption", "heldout_prompts", "parse_caption", "train_prompts"]
