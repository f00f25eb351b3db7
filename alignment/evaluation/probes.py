"""Bias probes: how a reward's score moves under controlled image edits and under prompt shuffling.

Edits (pure torch on (B, 3, H, W) in [0, 1], except JPEG which goes through Pillow): saturation (blend with
the luma image; 0 = greyscale), brightness (multiply), contrast (blend with the mean luma), Gaussian blur
(sigma in pixels), sharpening (unsharp mask amount, sigma 1 px), Gaussian noise (sigma, seeded) and JPEG
quality. For each reward, edit and strength: the mean score change, its std, the change in units of the
reward's spread over the unedited probe images (so rewards on different scales compare), and the fraction
of images whose score rose.

Prompt shuffle: each image scored with another image's prompt (a derangement across prompts): how much the
score depends on the prompt (mean drop in spread units), and how often an image scores higher with its own
prompt than with a stranger's. A prompt-free reward shows exactly 0.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import PreferenceSet
from .harness import parse_spec
from .scoring import LoadedReward, decode_image

LUMA = (0.299, 0.587, 0.114)


def _luma(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    g = _luma(x)
    return (g + factor * (x - g)).clamp(0, 1)


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    return (x * factor).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    m = _luma(x).mean(dim=(2, 3), keepdim=True)
    return (m + factor * (x - m)).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    # Reflect padding needs pad < size; tiny images fall back to replicate.
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    y = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, radius, radius), mode=mode), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def sharpen(x: torch.Tensor, amount: float) -> torch.Tensor:
    return (x + amount * (x - gaussian_blur(x, 1.0))).clamp(0, 1)


def add_noise(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g).to(x)).clamp(0, 1)


def jpeg(x: torch.Tensor, quality: float) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    out = []
    for img in x:
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8).copy()
        out.append(torch.from_numpy(dec).permute(2, 0, 1).to(x.dtype) / 255)
    return torch.stack(out).to(x.device)


@dataclass(frozen=True)
class Edit:
    """An image edit, the strengths probed, and the strength that leaves an image unchanged."""

    fn: Callable[[torch.Tensor, float], torch.Tensor]
    strengths: tuple[float, ...]
    neutral: float
    unit: str


EDITS: dict[str, Edit] = {
    "saturation": Edit(adjust_saturation, (0.0, 0.5, 1.5, 2.0), 1.0, "factor"),
    "brightness": Edit(adjust_brightness, (0.6, 0.8, 1.2, 1.4), 1.0, "factor"),
    "contrast": Edit(adjust_contrast, (0.5, 0.75, 1.25, 1.5), 1.0, "factor"),
    "blur": Edit(gaussian_blur, (0.5, 1.0, 2.0, 4.0), 0.0, "sigma px"),
    "sharpen": Edit(sharpen, (0.5, 1.0, 2.0), 0.0, "amount"),
    "noise": Edit(add_noise, (0.02, 0.05, 0.1), 0.0, "sigma"),
    "jpeg": Edit(jpeg, (90.0, 70.0, 50.0, 30.0, 10.0), 100.0, "quality"),
}


@dataclass
class ProbeRow:
    reward: str
    probe: str
    strength: float
    mean_change: float
    std_change: float
    relative_change: float
    fraction_up: float
    images: int


@dataclass
class ProbeResult:
    """Rows per (reward, probe, strength); `spread` = each reward's std over the unedited probe images."""

    rows: list[ProbeRow] = field(default_factory=list)
    spread: dict[str, float] = field(default_factory=dict)
    images: int = 0

    def to_dict(self) -> dict:
        return {"images": self.images, "spread": self.spread, "rows": [r.__dict__ for r in self.rows]}

    def lookup(self, reward: str, probe: str, strength: float) -> ProbeRow:
        for r in self.rows:
            if r.reward == reward and r.probe == probe and r.strength == strength:
                return r
        raise KeyError((reward, probe, strength))


def _score(r: LoadedReward, dims: Sequence[str | None], images: torch.Tensor, prompts: list[str],
           batch_size: int) -> dict[str | None, torch.Tensor]:
    """Scores of each selection in `dims` (None: the reward's own), in chunks of `batch_size`."""
    outs: dict[str | None, list[torch.Tensor]] = {d: [] for d in dims}
    for s in range(0, len(images), batch_size):
        chunk = images[s:s + batch_size].to(r.model.device)
        out = r.model.score(chunk, prompts[s:s + batch_size] if r.uses_prompt else None)
        for d in dims:
            outs[d].append((out.scores if d is None else out.per_dim[d]).double().cpu())
    return {d: torch.cat(v) for d, v in outs.items()}


