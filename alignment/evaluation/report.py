"""Reports of an evaluation run: JSON, markdown tables (one in LeScore's README layout) and PNG charts."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..plots import PALETTE, _ticks, line_chart
from .harness import EvalResult
from .probes import EDITS, ProbeResult
from .published import LAYOUT_COLUMN, LESCORE_COLUMNS, LESCORE_TABLE


def _fmt(x: float | None, digits: int = 3) -> str:
    return "/" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def accuracy_table(results: Sequence[EvalResult]) -> str:
    """Every (dataset, reward, dimension, rule) with its interval, pairs and prompts counted."""
    lines = ["| dataset | reward | dimension | rule | accuracy | 95 % CI | pairs | prompts |",
             "|---|---|---|---|---:|---|---:|---:|"]
    for res in results:
        for r in res.rows:
            rule = r.rule + (" (official)" if r.official else "")
            dim = r.dimension + (f" ← {r.reward_dimension}" if r.reward_dimension else "")
            if r.accuracy is None:
                lines.append(f"| {res.dataset['name']} | {r.reward} | {dim} | {rule} | skipped: {r.skipped} | | | |")
                continue
            a = r.accuracy
            ci = f"[{_fmt(a.low)}, {_fmt(a.high)}]" if a.bootstrap else "—"
            lines.append(f"| {res.dataset['name']} | {r.reward} | {dim} | {rule} | {_fmt(a.value)} | {ci} | "
                         f"{a.pairs} | {a.prompts} |")
    return "\n".join(lines)


def lescore_table(results: Sequence[EvalResult], multi_dimension: Mapping[str, bool] | None = None,
                  include_published: bool = True) -> str:
    """LeScore's README table (official protocol of each set) with this run's rewards under the published
    rows; columns for sets that table lacks (MHP, own pairs) are appended."""
    extra_cols: list[str] = []
    found: dict[str, dict[str, float]] = {}
    for res in results:
        col = LAYOUT_COLUMN.get(res.dataset["layout"])
        for r in res.rows:
            if not r.official or r.accuracy is None:
                continue
            if res.dataset["layout"] in LAYOUT_COLUMN and r.dimension != res.dataset["dimensions"][0]:
                continue
            c = col or f"{Path(res.dataset['name']).name} ({r.dimension})"
            if c not in LESCORE_COLUMNS and c not in extra_cols:
                extra_cols.append(c)
            found.setdefault(r.reward, {})[c] = r.accuracy.value
    head = [*LESCORE_COLUMNS, *extra_cols]
    lines = ["| " + " | ".join(head) + " |", "|:" + "|:".join("-" * len(h) for h in head) + "|"]
    if include_published:
        for m, multi, human, pick, hpd, ir, mean in LESCORE_TABLE:
            cells = [m, "✔" if multi else "", "✔" if human else "", _fmt(pick), _fmt(hpd), _fmt(ir), _fmt(mean)]
            lines.append("| " + " | ".join(cells + [""] * len(extra_cols)) + " |")
    for name, accs in found.items():
        three = [accs.get(c) for c in ("Pick-a-Pic v1", "HPD v2", "ImageRewardDB")]
        mean = sum(three) / 3 if all(v is not None for v in three) else None
        multi = "✔" if (multi_dimension or {}).get(name) else ""
        cells = [f"**{name}** (this run)", multi, "", *(_fmt(v) for v in three), _fmt(mean),
                 *(_fmt(accs.get(c)) for c in extra_cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(bars: Sequence[tuple[str, float, float, float]], path: str | os.PathLike, title: str = "",
              xlabel: str = "", lo: float | None = None, hi: float | None = None) -> Path:
    """Horizontal bars (label, value, low, high) with interval whiskers, Pillow only."""
    from PIL import Image, ImageDraw, ImageFont

    bars = [b for b in bars if math.isfinite(b[1])]
    if not bars:
        raise ValueError("nothing to plot: no finite values.")
    vals = [v for b in bars for v in b[1:] if math.isfinite(v)]
    lo = min(vals) if lo is None else lo
    hi = max(vals) if hi is None else hi
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    row, left, right, top = 26, 230, 80, 40  # the right margin holds the value labels
    w, h = 760, top + row * len(bars) + 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
    except (TypeError, OSError):
        font = ImageFont.load_default()
    sx = lambda x: left + (x - lo) / (hi - lo) * (w - left - right)  # noqa: E731
    bottom = top + row * len(bars)
    for t in _ticks(lo, hi):
        d.line([(sx(t), top), (sx(t), bottom)], fill=(229, 231, 235))
        d.text((sx(t) - 12, bottom + 6), f"{t:.3g}", fill=(75, 85, 99), font=font)
    base = 0.0 if lo < 0 < hi else lo  # bars grow from zero when values straddle it
    for i, (label, v, a, b) in enumerate(bars):
        y = top + i * row
        color = PALETTE[i % len(PALETTE)]
        x0, x1 = sorted((sx(base), sx(v)))
        d.rectangle([x0, y + 5, max(x1, x0 + 1), y + row - 5], fill=color)
        if math.isfinite(a) and math.isfinite(b) and b > a:
            d.line([(sx(a), y + row // 2), (sx(b), y + row // 2)], fill=(17, 24, 39), width=2)
            for x in (sx(a), sx(b)):
                d.line([(x, y + 7), (x, y + row - 7)], fill=(17, 24, 39), width=2)
        d.text((8, y + 6), label[:34], fill=(17, 24, 39), font=font)
        end = max(v, b) if math.isfinite(b) else v
        d.text((min(max(sx(end), sx(base)) + 6, w - 70), y + 6), f"{v:.3f}", fill=(17, 24, 39), font=font)
    d.text((left, 12), title, fill=(17, 24, 39), font=font)
    d.text(((left + w) // 2 - 4 * len(xlabel), h - 22), xlabel, fill=(75, 85, 99), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def accuracy_charts(results: Sequence[EvalResult], out_dir: str | os.PathLike) -> list[Path]:
    """One bar chart per (dataset, dimension): each reward's official-protocol accuracy with its CI."""
    paths = []
    for res in results:
        for dim in res.dataset["dimensions"]:
            bars = [(r.reward, r.accuracy.value, r.accuracy.low, r.accuracy.high) for r in res.rows
                    if r.official and r.dimension == dim and r.accuracy is not None]
            if not bars:
                continue
            name = Path(res.dataset["name"]).stem or res.dataset["layout"]
            p = Path(out_dir) / f"accuracy_{_safe(res.dataset['layout'])}_{_safe(name)}_{_safe(dim)}.png"
            title = f"{res.dataset['layout']} / {dim}: pairwise accuracy ({res.dataset['protocol']} protocol, 95 % CI)"
            paths.append(bar_chart(bars, p, title=title, xlabel="accuracy", lo=0.0, hi=1.0))
    return paths


