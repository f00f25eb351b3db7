"""The end-to-end case where the truth is known: the toy world's learned reward against its exact oracle.

`toyworld_agreement` takes images of held-out prompts, labels every pair of images of a prompt by the
exact oracle (``toyworld-exact``: 1 / 0 per colour, shape, position; overall = all three right; equal
verdicts are ties) and reports the harness's accuracy of the learned reward (``toyworld-clip``) against
those preferences, per oracle dimension and tie rule. Images come from

- ``source="pipeline"``: the shipped toy text-to-image pipeline, sampled on the held-out seeds (what an
  alignment method would rank), or
- ``source="render"``: rendered scenes in which each image gets a seeded random subset of the prompt's
  attributes replaced (no pipeline needed; every verdict level occurs).

Example:
    >>> res = toyworld_agreement(images_per_prompt=4, num_prompts=8)
    >>> res.get("toyworld-clip", "exclude", "overall").value
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from .data import PreferenceSet
from .harness import EvalResult
from .oracle import oracle_agreement, oracle_preference_set

SOURCES = ("pipeline", "render")


def _render_images(prompts: Sequence[str], per_prompt: int, seed: int, corrupt: float) -> tuple[torch.Tensor, list[str]]:
    from alignment.toyworld.render import render
    from alignment.toyworld.world import COLORS, POSITIONS, SHAPES, parse_caption

    rng = random.Random(seed)
    choices = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS)}
    attrs, out_prompts = [], []
    for p in prompts:
        a = parse_caption(p)
        for _ in range(per_prompt):
            changes = {d: rng.choice([v for v in vals if v != a.get(d)]) for d, vals in choices.items()
                       if rng.random() < corrupt}
            attrs.append(a.replace(**changes))
            out_prompts.append(p)
    images, _ = render(attrs, torch.Generator().manual_seed(seed))
    return images, out_prompts


@torch.no_grad()
def _pipeline_images(prompts: Sequence[str], per_prompt: int, seed: int, pipeline: Any, steps: int | None) -> tuple[torch.Tensor, list[str]]:
    from alignment.toyworld.models import load_pipeline

    pipe = pipeline if pipeline is not None else load_pipeline()
    kwargs = {"num_inference_steps": steps} if steps else {}
    images, out_prompts = [], []
    for k, p in enumerate(prompts):
        g = torch.Generator(device="cpu").manual_seed(seed + k)
        out = pipe([p], num_images_per_prompt=per_prompt, generator=g, output_type="pt", **kwargs).images
        images.append(out.float().clamp(0, 1).cpu())
        out_prompts.extend([p] * per_prompt)
    return torch.cat(images), out_prompts


def toyworld_preference_set(
    *, prompts: Sequence[str] | None = None, num_prompts: int = 16, images_per_prompt: int = 4,
    source: str = "pipeline", seed: int | None = None, corrupt: float = 0.5, pipeline: Any = None,
    steps: int | None = None, oracle: str | Any = "toyworld-exact",
) -> PreferenceSet:
    """Toy-world images of held-out prompts with every within-prompt pair labelled by the exact oracle.

    Args:
        prompts: captions (default: the first `num_prompts` held-out prompts).
        images_per_prompt: images per prompt (every pair of them is one comparison).
        source: 'pipeline' (the shipped toy pipeline) or 'render' (rendered scenes with attributes
            replaced with probability `corrupt` each).
        seed: default the toy world's first held-out seed.
        pipeline, steps: a pipeline to sample instead of the shipped one, and its step count.
    """
    from alignment.toyworld.world import HELDOUT_SEEDS, heldout_prompts

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}; got {source!r}.")
    if images_per_prompt < 2:
        raise ValueError(f"images_per_prompt must be >= 2 (pairs are formed within a prompt); got {images_per_prompt}.")
    prompts = list(prompts) if prompts is not None else heldout_prompts()[:num_prompts]
    seed = HELDOUT_SEEDS[0] if seed is None else seed
    if source == "render":
        images, image_prompts = _render_images(prompts, images_per_prompt, seed, corrupt)
    else:
        images, image_prompts = _pipeline_images(prompts, images_per_prompt, seed, pipeline, steps)
    pset = oracle_preference_set(images, image_prompts, oracle, name=f"toyworld-{source}")
    pset.layout = "toyworld"
    return pset


def toyworld_agreement(learned: str | Any = "toyworld-clip", oracle: str | Any = "toyworld-exact", **kwargs: Any) -> EvalResult:
    """Accuracy of `learned` against the exact oracle's preferences on toy-world images.

    Keyword arguments of `toyworld_preference_set` choose the images; the others go to `evaluate_set`
    (rules, bootstrap, batch_size, ...).
    """
    set_keys = ("prompts", "num_prompts", "images_per_prompt", "source", "seed", "corrupt", "pipeline", "steps")
    pset = toyworld_preference_set(oracle=oracle, **{k: kwargs.pop(k) for k in set_keys if k in kwargs})
    return oracle_agreement(learned, pset, **kwargs)
