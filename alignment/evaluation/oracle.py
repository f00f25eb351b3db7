"""Preference sets whose truth is known: an oracle reward labels the pairs, the harness measures another.

On the toy world the exact oracle (hard attribute accuracy measured from pixels) is the truth; the learned
reward (a tiny CLIP trained on the scenes) is what a user would optimise. `oracle_agreement` reports how
often the learned reward orders two images of one prompt as the oracle does, per oracle dimension, under
every tie rule (the exact oracle's scores are discrete, so it has ties, which play the role of human ties).

Example:
    >>> result = oracle_agreement("toyworld-clip", "toyworld-exact", images, prompts)
    >>> result.get("toyworld-clip", "exclude", "overall").value
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..pairs import encode_image
from .accuracy import RULES
from .data import ImageRef, PreferenceSet, SetBuilder
from .harness import EvalResult, evaluate_set, load_rewards, parse_spec


def _model(reward: str | Any, **kwargs: Any):
    if isinstance(reward, str):
        from reward_plugins import create_reward

        return create_reward(reward, **kwargs)
    return reward


@torch.no_grad()
def oracle_preference_set(
    images: torch.Tensor | Sequence[torch.Tensor], prompts: Sequence[str], oracle: str | Any,
    groups: Sequence[int] | None = None, dimensions: Sequence[str] | None = None, margin: float = 0.0,
    batch_size: int = 32, name: str = "oracle",
) -> PreferenceSet:
    """Every pair of images within a group (default: images sharing a prompt), labelled per dimension by
    `oracle`: 1 when the first scores higher by more than `margin`, 0 when lower, 0.5 (a tie) otherwise.

    Args:
        images: (N, 3, H, W) in [0, 1], or N such (3, H, W) tensors.
        prompts: one prompt per image.
        oracle: a reward or a registered name.
        dimensions: oracle dimensions to label (default: all it reports).
    """
    # The harness scores the PNG-encoded images; the oracle labels the same uint8-rounded pixels.
    imgs = [(t.detach().float().clamp(0, 1) * 255).round() / 255 for t in images]
    if len(imgs) != len(prompts):
        raise ValueError(f"got {len(imgs)} images and {len(prompts)} prompts; pass one prompt per image.")
    model = _model(oracle)
    dims = list(dimensions or model.dimensions)
    unknown = [d for d in dims if d not in model.dimensions]
    if unknown:
        raise ValueError(f"oracle {model.name!r} has no dimension(s) {unknown}; it reports {list(model.dimensions)}.")
    scores: dict[str, list[float]] = {d: [] for d in dims}
    for s in range(0, len(imgs), batch_size):
        chunk = imgs[s:s + batch_size]
        shapes = {tuple(t.shape) for t in chunk}
        outs = [model.score(torch.stack(chunk).to(model.device), list(prompts[s:s + batch_size]))] if len(shapes) == 1 \
            else [model.score(t.unsqueeze(0).to(model.device), [p]) for t, p in zip(chunk, prompts[s:s + batch_size])]
        for d in dims:
            scores[d].extend(v for o in outs for v in o.per_dim[d].double().cpu().tolist())
    if groups is None:
        ids: dict[str, int] = {}
        groups = [ids.setdefault(p, len(ids)) for p in prompts]
    b = SetBuilder()
    gmap: dict[int, int] = {}
    index_of = []
    for i, (img, g) in enumerate(zip(imgs, groups)):
        if g not in gmap:
            gmap[g] = b.group(prompts[i])
        index_of.append(b.image(ImageRef.from_bytes(encode_image(img)), gmap[g]))
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for rows in by_group.values():
        for a in range(len(rows)):
            for c in range(a + 1, len(rows)):
                i, j = rows[a], rows[c]
                labels = {}
                for d in dims:
                    gap = scores[d][i] - scores[d][j]
                    labels[d] = 1.0 if gap > margin else 0.0 if gap < -margin else 0.5
                b.pair(index_of[i], index_of[j], labels)
    return b.build(name, "oracle", "exclude", notes=[f"labels from oracle {model.name!r} (margin {margin:g})"])


def oracle_agreement(
    learned: str | Any, oracle: str | Any | PreferenceSet, images: torch.Tensor | Sequence[torch.Tensor] | None = None,
    prompts: Sequence[str] | None = None, *, dimensions: Sequence[str] | None = None, margin: float = 0.0, rules: Sequence[str] = RULES,
    cache_dir: str | os.PathLike | None = None, learned_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> EvalResult:
    """The harness's accuracy of `learned` against the preferences of `oracle` on `images`.

    `learned` may be a spec (``NAME[:DIM]``) or a reward object (measured under its name); `oracle` a
    reward, a registered name, or an already labelled `PreferenceSet`. Other keyword arguments go to
    `evaluate_set` (bootstrap, batch_size, workers, ...).
    """
    if isinstance(oracle, PreferenceSet):  # already labelled (e.g. by `toyworld_preference_set`)
        pset = oracle
    else:
        if images is None or prompts is None:
            raise ValueError("oracle_agreement needs images and prompts (or a labelled PreferenceSet as oracle).")
        pset = oracle_preference_set(images, prompts, oracle, dimensions=dimensions, margin=margin)
    if isinstance(learned, str):
        spec = learned
        loaded = load_rewards([spec], cache_dir, options={parse_spec(spec)[0]: dict(learned_options or {})})
    else:
        spec = learned.name
        loaded = load_rewards([spec], cache_dir, models={spec: learned})
    return evaluate_set(pset, loaded, [spec], rules=rules, progress=kwargs.pop("progress", False), **kwargs)
