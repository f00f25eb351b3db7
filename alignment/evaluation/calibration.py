"""Calibration statistics: each reward's score distribution per dimension on a reference set.

Saved as JSON (``format: reward-plugins/calibration``) that `CompositeReward.load_calibration` and the
reward fine-tuning trainer (``reward.calibration_file``) read instead of estimating mean and std from one
first batch::

    {"format": "reward-plugins/calibration", "version": 1, "reference": {...},
     "rewards": {"pickscore": {"fingerprint": "...", "selection": {"pickscore": 1.0},
                               "dimensions": {"pickscore": {"n": 500, "mean": 20.1, "std": 1.3,
                                                            "min": ..., "max": ..., "quantiles": {"0.05": ...}}}}}}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .data import PreferenceSet
from .scoring import LoadedReward, score_images

CALIBRATION_FORMAT = "reward-plugins/calibration"
CALIBRATION_VERSION = 1
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def distribution_stats(values: Sequence[float] | torch.Tensor, quantiles: Sequence[float] = QUANTILES) -> dict:
    """n, mean, std (unbiased), min, max and quantiles (linear interpolation) of finite `values`.

    Raises:
        ValueError: fewer than 2 finite values (no spread to estimate).
    """
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    v = v[torch.isfinite(v)]
    if len(v) < 2:
        raise ValueError(f"calibration needs at least 2 scored images; got {len(v)}.")
    q = torch.quantile(v, torch.tensor(list(quantiles), dtype=torch.float64))
    return {
        "n": int(len(v)), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
        "max": float(v.max()), "quantiles": {f"{p:g}": float(x) for p, x in zip(quantiles, q)},
    }


def calibration_stats(
    pset: PreferenceSet, rewards: Mapping[str, LoadedReward], batch_size: int = 16, workers: int = 0,
    progress: bool = True, strict: bool = False,
) -> dict:
    """Score every image of `pset` (cached) and summarise each reward's every dimension.

    Each distinct scoring unit counts once (a prompt-free reward scores an image once, whatever prompts
    it appears with).
    """
    prompts = [pset.prompt_of(i) for i in range(len(pset.images))]
    indices = [i for i, ref in enumerate(pset.images) if ref.exists()]
    stats = score_images(rewards, pset.images, prompts, indices, batch_size, workers, progress, strict)
    out: dict = {
        "format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION,
        "reference": {"name": pset.name, "layout": pset.layout, "images": len(indices),
                      "unreadable": len(stats.failed), "missing": len(pset.images) - len(indices)},
        "rewards": {},
    }
    for name, r in rewards.items():
        rows: dict[str, dict[str, float]] = {}
        for i in indices:
            k = r.key(pset.images[i], prompts[i])
            row = r.cache.get(k)
            if row is not None:
                rows[k] = row
        dims = sorted({d for row in rows.values() for d in row})
        out["rewards"][name] = {
            "fingerprint": r.cache.fingerprint,
            "selection": dict(getattr(r.model, "selection", {}) or {}),
            "dimensions": {d: distribution_stats([row[d] for row in rows.values() if d in row]) for d in dims},
        }
    return out


def save_calibration(stats: Mapping, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=2) + "\n")
    return path


def calibration_table(stats: Mapping) -> str:
    """A markdown table: reward, dimension, n, mean, std, 5 / 50 / 95 % quantiles."""
    lines = ["| reward | dimension | n | mean | std | q05 | median | q95 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in stats["rewards"].items():
        for d, s in r["dimensions"].items():
            q = s["quantiles"]
            cells = [s["mean"], s["std"], q.get("0.05", math.nan), q.get("0.5", math.nan), q.get("0.95", math.nan)]
            lines.append(f"| {name} | {d} | {s['n']} | " + " | ".join(f"{c:.4g}" for c in cells) + " |")
    return "\n".join(lines)