def probe_charts(result: ProbeResult, out_dir: str | os.PathLike) -> list[Path]:
    """One line chart per edit (score change in spreads against strength, a line per reward, the
    unedited point at 0) and a bar chart of the prompt-shuffle drop."""
    paths = []
    for e, ed in EDITS.items():
        series = {}
        for r in result.rows:
            if r.probe == e:
                series.setdefault(r.reward, [(ed.neutral, 0.0)]).append((r.strength, r.relative_change))
        if series:
            paths.append(line_chart(series, Path(out_dir) / f"probe_{e}.png", title=f"{e}: score change / spread",
                                    xlabel=ed.unit, ylabel="score change / std"))
    shuffle = [(r.reward, r.relative_change, math.nan, math.nan) for r in result.rows if r.probe == "prompt_shuffle"]
    if shuffle:
        vals = [v for _, v, _, _ in shuffle if math.isfinite(v)]
        if vals:
            paths.append(bar_chart(shuffle, Path(out_dir) / "probe_prompt_shuffle.png",
                                   title="another image's prompt: score change / spread", xlabel="score change / std",
                                   lo=min(0.0, *vals), hi=max(0.0, *vals) or 1e-3))
    return paths


def _clean(obj):
    """NaN / inf -> None, so the file is strict JSON (an accuracy with no counted pair is NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(obj: Mapping, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(obj), indent=2, allow_nan=False, default=float) + "\n")
    return path
