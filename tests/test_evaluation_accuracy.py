"""Tie rules, official protocols and bootstrap intervals on hand-made scores."""

import math

import pytest
import torch

from alignment.evaluation.accuracy import best_tie_threshold, pair_credit, pairwise_accuracy
from alignment.evaluation.data import rank_list_pairs

# first, second, label: right, wrong, reward tie, human tie (reward decides), both tie, right (label 0)
FIRST = torch.tensor([2.0, 1.0, 1.5, 2.0, 0.8, 0.3])
SECOND = torch.tensor([1.0, 2.0, 1.5, 0.5, 0.8, 0.6])
LABELS = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.0])


@pytest.mark.parametrize("rule, expected, pairs", [
    ("exclude", 2.5 / 4, 4),       # human ties out; the reward tie counts half
    ("half", 3.5 / 6, 6),          # human ties 0.5 whatever the reward says
    ("predict", 4.0 / 6, 6),       # 3-way: both-tie = 1, one tie = 0.5
    ("imagereward", 2.0 / 4, 4),   # human ties out, a reward tie is wrong
    ("pickscore", 4.0 / 6, 6),     # predict on softmax probabilities, threshold 0
    ("hpsv2", 5.0 / 6, 6),         # only the strict inversion is wrong; one pair per prompt here
])
def test_each_rule_gives_the_hand_computed_accuracy(rule, expected, pairs):
    acc = pairwise_accuracy(FIRST, SECOND, LABELS, rule=rule, bootstrap=0)
    assert acc.value == pytest.approx(expected)
    assert acc.pairs == pairs
    assert acc.rule == rule


def test_tie_threshold_turns_small_gaps_into_ties():
    # |0.3 - 0.6| = 0.3 <= 0.35: the last pair becomes a reward tie (0.5 under exclude).
    acc = pairwise_accuracy(FIRST, SECOND, LABELS, rule="exclude", tie_threshold=0.35, bootstrap=0)
    assert acc.value == pytest.approx(2.0 / 4)
    # On probabilities: tanh(0.15) = 0.149 <= 0.2 is a tie; tanh(0.5) = 0.46 is not.
    cred, counted = pair_credit(FIRST, SECOND, LABELS, "predict", tie_threshold=0.2, tie_space="prob")
    assert cred[5] == 0.5 and cred[0] == 1.0 and counted.all()


def test_hpsv2_protocol_averages_per_prompt_and_imagereward_per_pair():
    # prompt 0: 3 pairs, 2 right; prompt 1: 1 pair, wrong.
    first = torch.tensor([3.0, 3.0, 1.0, 0.0])
    second = torch.tensor([1.0, 2.0, 2.0, 1.0])
    labels = torch.tensor([1.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1])
    assert pairwise_accuracy(first, second, labels, groups, "hpsv2", bootstrap=0).value == pytest.approx((2 / 3 + 0) / 2)
    assert pairwise_accuracy(first, second, labels, groups, "imagereward", bootstrap=0).value == pytest.approx(2 / 4)


def test_bootstrap_interval_brackets_the_value_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    n = 400
    first, second = torch.randn(n, generator=g), torch.randn(n, generator=g)
    labels = ((first - second + 0.8 * torch.randn(n, generator=g)) > 0).double()
    groups = torch.arange(n) // 4
    a = pairwise_accuracy(first, second, labels, groups, "exclude", bootstrap=500, seed=1)
    b = pairwise_accuracy(first, second, labels, groups, "exclude", bootstrap=500, seed=1)
    assert a.low < a.value < a.high and (a.low, a.high) == (b.low, b.high)
    assert 0.03 < a.high - a.low < 0.2 and a.prompts == 100
    # A perfect reward has a degenerate interval at 1.
    p = pairwise_accuracy(first, second, (first > second).double(), groups, "exclude", bootstrap=200)
    assert p.value == p.low == p.high == 1.0


def test_unlabelled_pairs_are_never_counted():
    labels = torch.tensor([1.0, math.nan, 0.0])
    acc = pairwise_accuracy(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]), labels, rule="half", bootstrap=0)
    assert acc.pairs == 2 and acc.value == 1.0


def test_rank_lists_expand_to_every_pair_with_ties():
    pairs, labels = rank_list_pairs([1, 3, 2, 1])
    assert pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert labels == [1.0, 1.0, 0.5, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="finite"):
        rank_list_pairs([1, float("nan")])


def test_best_tie_threshold_searches_like_pickscore():
    # Three clear wins and three human ties whose scores are close: a threshold above the close gaps wins.
    first = torch.tensor([5.0, 5.0, 5.0, 1.0, 1.0, 1.0])
    second = torch.tensor([0.0, 0.0, 0.0, 1.1, 0.9, 1.05])
    labels = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.5])
    best, accs = best_tie_threshold(first, second, labels)
    assert accs[0] == pytest.approx((3 + 1.5) / 6) and best > 0 and max(accs) == pytest.approx(1.0)


def test_bad_rule_and_lengths_are_clear_errors():
    with pytest.raises(ValueError, match="tie rules: exclude, half, predict"):
        pairwise_accuracy(FIRST, SECOND, LABELS, rule="ties")
    with pytest.raises(ValueError, match="one entry per pair"):
        pairwise_accuracy(FIRST, SECOND[:2], LABELS)
    with pytest.raises(ValueError, match="tie_space"):
        pairwise_accuracy(FIRST, SECOND, LABELS, tie_space="logit")
