"""The accuracy harness: several rewards on one preference set, every tie rule and the official protocol.

Example:
    >>> from alignment.evaluation import evaluate
    >>> result = evaluate("hpdv2/test.json", ["pickscore", "lescore:overall"], cache_dir="scores/")
    >>> result.table()       # reward x dimension x rule, with bootstrap intervals
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .accuracy import PROTOCOLS, RULES, Accuracy, best_tie_threshold, check_rule, pairwise_accuracy
from .data import PreferenceSet
from .loaders import load_preference_set
from .scoring import LoadedReward, ScoringStats, load_reward, score_images, selected_scores

# Dataset dimension -> reward dimension, for multi-dimensional sets (MHP's names against LeScore's).
DIMENSION_ALIASES = {
    "aesthetics": "aesthetic", "aesthetic": "aesthetic", "detail": "fidelity", "details": "fidelity",
    "fidelity": "fidelity", "plausibility": "fidelity", "alignment": "alignment", "semantic": "alignment",
    "semantic_alignment": "alignment", "overall": "overall",
}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'lescore:fidelity' -> ('lescore', 'fidelity')."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a reward must be given as NAME or NAME:DIMENSION; got {spec!r}.")
    base, _, dim = spec.strip().partition(":")
    return base, dim or None


def reward_dimension(spec_dim: str | None, reward_dims: Sequence[str], dataset_dim: str, n_dataset_dims: int) -> str | None:
    """Which of the reward's dimensions is compared with `dataset_dim` (None: the reward's selection).

    An explicit ``NAME:DIM`` always wins; on a multi-dimensional set a reward that reports the matching
    dimension (`DIMENSION_ALIASES`) is measured with it; otherwise its selected score is used.
    """
    if spec_dim is not None:
        return spec_dim
    if n_dataset_dims > 1:
        target = DIMENSION_ALIASES.get(dataset_dim.lower(), dataset_dim)
        if target in reward_dims:
            return target
    return None


@dataclass
class AccuracyRow:
    """One (reward, dataset dimension, rule) figure; `accuracy` None when `skipped` says why."""

    reward: str
    dimension: str
    reward_dimension: str | None
    rule: str
    official: bool
    accuracy: Accuracy | None
    skipped: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["accuracy"] = None if self.accuracy is None else self.accuracy.to_dict()
        return d


@dataclass
class EvalResult:
    """Accuracies of several rewards on one set, what was dropped and how the scoring went."""

    dataset: dict
    rows: list[AccuracyRow]
    scoring: ScoringStats
    missing_images: list[str] = field(default_factory=list)
    unreadable_images: dict[str, str] = field(default_factory=dict)

    def get(self, reward: str, rule: str | None = None, dimension: str | None = None) -> Accuracy:
        """The accuracy of `reward` under `rule` (default: the set's official protocol) on `dimension`
        (default: the first)."""
        dims = self.dataset["dimensions"]
        dimension = dimension or dims[0]
        for r in self.rows:
            if r.reward == reward and r.dimension == dimension and (r.rule == rule or (rule is None and r.official)):
                if r.accuracy is None:
                    raise ValueError(f"{reward} on {dimension} was skipped: {r.skipped}")
                return r.accuracy
        raise KeyError(f"no result for reward {reward!r}, rule {rule!r}, dimension {dimension!r}.")

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset, "rows": [r.to_dict() for r in self.rows],
            "scoring": asdict(self.scoring) | {"failed": {str(k): v for k, v in self.scoring.failed.items()}},
            "missing_images": self.missing_images, "unreadable_images": self.unreadable_images,
        }


def check_prompts(pset: PreferenceSet, rewards: Mapping[str, LoadedReward]) -> None:
    """A reward that reads prompts cannot score a set whose images have none.

    Raises:
        ValueError: naming the reward, how many prompts are empty, and what to use instead.
    """
    used_groups = set(pset.pair_group.tolist())
    empty = sum(1 for g in used_groups if not pset.groups[g].strip())
    if not empty:
        return
    for name, r in rewards.items():
        if r.uses_prompt:
            raise ValueError(
                f"reward {name!r} scores image-text agreement and needs prompts, but {empty} of the "
                f"{len(used_groups)} prompts of {pset.name} are empty. Use a prompt-free reward (e.g. "
                "'aesthetic') on this set, or a set with captions."
            )


def evaluate_set(
    pset: PreferenceSet, rewards: Mapping[str, LoadedReward], specs: Sequence[str],
    rules: Sequence[str] = RULES, tie_threshold: float = 0.0, tie_space: str = "score", bootstrap: int = 1000,
    confidence: float = 0.95, seed: int = 0, batch_size: int = 16, workers: int = 0, progress: bool = True,
    strict: bool = False, pickscore_thresholds: Mapping[str, float] | None = None,
) -> EvalResult:
    """Score `pset` with every reward (shared decoding, cached) and measure every spec under every rule
    plus the set's official protocol.

    Args:
        pset: the preference set.
        rewards: {base name: LoadedReward} covering every spec's base.
        specs: ``NAME`` or ``NAME:DIMENSION`` per measured reward.
        rules: tie rules to report (`accuracy.RULES` or protocol names); the official protocol is added.
        tie_threshold: a reward tie when |difference| <= this (in `tie_space`).
        strict: a missing or unreadable image raises instead of being counted and left out.
        pickscore_thresholds: per spec, the softmax tie threshold of the ``pickscore`` protocol (from
            `tune_tie_thresholds` on a validation split, as PickScore's evaluation does); other rules keep
            `tie_threshold`.
    """
    for r in rules:
        check_rule(r)
    missing_idx = [i for i, ref in enumerate(pset.images) if not ref.exists()]
    used = set(pset.used_images())
    missing_used = [i for i in missing_idx if i in used]
    if missing_used and strict:
        names = ", ".join(pset.images[i].name for i in missing_used[:3])
        raise FileNotFoundError(f"{len(missing_used)} image file(s) of {pset.name} do not exist (e.g. {names}); "
                                "check the image folder (--images) or run without strict to leave their pairs out.")
    if missing_used:
        pset = pset.drop_images(missing_used, "missing")
    check_prompts(pset, rewards)
    for s in specs:
        base, _ = parse_spec(s)
        if base not in rewards:
            raise ValueError(f"spec {s!r} names reward {base!r}, which was not loaded (loaded: {sorted(rewards)}).")
    prompts = [pset.prompt_of(i) for i in range(len(pset.images))]
    stats = score_images(rewards, pset.images, prompts, pset.used_images(), batch_size, workers, progress, strict)
    if stats.failed:
        pset = pset.drop_images(sorted(stats.failed), "unreadable")
    rows = []
    dims = pset.dimensions
    official = pset.protocol
    all_rules = list(dict.fromkeys([*rules, official]))
    groups = pset.pair_group
    for spec in specs:
        base, spec_dim = parse_spec(spec)
        r = rewards[base]
        reward_dims = tuple(getattr(r.model, "dimensions", ()))
        if spec_dim is not None and spec_dim not in reward_dims:
            raise ValueError(f"reward {base!r} has no dimension {spec_dim!r}; it reports {list(reward_dims)}.")
        for dim in dims:
            rdim = reward_dimension(spec_dim, reward_dims, dim, len(dims))
            skipped = None
            if dim in pset.prompt_dependent and not r.uses_prompt:
                skipped = f"{base} ignores prompts, so it cannot judge the prompt-dependent dimension {dim!r}"
            first = selected_scores(r, pset.images, prompts, pset.pairs[:, 0].tolist(), rdim) if not skipped else None
            second = selected_scores(r, pset.images, prompts, pset.pairs[:, 1].tolist(), rdim) if not skipped else None
            for rule in all_rules:
                acc = None
                if not skipped:
                    thr = tie_threshold
                    if rule == "pickscore" and pickscore_thresholds and spec in pickscore_thresholds:
                        thr = pickscore_thresholds[spec]
                    acc = pairwise_accuracy(first, second, pset.labels[dim], groups, rule, thr,
                                            tie_space, bootstrap, confidence, seed)
                rows.append(AccuracyRow(spec, dim, rdim, rule, rule == official, acc, skipped))
    return EvalResult(
        pset.summary(), rows, stats,
        missing_images=[pset.images[i].name for i in missing_used],
        unreadable_images={pset.images[i].name: e for i, e in stats.failed.items()},
    )


def tune_tie_thresholds(
    validation: PreferenceSet, rewards: Mapping[str, LoadedReward], specs: Sequence[str],
    thresholds: Sequence[float] = tuple(i / 10 for i in range(11)), **score_kwargs: Any,
) -> dict[str, float]:
    """PickScore's protocol: per spec, the softmax-probability tie threshold with the best ``pickscore``
    accuracy on a validation set (its first dimension), from 0, 0.1, ..., 1."""
    check_prompts(validation, rewards)
    prompts = [validation.prompt_of(i) for i in range(len(validation.images))]
    score_images(rewards, validation.images, prompts, validation.used_images(), **score_kwargs)
    out = {}
    for spec in specs:
        base, dim = parse_spec(spec)
        r = rewards[base]
        a = selected_scores(r, validation.images, prompts, validation.pairs[:, 0].tolist(), dim)
        b = selected_scores(r, validation.images, prompts, validation.pairs[:, 1].tolist(), dim)
        keep = torch.isfinite(a) & torch.isfinite(b)
        out[spec], _ = best_tie_threshold(a[keep], b[keep], validation.labels[validation.dimensions[0]][keep], thresholds)
    return out


def load_rewards(specs: Sequence[str], cache_dir: str | os.PathLike | None = None, device: Any = None,
                 dtype: Any = None, options: Mapping[str, Mapping[str, Any]] | None = None,
                 models: Mapping[str, Any] | None = None) -> dict[str, LoadedReward]:
    """One `LoadedReward` per distinct base name of `specs` (``options[base]`` go to `create_reward`;
    ``models[base]`` uses an already built reward)."""
    options, models = dict(options or {}), dict(models or {})
    out: dict[str, LoadedReward] = {}
    for s in specs:
        base, _ = parse_spec(s)
        if base not in out:
            out[base] = load_reward(base, models.get(base), cache_dir, device, dtype, **dict(options.get(base, {})))
    unused = sorted(set(options) - set(out))
    if unused:
        raise ValueError(f"reward options given for {unused}, which no --reward names (rewards: {sorted(out)}).")
    return out


def evaluate(
    dataset: str | os.PathLike | PreferenceSet, rewards: Sequence[str], *, layout: str | None = None,
    image_root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
    device: Any = None, dtype: Any = None, options: Mapping[str, Mapping[str, Any]] | None = None,
    models: Mapping[str, Any] | None = None, limit: int | None = None, **kwargs: Any,
) -> EvalResult:
    """Load a set and rewards by name and run `evaluate_set` (keyword arguments pass through)."""
    pset = dataset if isinstance(dataset, PreferenceSet) else load_preference_set(dataset, layout, image_root)
    if limit is not None:
        pset = pset.limit(int(limit))
    loaded = load_rewards(rewards, cache_dir, device, dtype, options, models)
    return evaluate_set(pset, loaded, rewards, **kwargs)


__all__ = ["AccuracyRow", "EvalResult", "evaluate", "evaluate_set", "load_rewards", "reward_dimension",
           "DIMENSION_ALIASES", "PROTOCOLS", "tune_tie_thresholds"]
