"""Alarm rules over the series of validation records. Pure functions of the history: each rule looks at
the records so far (the first is the base model's, at step 0) and says whether it fires now.

A record is a dict of floats with a ``step`` key. Values are compared with the base record's
(``relative_change``), so one tolerance fits rewards of any scale.

Example:
    >>> history = [{"step": 0, "r": 1.0, "e": 1.0}, {"step": 10, "r": 1.4, "e": 1.2}, {"step": 20, "r": 1.9, "e": 0.9}]
    >>> divergence(history, "r", "e", tolerance=0.05)
    Alarm(rule='divergence', step=20, key='e', message=...)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

_EPS = 1e-8


@dataclass(frozen=True)
class Alarm:
    """A rule that fired: which, at which step, on which metric, and why in words."""

    rule: str
    step: int
    key: str
    message: str

    def to_dict(self) -> dict:
        return {"rule": self.rule, "step": self.step, "key": self.key, "message": self.message}


def relative_change(value: float, base: float) -> float:
    """(value − base) / |base|; the plain difference when the base is ~0 (its relative scale is undefined)."""
    return (value - base) / abs(base) if abs(base) > _EPS else value - base


def _series(history: Sequence[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def divergence(
    history: Sequence[dict], train_key: str, eval_key: str, tolerance: float = 0.05, patience: int = 1
) -> Alarm | None:
    """The training reward kept rising while a held-out evaluation reward fell from its peak.

    Fires at the latest record when, for the last `patience` records in a row, the evaluation reward is
    more than `tolerance` (relative to its base value) below its best value so far and the training reward
    is above its value at that best record.
    """
    if tolerance < 0 or patience < 1:
        raise ValueError(f"divergence needs tolerance >= 0 and patience >= 1; got {tolerance}, {patience}.")
    train, ev = dict(_series(history, train_key)), _series(history, eval_key)
    if len(ev) < 2 or not train:
        return None
    base_eval, base_train = ev[0][1], train.get(ev[0][0], next(iter(train.values())))

    def fires(i: int) -> tuple[bool, int, float]:
        peak_i = max(range(i), key=lambda j: ev[j][1]) if i > 0 else 0
        peak_step, peak = ev[peak_i]
        now_step, now = ev[i]
        drop = relative_change(peak, base_eval) - relative_change(now, base_eval)
        # The training reward at the peak, or the first one recorded after it (a windowed training reward
        # has no value at step 0).
        at_peak = next((v for st, v in sorted(train.items()) if st >= peak_step), None)
        rising = now_step in train and at_peak is not None and (
            relative_change(train[now_step], base_train) > relative_change(at_peak, base_train)
        )
        return drop > tolerance and rising, peak_step, drop

    if len(ev) - 1 < patience:
        return None
    checks = [fires(i) for i in range(len(ev) - patience, len(ev))]
    if not all(c[0] for c in checks):
        return None
    _, peak_step, drop = checks[-1]
    step = ev[-1][0]
    return Alarm(
        "divergence", step, eval_key,
        f"{train_key} kept rising while {eval_key} fell {drop:.1%} (of its base value) below its peak at step "
        f"{peak_step}: the training reward is being over-optimised.",
    )


def diversity_collapse(history: Sequence[dict], key: str, floor: float = 0.5) -> Alarm | None:
    """Per-prompt diversity dropped below `floor` times the base model's."""
    if not 0 <= floor <= 1:
        raise ValueError(f"diversity floor must be a fraction in [0, 1]; got {floor}.")
    s = _series(history, key)
    if len(s) < 2:
        return None
    base, (step, now) = s[0][1], s[-1]
    if base > _EPS and now < floor * base:
        return Alarm(
            "diversity_collapse", step, key,
            f"{key} fell to {now:.4g}, {now / base:.0%} of the base model's {base:.4g} (floor {floor:.0%}): "
            "samples of one prompt are becoming the same image.",
        )
    return None


def out_of_band(history: Sequence[dict], key: str, rel_band: float = 0.5, abs_band: float = 0.1) -> Alarm | None:
    """An image statistic left the band base ± max(abs_band, rel_band·|base|)."""
    if rel_band < 0 or abs_band < 0:
        raise ValueError(f"bands must be >= 0; got rel_band={rel_band}, abs_band={abs_band}.")
    s = _series(history, key)
    if len(s) < 2:
        return None
    base, (step, now) = s[0][1], s[-1]
    band = max(abs_band, rel_band * abs(base))
    if abs(now - base) > band:
        direction = "rose" if now > base else "fell"
        return Alarm(
            "image_statistic", step, key,
            f"{key} {direction} to {now:.4g} from the base model's {base:.4g} (band ±{band:.3g}).",
        )
    return None
