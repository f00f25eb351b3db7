"""`CompositeReward`: a weighted sum of normalised reward terms, itself a `RewardModel`.

score = sum_i weight_i * (r_i - shift_i) / scale_i, where r_i is a term's selected dimension. Terms that
share one reward object (say `lescore:fidelity` and `lescore:alignment`) run it once per call.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import RewardModel
from .registry import create_reward, parse_name


@dataclass
class Term:
    """One term: `reward`'s `dimension` (None: its `.scores`), normalised then weighted."""

    reward: RewardModel
    weight: float = 1.0
    dimension: str | None = None
    shift: float = 0.0
    scale: float = 1.0
    name: str | None = None

    def __post_init__(self) -> None:
        if self.dimension is not None and self.dimension not in self.reward.dimensions:
            raise ValueError(
                f"term dimension {self.dimension!r} is not reported by reward {self.reward.name!r} "
                f"(it reports {list(self.reward.dimensions)})."
            )
        if not self.scale > 0:
            raise ValueError(f"term scale must be > 0; got {self.scale}.")
        if self.name is None:
            self.name = self.reward.name + (f":{self.dimension}" if self.dimension else "")


class CompositeReward(RewardModel):
    """A weighted, normalised sum of rewards.

    `per_dim` holds every term's raw score under its name and the total under ``"composite"``.

    Example:
        >>> comp = CompositeReward.from_weights({"lescore-tiny:fidelity": 1.0, "lescore-tiny:alignment": 0.5})
        >>> out = comp(images, prompts)
        >>> out.per_dim.keys()   # 'lescore-tiny:fidelity', 'lescore-tiny:alignment', 'composite'
    """

    default_dimension = "composite"

    def __init__(self, terms: Sequence[Term]) -> None:
        if not terms:
            raise ValueError("CompositeReward needs at least one term.")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"term names must be unique; got {names}. Give each Term a name=.")
        self.dimensions = (*names, "composite")
        super().__init__()
        self.name = "composite"
        self.terms = list(terms)
        uniq: dict[int, RewardModel] = {id(t.reward): t.reward for t in terms}
        self.rewards = nn.ModuleList(uniq.values())
        self.requires_prompts = any(r.requires_prompts for r in self.rewards)
        self.is_differentiable = all(r.is_differentiable for r in self.rewards)

    @classmethod
    def from_weights(cls, weights: Mapping[str, float], **create_kwargs: Any) -> CompositeReward:
        """Build from ``{"name[:dimension]": weight}``; one reward object per distinct name."""
        built: dict[str, RewardModel] = {}
        terms = []
        for spec, w in weights.items():
            base, dim = parse_name(spec)
            if base not in built:
                built[base] = create_reward(base, **create_kwargs)
            terms.append(Term(built[base], float(w), dim, name=spec))
        return cls(terms)

    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        outs = {id(r): r(images, prompts) for r in self.rewards}
        per_dim: dict[str, torch.Tensor] = {}
        total = torch.zeros(images.shape[0], device=images.device)
        for t in self.terms:
            out = outs[id(t.reward)]
            raw = out.scores if t.dimension is None else out.per_dim[t.dimension]
            per_dim[t.name] = raw
            total = total + t.weight * (raw - t.shift) / t.scale
        per_dim["composite"] = total
        return per_dim

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> dict[str, tuple[float, float]]:
        """Set each term's shift/scale to the mean/std of its score on a sample batch (per-term
        normalisation, so terms on different scales weigh as their weights say)."""
        if images.shape[0] < 2:
            raise ValueError("calibrate needs at least 2 images to estimate a spread.")
        out = self(images, prompts)
        stats = {}
        for t in self.terms:
            r = out.per_dim[t.name]
            t.shift, t.scale = float(r.mean()), max(float(r.std()), 1e-6)
            stats[t.name] = (t.shift, t.scale)
        return stats

    def load_calibration(self, source: str | os.PathLike | Mapping[str, Any]) -> dict[str, tuple[float, float]]:
        """Set each term's shift/scale to the mean/std of a saved calibration (the JSON written by
        `reward-align eval-reward --calibrate`, or its dict) instead of estimating them from one batch.

        A term uses the statistics of its reward's name and its dimension (or the reward's selected
        dimension); a term on a weighted mix of dimensions has no single entry and is rejected.

        Raises:
            ValueError: not a calibration file, or a term's reward or dimension is not in it.
        """
        data = json.loads(Path(source).read_text()) if not isinstance(source, Mapping) else source
        if not isinstance(data, Mapping) or data.get("format") != "reward-plugins/calibration":
            raise ValueError(
                f"{source if not isinstance(source, Mapping) else 'the mapping'} is not a calibration file "
                "(format 'reward-plugins/calibration'); write one with `reward-align eval-reward --calibrate`."
            )
        rewards = data.get("rewards", {})
        stats = {}
        for t in self.terms:
            entry = rewards.get(t.reward.name)
            if entry is None:
                raise ValueError(f"the calibration has no statistics for reward {t.reward.name!r} (it has "
                                 f"{sorted(rewards)}); calibrate that reward too.")
            sel = t.reward.selection
            dim = t.dimension or (next(iter(sel)) if len(sel) == 1 else None)
            if dim is None:
                raise ValueError(f"term {t.name!r} scores a weighted mix {sel}; a calibration holds one "
                                 "distribution per dimension, so give the term one dimension.")
            s = entry.get("dimensions", {}).get(dim)
            if s is None:
                raise ValueError(f"the calibration of {t.reward.name!r} has no dimension {dim!r} (it has "
                                 f"{sorted(entry.get('dimensions', {}))}).")
            t.shift, t.scale = float(s["mean"]), max(float(s["std"]), 1e-6)
            stats[t.name] = (t.shift, t.scale)
        return stats
