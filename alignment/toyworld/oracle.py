"""Oracle rewards measured from pixels, with no learned part.

Exact oracle (the evaluation metric; not differentiable): resize to the world's 32 px, label each pixel
with its nearest palette colour (white background included; pixels far from every entry stay
unlabelled), take the most frequent object colour and its largest 8-connected component as *the
object*, estimate each of its pixels' coverage (the pixel's place on the background-to-colour line,
over the component grown by one pixel, so anti-aliased edges count by their share), then read off

- colour: the object's colour,
- shape: the template (circle, square, triangle of the object's area, placed at its centroid) with the
  highest IoU with the object's mask,
- position: the anchor nearest to the object's centroid.

Each dimension scores 1.0 when it equals the caption's and 0.0 otherwise; ``overall`` is 1.0 only when
all three do. An image with no object of at least `MIN_AREA` of the picture scores 0 everywhere.

Soft oracle (differentiable, for gradient methods): the same quantities with soft memberships:
``colour`` = mean closeness of object pixels to the named colour, ``shape`` = softmax over template
IoUs (templates placed at the detached soft centroid), ``position`` = a Gaussian of the soft centroid's
distance to the named anchor; ``overall`` = their mean. All lie in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .render import shape_coverage
from .world import BACKGROUND, COLORS, DIMENSIONS, POSITIONS, RESOLUTION, SHAPES, Attributes, parse_caption

COLOR_NAMES = tuple(COLORS)
POSITION_NAMES = tuple(POSITIONS)
MIN_AREA = 0.02  # fraction of the image an object needs (about 20 pixels at 32 px)
LABEL_RADIUS = 0.3  # RGB distance beyond which a pixel matches no palette entry
# Soft oracle constants.
MEMBERSHIP_TEMPERATURE = 0.02  # softmax temperature on squared RGB distance (background vs object)
COLOR_SIGMA2 = 0.5  # width of the colour closeness kernel (wide: gradients do not vanish on wrong colours)
POSITION_SIGMA = 0.2  # fraction of the side
SHAPE_TEMPERATURE = 0.05  # softmax temperature over template IoUs
EXPECTED_AREA = 0.075  # mid shape area; regularises the colour ratio of near-empty images


def palette(device=None, dtype=torch.float32) -> torch.Tensor:
    """(7, 3): the six colours in `COLOR_NAMES` order, then the background."""
    return torch.tensor([*COLORS.values(), BACKGROUND], device=device, dtype=dtype)


def to_world(images: torch.Tensor) -> torch.Tensor:
    """Images of any size to the world's 32 x 32, in float32 (area-average downsampling, differentiable)."""
    images = images.float()
    if images.shape[-2:] == (RESOLUTION, RESOLUTION):
        return images
    return F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True, align_corners=False)


def parse_prompts(prompts: Sequence[str]) -> list[Attributes]:
    return [parse_caption(p) for p in prompts]


