"""Pairwise accuracy of a reward against preference labels, under a stated tie rule, with bootstrap CIs.

A pair's human label is +1 (first image preferred), -1 (second) or 0 (tie); the reward predicts +1, -1 or
0 from the score difference d = s_first - s_second: a tie when |d| <= ``tie_threshold`` (so, with the
default 0, only when the scores are equal). ``tie_space="prob"`` applies the threshold to the difference of
the two softmax probabilities, |p_first - p_second| = tanh(|d| / 2), as PickScore's evaluation does.

Tie rules (`RULES`; each pair gets a credit in [0, 1]; accuracy = mean credit over the counted pairs):

==============  =====================================  ===============================================
rule            pairs counted                          credit
==============  =====================================  ===============================================
``exclude``     human ties left out                    1 right, 0 wrong, 0.5 when the reward predicts a tie
``half``        all                                    a human tie 0.5 whatever the reward says; else as ``exclude``
``predict``     all (3-way: first / second / tie)      1 when prediction = label, 0.5 when exactly one of
                                                       them is a tie, 0 otherwise (PickScore's scoring)
==============  =====================================  ===============================================

Official protocols (`PROTOCOLS`), reproducing each repository's evaluation script:

- ``imagereward`` (THUDM/ImageReward ``test.py``, also MPS's ImageReward script): human ties left out,
  a reward tie counts as wrong, accuracy over all pairs of all prompts (micro).
- ``hpsv2`` (tgxs002/HPSv2 ``inversion_score``, also MPS's HPD v2 script): per prompt, 1 − discordant pairs
  / all pairs (human or reward ties are not discordant, so they count as right), then the mean over prompts.
- ``pickscore`` (yuvalkirstain/PickScore ``eval_preference_predictor.py``): the ``predict`` rule with the
  threshold on softmax probabilities (PickScore picks it on the validation split from 0, 0.1, …, 1;
  `best_tie_threshold` does the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

RULES = ("exclude", "half", "predict")
PROTOCOLS = ("imagereward", "hpsv2", "pickscore")
TIE_SPACES = ("score", "prob")


def check_rule(rule: str) -> str:
    if rule not in RULES + PROTOCOLS:
        raise ValueError(
            f"unknown tie rule {rule!r}; tie rules: {', '.join(RULES)}; official protocols: {', '.join(PROTOCOLS)}."
        )
    return rule


def predictions(first: torch.Tensor, second: torch.Tensor, tie_threshold: float = 0.0,
                tie_space: str = "score") -> torch.Tensor:
    """+1 / -1 / 0 (tie) per pair from two score vectors."""
    if tie_space not in TIE_SPACES:
        raise ValueError(f"tie_space must be one of {TIE_SPACES}; got {tie_space!r}.")
    if tie_threshold < 0:
        raise ValueError(f"tie_threshold must be >= 0; got {tie_threshold}.")
    d = first.double() - second.double()
    gap = torch.tanh(d.abs() / 2) if tie_space == "prob" else d.abs()
    return torch.where(gap <= tie_threshold, torch.zeros_like(d), torch.sign(d))


def human_labels(labels: torch.Tensor) -> torch.Tensor:
    """1 / 0 / 0.5 labels -> +1 / -1 / 0 (NaN stays NaN)."""
    lab = labels.double()
    return torch.where(lab.isnan(), lab, torch.sign(lab - 0.5))


def pair_credit(first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor, rule: str = "exclude",
                tie_threshold: float = 0.0, tie_space: str = "score") -> tuple[torch.Tensor, torch.Tensor]:
    """(credit, counted) per pair under `rule` (a tie rule or an official protocol's pair rule).

    Unlabelled pairs (NaN) are never counted.
    """
    check_rule(rule)
    if rule == "pickscore":
        rule, tie_space = "predict", "prob"
    pred = predictions(first, second, tie_threshold, tie_space)
    human = human_labels(labels)
    labelled = ~human.isnan()
    h = torch.nan_to_num(human, nan=0.0)
    right, wrong = pred == h, pred * h < 0
    if rule == "exclude":
        counted = labelled & (h != 0)
        credit = torch.where(right, 1.0, torch.where(pred == 0, 0.5, 0.0))
    elif rule == "half":
        counted = labelled
        credit = torch.where(h == 0, 0.5, torch.where(right, 1.0, torch.where(pred == 0, 0.5, 0.0)))
    elif rule == "predict":
        counted = labelled
        credit = torch.where(right, 1.0, torch.where((pred == 0) ^ (h == 0), 0.5, 0.0))
    elif rule == "imagereward":
        counted = labelled & (h != 0)
        credit = right.double()
    else:  # hpsv2: only a strict inversion is wrong
        counted = labelled
        credit = (~wrong).double()
    credit = torch.where(counted, credit.double(), torch.zeros_like(credit, dtype=torch.float64))
    return credit, counted


@dataclass
class Accuracy:
    """One accuracy figure with its bootstrap confidence interval.

    Attributes:
        value: the accuracy (mean credit; per-prompt mean for the ``hpsv2`` protocol).
        low, high: the percentile bootstrap interval at `confidence` (prompts resampled).
        pairs: pairs counted; prompts: prompts with at least one counted pair.
        rule: the tie rule or protocol; tie_threshold / tie_space: how a reward tie is called.
        averaging: 'pairs' (micro) or 'prompts' (macro).
    """

    value: float
    low: float
    high: float
    pairs: int
    prompts: int
    rule: str
    averaging: str
    tie_threshold: float = 0.0
    tie_space: str = "score"
    confidence: float = 0.95
    bootstrap: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def pairwise_accuracy(
    first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None,
    rule: str = "exclude", tie_threshold: float = 0.0, tie_space: str = "score", bootstrap: int = 1000,
    confidence: float = 0.95, seed: int = 0,
) -> Accuracy:
    """Accuracy of scores `first` vs `second` against `labels` (1 / 0 / 0.5 / NaN) under `rule`.

    The confidence interval resamples prompts (`groups`), not pairs: pairs of one prompt share images and
    are not independent. ``bootstrap=0`` skips it (low = high = value).

    Example:
        >>> pairwise_accuracy(torch.tensor([2., 1.]), torch.tensor([1., 1.]), torch.tensor([1., 0.]), rule="exclude").value
        0.75
    """
    rule = check_rule(rule)
    first, second, labels = (torch.as_tensor(t).reshape(-1) for t in (first, second, labels))
    if not (len(first) == len(second) == len(labels)):
        raise ValueError(f"first, second and labels need one entry per pair; got {len(first)}, {len(second)}, {len(labels)}.")
    groups = torch.arange(len(first)) if groups is None else torch.as_tensor(groups).reshape(-1).long()
    credit, counted = pair_credit(first, second, labels, rule, tie_threshold, tie_space)
    macro = rule == "hpsv2"
    if rule == "pickscore":
        tie_space = "prob"
    # Per-group sums: the statistic and its bootstrap only need (credit sum, count) per group.
    _, inv = torch.unique(groups, return_inverse=True)
    n_groups = int(inv.max()) + 1 if len(inv) else 0
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, credit).numpy()
    counts = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, counted.double()).numpy()
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    value = _statistic(sums, counts, macro)
    low = high = value
    if bootstrap > 0 and len(sums) > 1:
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1); got {confidence}.")
        rng = np.random.default_rng(seed)
        stats = np.empty(bootstrap)
        # Chunks keep the (chunk, G) index matrix small for large sets.
        chunk = max(1, 2_000_000 // max(len(sums), 1))
        for start in range(0, bootstrap, chunk):
            idx = rng.integers(0, len(sums), size=(min(chunk, bootstrap - start), len(sums)))
            if macro:
                stats[start:start + len(idx)] = (sums[idx] / counts[idx]).mean(axis=1)
            else:
                stats[start:start + len(idx)] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
        alpha = (1 - confidence) / 2
        low, high = (float(q) for q in np.quantile(stats, [alpha, 1 - alpha]))
    return Accuracy(value, low, high, int(counts.sum()), int(len(counts)), rule, "prompts" if macro else "pairs",
                    tie_threshold, tie_space, confidence, bootstrap if len(sums) > 1 else 0)


def _statistic(sums: np.ndarray, counts: np.ndarray, macro: bool) -> float:
    if counts.sum() == 0:
        return float("nan")
    return float((sums / counts).mean()) if macro else float(sums.sum() / counts.sum())


def best_tie_threshold(
    first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor,
    thresholds: Sequence[float] = tuple(i / 10 for i in range(11)),
) -> tuple[float, list[float]]:
    """PickScore's threshold search: the ``pickscore``-protocol accuracy for each threshold (on softmax
    probabilities) and the best one (the first on equal accuracy). Use it on a validation split."""
    accs = [float(pairwise_accuracy(first, second, labels, rule="pickscore", tie_threshold=t, bootstrap=0).value)
            for t in thresholds]
    best = int(np.argmax(accs))
    return float(thresholds[best]), accs
