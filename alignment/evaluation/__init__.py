"""Which reward, and how far to trust it: pairwise accuracy on the public preference sets (tie rule
stated), calibration statistics for normalisation, and bias probes.

One file per concern: `data` (the in-memory set), `loaders` (each official layout), `accuracy` (tie rules,
protocols, bootstrap), `cache` (resumable scores), `scoring` (decoding workers, batched multi-reward
scoring), `harness` (the accuracy run), `calibration`, `probes`, `oracle` (sets labelled by a known
oracle), `toyworld` (the toy world's exact oracle as the truth), `published` (the numbers to compare
with), `report` (JSON, markdown, charts).

Example:
    >>> from alignment.evaluation import evaluate
    >>> res = evaluate("pickapic_test.parquet", ["pickscore", "hpsv2.1"], cache_dir="scores/")
    >>> res.get("pickscore").value          # official protocol of the set
"""

from .accuracy import PROTOCOLS, RULES, Accuracy, best_tie_threshold, pair_credit, pairwise_accuracy
from .cache import ScoreCache, reward_fingerprint
from .calibration import calibration_stats, distribution_stats, save_calibration
from .data import ImageRef, PreferenceSet, rank_list_pairs
from .harness import EvalResult, evaluate, evaluate_set, load_rewards
from .loaders import LAYOUTS, detect_layout, load_preference_set
from .oracle import oracle_agreement, oracle_preference_set
from .probes import EDITS, run_probes
from .toyworld import toyworld_agreement, toyworld_preference_set

__all__ = [
    "PROTOCOLS", "RULES", "Accuracy", "best_tie_threshold", "pair_credit", "pairwise_accuracy", "ScoreCache",
    "reward_fingerprint", "calibration_stats", "distribution_stats", "save_calibration", "ImageRef",
    "PreferenceSet", "rank_list_pairs", "EvalResult", "evaluate", "evaluate_set", "load_rewards", "LAYOUTS",
    "detect_layout", "load_preference_set", "oracle_agreement", "oracle_preference_set", "EDITS", "run_probes",
    "toyworld_agreement", "toyworld_preference_set",
]