def _largest_component(mask: torch.Tensor) -> torch.Tensor:
    """Largest 8-connected component of each (B, H, W) bool mask (label propagation by max-pooling)."""
    b, h, w = mask.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(b, h, w) * mask
    for _ in range(h * w):
        grown = F.max_pool2d(labels.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    flat = labels.view(b, -1).long()
    counts = torch.zeros(b, h * w + 1, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    counts[:, 0] = 0
    best = counts.argmax(dim=1)
    return (labels == best.view(b, 1, 1).float()) & mask


def _templates(cx: torch.Tensor, cy: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) coverage of circle, square and triangle templates of the given centroids and areas."""
    return torch.stack([shape_coverage(s, cx, cy, area, RESOLUTION) for s in SHAPES], dim=1)


def _iou(mask: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """Soft IoU of (B, H, W) masks with (B, K, H, W) templates -> (B, K)."""
    m = mask.unsqueeze(1)
    inter = (m * templates).sum(dim=(2, 3))
    union = (m + templates - m * templates).sum(dim=(2, 3))
    return inter / union.clamp_min(1e-6)


@torch.no_grad()
def analyze(images: torch.Tensor) -> list[Attributes | None]:
    """What the exact oracle sees in each image: its object's attributes, or None when there is none."""
    x = to_world(images).cpu()
    b, _, h, w = x.shape
    pal = palette()
    dist = (x.permute(0, 2, 3, 1).unsqueeze(-2) - pal).norm(dim=-1)  # (B, H, W, 7)
    dmin, label = dist.min(dim=-1)
    label = torch.where(dmin <= LABEL_RADIUS, label, torch.full_like(label, -1))
    n_colors = len(COLOR_NAMES)
    counts = torch.stack([(label == k).sum(dim=(1, 2)) for k in range(n_colors)], dim=1)  # (B, 6)
    dominant = counts.argmax(dim=1)
    mask = _largest_component(label == dominant.view(b, 1, 1))
    area = mask.sum(dim=(1, 2)).float()
    # Sub-pixel coverage of the object: each pixel's position on the background -> colour line, over the
    # component grown by one pixel (anti-aliased edges), so that small circles do not read as squares.
    color = pal[dominant].view(b, 3, 1, 1)
    bg = pal[-1].view(1, 3, 1, 1)
    alpha = (((x - bg) * (color - bg)).sum(1) / ((color - bg) ** 2).sum(1)).clamp(0, 1)
    grown = F.max_pool2d(mask.float().unsqueeze(1), 3, stride=1, padding=1).squeeze(1)
    alpha = alpha * grown
    mass = alpha.sum(dim=(1, 2)).clamp_min(1e-3)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    cx = (alpha * xs).sum(dim=(1, 2)) / mass
    cy = (alpha * ys).sum(dim=(1, 2)) / mass
    shape_idx = _iou(alpha, _templates(cx, cy, mass)).argmax(dim=1)
    anchors = torch.tensor(list(POSITIONS.values())) * torch.tensor([w, h])
    pos_idx = ((torch.stack([cx, cy], dim=1).unsqueeze(1) - anchors) ** 2).sum(-1).argmin(dim=1)
    out: list[Attributes | None] = []
    for i in range(b):
        if area[i] < MIN_AREA * h * w:
            out.append(None)
        else:
            out.append(Attributes(COLOR_NAMES[dominant[i]], SHAPES[shape_idx[i]], POSITION_NAMES[pos_idx[i]]))
    return out


def exact_scores(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Hard per-dimension accuracy (1.0 / 0.0) of each image against its caption, plus ``overall``."""
    wanted = parse_prompts(prompts)
    seen = analyze(images)
    res: dict[str, torch.Tensor] = {}
    for dim in DIMENSIONS:
        res[dim] = torch.tensor([float(s is not None and s.get(dim) == a.get(dim)) for s, a in zip(seen, wanted)])
    res["overall"] = res["color"] * res["shape"] * res["position"]
    return res


def soft_scores(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Differentiable per-dimension scores in [0, 1] (see the module docstring), plus ``overall`` (mean)."""
    wanted = parse_prompts(prompts)
    x = to_world(images)
    b, _, h, w = x.shape
    pal = palette(x.device)
    d2 = ((x.permute(0, 2, 3, 1).unsqueeze(-2) - pal) ** 2).sum(-1)  # (B, H, W, 7)
    member = torch.softmax(-d2 / MEMBERSHIP_TEMPERATURE, dim=-1)
    obj = 1 - member[..., -1]  # object mass per pixel
    mass = obj.sum(dim=(1, 2))
    target = torch.tensor([COLOR_NAMES.index(a.color) for a in wanted], device=x.device)
    close = torch.exp(-d2.gather(-1, target.view(b, 1, 1, 1).expand(b, h, w, 1)).squeeze(-1) / COLOR_SIGMA2)
    color = (obj * close).sum(dim=(1, 2)) / (mass + EXPECTED_AREA * h * w * 0.1)
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float32) + 0.5,
                            torch.arange(w, device=x.device, dtype=torch.float32) + 0.5, indexing="ij")
    cx = (obj * xs).sum(dim=(1, 2)) / mass.clamp_min(1e-3)
    cy = (obj * ys).sum(dim=(1, 2)) / mass.clamp_min(1e-3)
    anchors = torch.tensor([POSITIONS[a.position] for a in wanted], device=x.device)
    dist2 = (cx / w - anchors[:, 0]) ** 2 + (cy / h - anchors[:, 1]) ** 2
    position = torch.exp(-dist2 / (2 * POSITION_SIGMA**2))
    # Templates follow the object (detached), so the shape gradient reshapes the mask instead of moving it.
    templates = _templates(cx.detach(), cy.detach(), mass.detach().clamp_min(1.0))
    probs = torch.softmax(_iou(obj, templates) / SHAPE_TEMPERATURE, dim=1)
    shape = probs.gather(1, torch.tensor([SHAPES.index(a.shape) for a in wanted], device=x.device).view(b, 1)).squeeze(1)
    return {"color": color, "shape": shape, "position": position, "overall": (color + shape + position) / 3}
