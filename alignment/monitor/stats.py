"""Cheap evidence of reward hacking, computed from image tensors: per-set image statistics, per-prompt
diversity and drift from the base model's images.

Every function takes float images (B, 3, H, W) in [0, 1] and returns plain floats, so the numbers go
straight into `metrics.jsonl`. They are measured on the fixed validation prompts and seeds, where the
same seed gives the base model's image at step 0 and the trained model's image later.

Example:
    >>> stats = image_statistics(images)          # {"saturation": 0.41, "dark_fraction": 0.02, ...}
    >>> pixel_diversity(images, groups)           # mean pairwise distance within each prompt's samples
    >>> drift(images, base_images)                # how far the same seeds moved from the base model
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# Rec. 601 luma, the brightness a viewer sees.
_LUMA = (0.299, 0.587, 0.114)
DARK_LEVEL = 0.05
BRIGHT_LEVEL = 0.95
ENTROPY_LEVELS = 8  # colour histogram: 8 levels per channel, 512 bins
EDGE_LEVEL = 0.1  # Sobel magnitude (on luma in [0, 1]) above which a pixel is an edge

STATISTICS = ("saturation", "dark_fraction", "bright_fraction", "colour_entropy", "edge_density", "high_freq_energy")


def _check(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a float tensor (B, 3, H, W) in [0, 1]; got {shape}.")
    if images.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch; give at least one image.")
    return images.detach().float().clamp(0, 1)


def luma(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) brightness in [0, 1]."""
    w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * w).sum(1)


def saturation(images: torch.Tensor) -> torch.Tensor:
    """(B,) mean HSV saturation, (max − min) / max per pixel (0 for black pixels)."""
    x = _check(images)
    hi, lo = x.max(1).values, x.min(1).values
    s = torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-8), torch.zeros_like(hi))
    return s.flatten(1).mean(1)


def colour_entropy(images: torch.Tensor, levels: int = ENTROPY_LEVELS) -> torch.Tensor:
    """(B,) Shannon entropy in bits of each image's joint RGB histogram (`levels`³ bins).

    A flat image has 0 bits; an image using every bin equally has 3·log2(levels).
    """
    x = _check(images)
    q = (x * levels).long().clamp_(0, levels - 1)
    bins = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]  # (B, H, W)
    out = []
    for b in bins.flatten(1):
        p = torch.bincount(b, minlength=levels**3).double() / b.numel()
        p = p[p > 0]
        out.append(float(-(p * p.log2()).sum()))
    return torch.tensor(out)


def edge_density(images: torch.Tensor, level: float = EDGE_LEVEL) -> torch.Tensor:
    """(B,) fraction of pixels whose Sobel gradient magnitude of luma exceeds `level`."""
    y = luma(_check(images)).unsqueeze(1)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=y.dtype, device=y.device) / 4
    k = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3)
    g = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), k)
    mag = g.pow(2).sum(1).sqrt()
    return (mag > level).float().flatten(1).mean(1)


def high_freq_energy(images: torch.Tensor) -> torch.Tensor:
    """(B,) share of luma spectral energy (mean removed) above half the Nyquist radius.

    Over-sharpened, noisy or "crunchy" images raise it; blurred or flat ones lower it. A flat image has 0.
    """
    y = luma(_check(images))
    y = y - y.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(y).abs().pow(2)
    h, w = y.shape[-2:]
    fy = torch.fft.fftfreq(h, device=y.device).abs().view(h, 1)
    fx = torch.fft.fftfreq(w, device=y.device).abs().view(1, w)
    high = (torch.maximum(fy / 0.5, fx / 0.5) > 0.5).to(power.dtype)  # beyond half Nyquist on either axis
    total = power.flatten(1).sum(1)
    return torch.where(total > 0, (power * high).flatten(1).sum(1) / total.clamp_min(1e-12), torch.zeros_like(total))


def image_statistics(images: torch.Tensor) -> dict[str, float]:
    """Set means of the six statistics in `STATISTICS` (see each function)."""
    x = _check(images)
    y = luma(x)
    return {
        "saturation": float(saturation(x).mean()),
        "dark_fraction": float((y < DARK_LEVEL).float().mean()),
        "bright_fraction": float((y > BRIGHT_LEVEL).float().mean()),
        "colour_entropy": float(colour_entropy(x).mean()),
        "edge_density": float(edge_density(x).mean()),
        "high_freq_energy": float(high_freq_energy(x).mean()),
    }


def _groups(groups: Sequence, n: int) -> dict:
    if len(groups) != n:
        raise ValueError(f"groups must give one prompt id per image; got {len(groups)} ids for {n} images.")
    out: dict = {}
    for i, g in enumerate(groups):
        out.setdefault(g, []).append(i)
    return out


def _mean_pairwise(features: torch.Tensor, index: dict, distance: Callable) -> float:
    vals = []
    for rows in index.values():
        if len(rows) < 2:
            continue
        f = features[rows]
        d = distance(f)
        iu = torch.triu_indices(len(rows), len(rows), offset=1)
        vals.append(d[iu[0], iu[1]].mean())
    if not vals:
        raise ValueError("diversity needs at least two samples of one prompt; raise images_per_prompt to >= 2.")
    return float(torch.stack(vals).mean())


def _rms(f: torch.Tensor) -> torch.Tensor:
    f = f.flatten(1)
    return torch.cdist(f, f) / f.shape[1] ** 0.5


def _cosine_distance(f: torch.Tensor) -> torch.Tensor:
    f = F.normalize(f.flatten(1).float(), dim=1)
    return 1 - f @ f.t()


def pixel_diversity(images: torch.Tensor, groups: Sequence) -> float:
    """Mean pairwise RMS pixel distance between samples of the same prompt, averaged over prompts.

    Args:
        groups: one prompt id per image (the prompt string itself is fine); prompts with one sample are skipped.
    """
    x = _check(images)
    return _mean_pairwise(x, _groups(groups, x.shape[0]), _rms)


def embedding_diversity(embeddings: torch.Tensor, groups: Sequence) -> float:
    """Mean pairwise cosine distance (1 − cos) of image embeddings within each prompt's samples."""
    if embeddings.dim() < 2:
        raise ValueError(f"embeddings must be (B, D); got shape {tuple(embeddings.shape)}.")
    return _mean_pairwise(embeddings.detach(), _groups(groups, embeddings.shape[0]), _cosine_distance)


def drift(images: torch.Tensor, base_images: torch.Tensor) -> float:
    """Mean RMS pixel distance between each image and the base model's image of the same seed and prompt."""
    x, b = _check(images), _check(base_images, "base_images")
    if x.shape != b.shape:
        raise ValueError(
            f"images {tuple(x.shape)} and base_images {tuple(b.shape)} differ in shape; drift compares the same "
            "validation prompts and seeds, image for image."
        )
    return float(((x - b).pow(2).flatten(1).mean(1)).sqrt().mean())


def embedding_drift(embeddings: torch.Tensor, base_embeddings: torch.Tensor) -> float:
    """Mean cosine distance between each image's embedding and its base-model twin's."""
    if embeddings.shape != base_embeddings.shape:
        raise ValueError(f"embeddings {tuple(embeddings.shape)} and base {tuple(base_embeddings.shape)} differ in shape.")
    a = F.normalize(embeddings.detach().flatten(1).float(), dim=1)
    b = F.normalize(base_embeddings.detach().flatten(1).float(), dim=1)
    return float((1 - (a * b).sum(1)).mean())
