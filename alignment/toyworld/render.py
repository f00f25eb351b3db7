"""Procedural renderer with exact ground truth: one anti-aliased filled shape on a plain background.

A shape is placed by its area centroid ``(cx, cy)`` (fractions of the image side) and sized by its area
(a fraction of the image). Coverage is computed by 4 x 4 supersampling, so edges are smooth and the
same function draws the oracle's shape templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .world import BACKGROUND, COLORS, POSITIONS, RESOLUTION, SHAPES, Attributes

AREA_RANGE = (0.06, 0.09)  # shape area as a fraction of the image
JITTER = 0.02  # max offset of the centroid from its position anchor, fraction of the side
TRIANGLE_ASPECT = 0.85  # height / base of the apex-up isosceles triangle
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """A rendered scene's exact ground truth: attributes, centroid (fractions, y down) and area fraction."""

    attrs: Attributes
    cx: float
    cy: float
    area: float


def _grid(res: int, supersample: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    # Sub-pixel centres in pixel units: pixel i spans [i, i + 1).
    n = res * supersample
    c = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / supersample
    return c.view(1, n, 1), c.view(1, 1, n)  # y (rows), x (columns)


def shape_coverage(
    shape: str, cx: torch.Tensor, cy: torch.Tensor, area: torch.Tensor, res: int = RESOLUTION,
    supersample: int = SUPERSAMPLE,
) -> torch.Tensor:
    """Per-pixel coverage in [0, 1] of a filled shape, (B, res, res), for B centroids and areas.

    Args:
        shape: one of `SHAPES`.
        cx, cy: (B,) area centroids in pixels (x right, y down).
        area: (B,) areas in square pixels.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}.")
    y, x = _grid(res, supersample, cx.device)
    cx, cy, area = (t.float().view(-1, 1, 1) for t in (cx, cy, area))
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= area / torch.pi
    elif shape == "square":
        half = area.sqrt() / 2
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    else:  # triangle, apex up; its centroid is a third of the height above the base
        base = (area / (TRIANGLE_ASPECT / 2)).sqrt()
        height = TRIANGLE_ASPECT * base
        t = (dy + 2 * height / 3) / height  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (dx.abs() <= base / 2 * t)
    cov = inside.float()
    b = cov.shape[0]
    return cov.view(b, res, supersample, res, supersample).mean(dim=(2, 4))


def sample_scenes(attrs: Sequence[Attributes], generator: torch.Generator | None = None) -> list[Scene]:
    """Random placement (jittered around the position anchor) and size for each requested scene."""
    n = len(attrs)
    u = torch.rand(n, 3, generator=generator)
    scenes = []
    for a, (ux, uy, ua) in zip(attrs, u.tolist()):
        ax, ay = POSITIONS[a.position]
        area = AREA_RANGE[0] + (AREA_RANGE[1] - AREA_RANGE[0]) * ua
        scenes.append(Scene(a, ax + JITTER * (2 * ux - 1), ay + JITTER * (2 * uy - 1), area))
    return scenes


def render_scenes(scenes: Sequence[Scene], res: int = RESOLUTION) -> torch.Tensor:
    """(B, 3, res, res) float images in [0, 1] of the given scenes."""
    if not scenes:
        raise ValueError("render_scenes needs at least one scene.")
    out = torch.tensor(BACKGROUND).view(1, 3, 1, 1).repeat(len(scenes), 1, res, res)
    for shape in SHAPES:
        idx = [i for i, s in enumerate(scenes) if s.attrs.shape == shape]
        if not idx:
            continue
        sel = [scenes[i] for i in idx]
        cov = shape_coverage(
            shape,
            torch.tensor([s.cx * res for s in sel]),
            torch.tensor([s.cy * res for s in sel]),
            torch.tensor([s.area * res * res for s in sel]),
            res,
        ).unsqueeze(1)
        color = torch.tensor([COLORS[s.attrs.color] for s in sel]).view(-1, 3, 1, 1)
        out[idx] = out[idx] * (1 - cov) + color * cov
    return out


def render(
    attrs: Sequence[Attributes], generator: torch.Generator | None = None, res: int = RESOLUTION
) -> tuple[torch.Tensor, list[Scene]]:
    """Render one scene per attribute set: (images (B, 3, res, res), exact ground truth per image).

    Example:
        >>> imgs, scenes = render([parse_caption("a red circle on the left")], torch.Generator().manual_seed(0))
    """
    scenes = sample_scenes(attrs, generator)
    return render_scenes(scenes, res), scenes
