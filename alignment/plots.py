"""Line charts as PNG (Pillow only): reward against N for best-of-N, and training curves from
`metrics.jsonl`. People would rather look at a curve than read a log.

Example:
    >>> line_chart({"train": [(0, 1.0), (1, 2.0)]}, "curve.png", title="reward", xlabel="step")
    >>> plot_metrics("runs/a/metrics.jsonl", ["loss", "reward/mean"], "runs/a/curves.png")
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

PALETTE = [(37, 99, 235), (22, 163, 74), (220, 38, 38), (217, 119, 6), (124, 58, 237), (8, 145, 178)]


def _ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """About `n` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) within [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _label(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (720, 420),
    markers: Sequence[tuple[float, str]] = (),
) -> Path:
    """Draw one line per series (points (x, y); non-finite y skipped) with axes, ticks and a legend.

    `markers` are (x, label) pairs drawn as dashed red vertical lines (e.g. where a monitor alarm fired).

    Raises:
        ValueError: no series has a finite point.
    """
    from PIL import Image, ImageDraw, ImageFont

    clean = {k: [(float(x), float(y)) for x, y in pts if math.isfinite(float(y))] for k, pts in series.items()}
    clean = {k: v for k, v in clean.items() if v}
    if not clean:
        raise ValueError(f"nothing to plot: the series {list(series)} have no finite points.")
    xs = [x for pts in clean.values() for x, _ in pts] + [float(x) for x, _ in markers]
    ys = [y for pts in clean.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or max(abs(y0) * 0.1, 1e-3)
    y0, y1 = y0 - pad, y1 + pad

    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
    except (TypeError, OSError):
        font = ImageFont.load_default()
    left, right, top, bottom = 70, w - 20, 40, h - 50
    sx = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731
    sy = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
    for t in _ticks(y0, y1):
        d.line([(left, sy(t)), (right, sy(t))], fill=(229, 231, 235))
        d.text((8, sy(t) - 7), _label(t), fill=(75, 85, 99), font=font)
    x_ticks = _ticks(x0, x1)
    if all(float(x).is_integer() for x in xs):  # counts and steps: no 2.5 ticks
        x_ticks = [t for t in x_ticks if float(t).is_integer()] or x_ticks
    for t in x_ticks:
        d.line([(sx(t), bottom), (sx(t), bottom + 4)], fill=(75, 85, 99))
        d.text((sx(t) - 10, bottom + 8), _label(t), fill=(75, 85, 99), font=font)
    d.rectangle([left, top, right, bottom], outline=(107, 114, 128))
    d.text((left, 12), title, fill=(17, 24, 39), font=font)
    d.text(((left + right) // 2 - 4 * len(xlabel), h - 22), xlabel, fill=(75, 85, 99), font=font)
    if ylabel:
        d.text((left + 6, top + 4), ylabel, fill=(75, 85, 99), font=font)
    for mx, label in markers:
        px = sx(float(mx))
        for y in range(top, bottom, 8):
            d.line([(px, y), (px, min(y + 4, bottom))], fill=(220, 38, 38), width=1)
        d.text((px + 3, bottom - 16), str(label)[:18], fill=(220, 38, 38), font=font)
    for i, (name, pts) in enumerate(clean.items()):
        color = PALETTE[i % len(PALETTE)]
        xy = [(sx(x), sy(y)) for x, y in sorted(pts)]
        if len(xy) > 1:
            d.line(xy, fill=color, width=2)
        for px, py in xy if len(xy) <= 40 else []:
            d.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=color)
        ly = top + 6 + 16 * i
        d.line([(right - 170, ly + 7), (right - 150, ly + 7)], fill=color, width=3)
        d.text((right - 145, ly), name[:22], fill=(17, 24, 39), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def expected_best_of(scores: torch.Tensor) -> list[tuple[int, float]]:
    """E[max score of m images drawn without replacement from the N per prompt], averaged over prompts,
    for m = 1..N: the reward a best-of-m sampler gets, estimated from one best-of-N run.

    With the N scores of a prompt sorted ascending, s_(1) <= ... <= s_(N), the max of a random m-subset is
    s_(i) with probability C(i-1, m-1) / C(N, m).

    Example:
        >>> expected_best_of(torch.tensor([[1.0, 2.0, 3.0]]))
        [(1, 2.0), (2, 2.6666666666666665), (3, 3.0)]
    """
    s = torch.sort(scores.double(), dim=1).values  # (P, N) ascending
    n = s.shape[1]
    out = []
    for m in range(1, n + 1):
        weights = torch.tensor([math.comb(i - 1, m - 1) for i in range(1, n + 1)], dtype=torch.float64)
        out.append((m, float((s @ (weights / math.comb(n, m))).mean())))
    return out


def plot_metrics(jsonl: str | Path, keys: Sequence[str], path: str | Path, title: str = "",
                 markers: Sequence[tuple[float, str]] = ()) -> Path | None:
    """Training curves of `keys` (each a line; missing keys skipped) from a `metrics.jsonl`; None if empty.

    `markers`: (step, label) vertical lines, e.g. the monitor's alarms.
    """
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()] if Path(jsonl).is_file() else []
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    return line_chart(series, path, title=title or Path(jsonl).parent.name, xlabel="step", markers=markers)
