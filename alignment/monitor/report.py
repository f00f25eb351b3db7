"""The monitor's run report: the validation images of each validation side by side (one column per
validation, the same prompts and seeds in every row), with the monitor's signals plotted under them and
the alarms marked.

Example:
    >>> save_validation_grid(images, "runs/a", step=40)         # at each validation
    >>> write_run_report("runs/a", monitor)                     # runs/a/monitor_report.png
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .rules import relative_change

GRIDS_DIR = "monitor_grids"
REPORT_FILE = "monitor_report.png"
THUMB = 64
MAX_ROWS = 8
MAX_COLUMNS = 12


def save_validation_grid(images: torch.Tensor, output_dir: str | os.PathLike, step: int, rows: int = MAX_ROWS) -> Path:
    """A one-column strip of the first `rows` validation images at `step` (``monitor_grids/step-<n>.png``)."""
    from PIL import Image

    x = images[:rows].detach().float().clamp(0, 1).cpu()
    strip = Image.new("RGB", (THUMB, THUMB * x.shape[0]), "white")
    for i, img in enumerate(x):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        strip.paste(Image.fromarray(arr).resize((THUMB, THUMB), Image.NEAREST), (0, i * THUMB))
    path = Path(output_dir) / GRIDS_DIR / f"step-{int(step):07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path


def _pick(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def write_run_report(output_dir: str | os.PathLike, monitor) -> Path | None:
    """Compose ``monitor_report.png``: grids over time on top, signal curves with alarm markers below.

    Returns None when the run has no saved grids and no history (nothing to show).
    """
    from PIL import Image, ImageDraw

    from alignment.plots import line_chart
    from alignment.report import _font

    root = Path(output_dir)
    grids = sorted((root / GRIDS_DIR).glob("step-*.png")) if (root / GRIDS_DIR).is_dir() else []
    history = monitor.history
    if not grids and not history:
        return None
    markers = [(a.step, a.rule) for a in monitor.alarms]
    charts = []
    base = history[0] if history else {}
    reward_keys = [k for k in [monitor.section.train_key, *monitor.eval_keys(history[-1])] if k in base] if history else []
    groups = {
        "rewards relative to the base model": reward_keys,
        "per-prompt diversity and drift": ["monitor/diversity/pixel", "monitor/diversity/embedding",
                                           "monitor/drift/pixel", "monitor/drift/embedding"],
        "image statistics": [f"monitor/stat/{s}" for s in monitor.section.statistics],
    }
    for title, keys in groups.items():
        relative = title.startswith("rewards")
        # Labels keep the kind ("diversity/pixel" vs "drift/pixel"): the last part alone would collide.
        series = {k.removeprefix("monitor/"): [(r["step"], relative_change(r[k], base[k]) if relative else r[k])
                                               for r in history if k in r] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        tmp = root / f".monitor_chart_{len(charts)}.png"
        line_chart(series, tmp, title=title, xlabel="step", markers=markers)
        charts.append(Image.open(tmp).convert("RGB"))
        tmp.unlink()

    font = _font(12)
    columns = [Image.open(p).convert("RGB") for p in _pick(grids, MAX_COLUMNS)]
    labels = [p.stem.split("-", 1)[1].lstrip("0") or "0" for p in _pick(grids, MAX_COLUMNS)]
    grid_w = sum(c.width + 6 for c in columns)
    grid_h = max((c.height for c in columns), default=0) + (20 if columns else 0)
    width = max([grid_w + 12] + [c.width for c in charts])
    height = grid_h + sum(c.height for c in charts) + 12
    page = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(page)
    alarm_steps = {a.step for a in monitor.alarms}
    x = 6
    for col, label in zip(columns, labels):
        step = int(label)
        colour = (220, 38, 38) if step in alarm_steps else (17, 24, 39)
        best = monitor.best is not None and monitor.best["step"] == step
        d.text((x, 2), f"{label}{' best' if best else ''}", fill=(22, 163, 74) if best else colour, font=font)
        page.paste(col, (x, 18))
        x += col.width + 6
    y = grid_h + 6
    for c in charts:
        page.paste(c, (0, y))
        y += c.height
    path = root / REPORT_FILE
    page.save(path)
    return path