def _derangement(groups: list[int], seed: int) -> list[int]:
    """A permutation sending each image to an image of another prompt (where one exists)."""
    n = len(groups)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    perm = [0] * n
    for a, b in zip(order, order[1:] + order[:1]):
        perm[a] = b
    for i in range(n):  # a rotation may still land on the same prompt: swap with any that fixes it
        if groups[perm[i]] == groups[i]:
            for j in range(n):
                if groups[perm[j]] != groups[i] and groups[perm[i]] != groups[j]:
                    perm[i], perm[j] = perm[j], perm[i]
                    break
    return perm


def run_probes(
    pset: PreferenceSet, rewards: Mapping[str, LoadedReward], specs: Sequence[str], num_images: int = 32,
    edits: Sequence[str] | None = None, batch_size: int = 16, seed: int = 0, shuffle_prompts: bool = True,
) -> ProbeResult:
    """Run every edit (or `edits`) and the prompt shuffle on a seeded sample of `num_images` images.

    Raises:
        ValueError: an unknown edit name, or fewer than 2 readable images.
    """
    edits = list(EDITS) if edits is None else list(edits)
    unknown = [e for e in edits if e not in EDITS]
    if unknown:
        raise ValueError(f"unknown probe(s) {unknown}; known: {', '.join(EDITS)}.")
    pool = [i for i in (pset.used_images() or range(len(pset.images))) if pset.images[i].exists()]
    random.Random(seed).shuffle(pool)
    picked: list[tuple[int, torch.Tensor]] = []
    for i in pool:
        if len(picked) >= num_images:
            break
        try:
            picked.append((i, decode_image(pset.images[i]).float() / 255))
        except Exception:  # noqa: BLE001 — unreadable files are skipped, as in scoring
            continue
    if len(picked) < 2:
        raise ValueError(f"the bias probes need at least 2 readable images; {pset.name} gave {len(picked)}.")
    by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for i, img in picked:
        by_shape.setdefault(tuple(img.shape), []).append((i, img))
    result = ProbeResult(images=len(picked))
    per_base: dict[str, list[str]] = {}
    for s in specs:
        per_base.setdefault(parse_spec(s)[0], []).append(s)
    for base, base_specs in per_base.items():
        r = rewards[base]
        dims = [parse_spec(s)[1] for s in base_specs]
        base_scores: dict[str | None, list[torch.Tensor]] = {d: [] for d in dims}
        edited: dict[tuple[str, float], dict[str | None, list[torch.Tensor]]] = {}
        shuffled: dict[str | None, list[torch.Tensor]] = {d: [] for d in dims}
        for items in by_shape.values():
            x = torch.stack([img for _, img in items])
            prompts = [pset.prompt_of(i) for i, _ in items]
            for d, v in _score(r, dims, x, prompts, batch_size).items():
                base_scores[d].append(v)
            for e in edits:
                ed = EDITS[e]
                for st in ed.strengths:
                    y = ed.fn(x, st)
                    for d, v in _score(r, dims, y, prompts, batch_size).items():
                        edited.setdefault((e, st), {dd: [] for dd in dims})[d].append(v)
        if shuffle_prompts:
            flat = [(i, img) for items in by_shape.values() for i, img in items]
            groups = [int(pset.image_group[i]) for i, _ in flat]
            perm = _derangement(groups, seed)
            for items in by_shape.values():
                ids = [i for i, _ in items]
                pos = {i: k for k, (i, _) in enumerate(flat)}
                other = [pset.prompt_of(flat[perm[pos[i]]][0]) for i in ids]
                x = torch.stack([img for _, img in items])
                for d, v in _score(r, dims, x, other, batch_size).items():
                    shuffled[d].append(v)
        for spec, d in zip(base_specs, dims):
            orig = torch.cat(base_scores[d])
            spread = float(orig.std()) if len(orig) > 1 else 0.0
            result.spread[spec] = spread
            series = [((e, st), torch.cat(v[d])) for (e, st), v in edited.items()]
            if shuffle_prompts:
                series.append((("prompt_shuffle", 1.0), torch.cat(shuffled[d])))
            for (e, st), after in series:
                delta = after - orig
                rel = float(delta.mean()) / spread if spread > 0 else (0.0 if float(delta.abs().max()) == 0 else math.inf)
                result.rows.append(ProbeRow(spec, e, st, float(delta.mean()), float(delta.std()) if len(delta) > 1 else 0.0,
                                            rel, float((delta > 0).double().mean()), len(delta)))
    return result


def probes_table(result: ProbeResult) -> str:
    """Markdown: one row per (reward, probe, strength), the change in the reward's own units and in spreads."""
    lines = ["Change = score of the edited image − score of the original (prompt_shuffle: with another image's "
             "prompt − with its own); spread = the reward's std over the unedited probe images.", "",
             "| reward | probe | strength | mean change | change / spread | images scoring higher |",
             "|---|---|---:|---:|---:|---:|"]
    for r in result.rows:
        lines.append(f"| {r.reward} | {r.probe} | {r.strength:g} | {r.mean_change:+.4g} | {r.relative_change:+.3f} | "
                     f"{100 * r.fraction_up:.0f} % |")
    return "\n".join(lines)
