"""The reward contract: `RewardModel`, `RewardOutput` and input validation.

Every reward takes float RGB images in [0, 1] of shape (B, 3, H, W), any H and W, and a list of B
prompts, and returns `RewardOutput`: `scores` (B,) float32, higher is better, and `per_dim`, one (B,)
float32 tensor per dimension the reward reports. Gradients flow from the scores to the images; the
reward's own weights are frozen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

# Values a little outside [0, 1] come from float rounding in VAE decoders and resizes; anything
# further out is almost always [-1, 1] or [0, 255] data passed by mistake.
RANGE_TOLERANCE = 1e-3


@dataclass
class RewardOutput:
    """What a reward returns.

    Attributes:
        scores: (B,) float32, the selected dimension or weighted mix; higher is better.
        per_dim: every dimension the reward reports, each (B,) float32.
    """

    scores: torch.Tensor
    per_dim: dict[str, torch.Tensor] = field(default_factory=dict)

    def detach(self) -> RewardOutput:
        return RewardOutput(self.scores.detach(), {k: v.detach() for k, v in self.per_dim.items()})

    def to_rows(self) -> list[dict[str, float]]:
        """One dict of python floats per image (for tables, JSON and CSV)."""
        names = list(self.per_dim) or ["score"]
        cols = {k: self.per_dim[k].detach().float().cpu().tolist() for k in self.per_dim}
        if not cols:
            cols = {"score": self.scores.detach().float().cpu().tolist()}
        return [{k: cols[k][i] for k in names} for i in range(len(self.scores))]


def validate_images(images: torch.Tensor) -> torch.Tensor:
    """Check the image batch and return it clamped to [0, 1].

    Raises:
        TypeError: `images` is not a floating-point tensor.
        ValueError: wrong rank, channel count, empty batch, NaN/inf, or values outside [0, 1].
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"images must be a torch.Tensor of shape (B, 3, H, W) with values in [0, 1]; got "
            f"{type(images).__name__}. Convert PIL images with reward_plugins.preprocess.pil_to_tensor."
        )
    if not torch.is_floating_point(images):
        raise TypeError(
            f"images must be a floating-point tensor in [0, 1]; got dtype {images.dtype}. "
            "For uint8 images use `images.float() / 255`."
        )
    if images.ndim == 3:
        raise ValueError(
            f"images must have rank 4 (B, 3, H, W); got rank 3 with shape {tuple(images.shape)}. "
            "For a single image use `images.unsqueeze(0)`."
        )
    if images.ndim != 4:
        raise ValueError(
            f"images must have rank 4 (B, 3, H, W); got rank {images.ndim} with shape {tuple(images.shape)}."
        )
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0); pass at least one image.")
    if images.shape[1] != 3:
        hint = " (channels-last? use `images.permute(0, 3, 1, 2)`)" if images.shape[-1] == 3 else ""
        raise ValueError(
            f"images must have 3 RGB channels in dim 1, shape (B, 3, H, W); got shape "
            f"{tuple(images.shape)}{hint}. Grayscale: `images.expand(-1, 3, -1, -1)`; RGBA: `images[:, :3]`."
        )
    with torch.no_grad():
        # One pass: NaN propagates into the min/max and inf shows up as one of them.
        lo_t, hi_t = torch.aminmax(images.detach())
        lo, hi = float(lo_t), float(hi_t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("images contain NaN or inf values; check the generator or decoder output.")
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"images must have values in [0, 1]; got min {lo:.4g}, max {hi:.4g}. VAE decoder output in "
            "[-1, 1] maps to [0, 1] with `(x / 2 + 0.5).clamp(0, 1)`; uint8-range data with `x / 255`."
        )
    return images if 0.0 <= lo and hi <= 1.0 else images.clamp(0, 1)


def validate_prompts(prompts: Sequence[str] | str | None, batch: int, required: bool) -> list[str]:
    """Check the prompts against the batch size and return them as a list."""
    if prompts is None:
        if required:
            raise ValueError(
                f"this reward scores image-text agreement and needs one prompt per image; got prompts=None "
                f"for a batch of {batch}. Pass `prompts=[...]` with {batch} strings."
            )
        return [""] * batch
    if isinstance(prompts, str):
        raise TypeError(
            f"prompts must be a list of {batch} strings, one per image; got a single str. "
            f"For one prompt shared by all images use `[prompt] * {batch}`."
        )
    prompts = list(prompts)
    if len(prompts) != batch:
        raise ValueError(
            f"got {len(prompts)} prompts for a batch of {batch} images; pass exactly one prompt per image "
            f"(for one shared prompt: `[prompt] * {batch}`)."
        )
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str; got {type(p).__name__}.")
    return prompts


class RewardModel(nn.Module):
    """Base class of every reward.

    Subclasses set the class attributes and implement `compute(images, prompts) -> {dim: (B,)}` where
    images are already validated, in [0, 1], on the model's device, in the model's dtype or, for a
    half-precision model, in float32 (`input_dtype`): a reward resizes and normalises them with
    `preprocess`, which casts only the small model-size result to the model's dtype.

    Class attributes (checked for every registered reward by one shared test):
        dimensions: names of the per-dimension outputs, in order.
        default_dimension: the dimension `scores` returns when none is selected.
        is_differentiable: gradients reach the images.
        requires_prompts: the score depends on the prompt.
        score_range: informational (lo, hi); `None` where unbounded or unknown.

    Example:
        >>> reward = create_reward("pickscore-tiny")
        >>> out = reward(torch.rand(2, 3, 256, 256), ["a cat", "a dog"])
        >>> out.scores.shape
        torch.Size([2])
    """

    dimensions: ClassVar[tuple[str, ...]] = ("score",)
    default_dimension: ClassVar[str] = "score"
    is_differentiable: ClassVar[bool] = True
    requires_prompts: ClassVar[bool] = True
    score_range: ClassVar[tuple[float, float] | None] = None

    def __init__(self) -> None:
        super().__init__()
        self.name: str = type(self).__name__.lower()
        self._mix: dict[str, float] = {self.default_dimension: 1.0}

    # -- selection of what `.scores` is ---------------------------------------------------------
    def select(self, dimension: str | None = None, weights: Mapping[str, float] | None = None) -> RewardModel:
        """Choose what `.scores` returns: one dimension by name, or a weighted mean of several."""
        if dimension is not None and weights is not None:
            raise ValueError("pass either dimension= or weights=, not both.")
        mix = {dimension: 1.0} if dimension is not None else dict(weights or {self.default_dimension: 1.0})
        unknown = [k for k in mix if k not in self.dimensions]
        if unknown:
            raise ValueError(
                f"unknown dimension(s) {unknown} for reward '{self.name}'; it reports {list(self.dimensions)}."
            )
        total = sum(mix.values())
        if not mix or not math.isfinite(total) or total == 0:
            raise ValueError(f"weights must be finite and not sum to zero; got {mix}.")
        self._mix = mix
        return self

    @property
    def selection(self) -> dict[str, float]:
        return dict(self._mix)

    # -- freezing and placement -----------------------------------------------------------------
    def freeze(self) -> RewardModel:
        """Evaluation mode and no parameter gradients: training never updates a reward."""
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> RewardModel:
        # Dropout in a reward would make scores random; rewards always stay in eval mode.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for t in self.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype `compute` receives images in: the model's, or float32 for a bf16/fp16 model.

        Resampling and normalising a full-resolution batch in half precision rounds every interpolation
        sum to 8/11 bits and is several times slower on CPU; casting before preprocessing also rounds
        the input pixels themselves. So half-precision rewards preprocess in float32 and cast after.
        """
        dtype = self.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The reward's image processor (`self.transform`) on [0, 1] images, returned in the model's dtype."""
        return self.transform(images).to(self.dtype)

    # -- the contract -----------------------------------------------------------------------------
    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement compute(images, prompts)")

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> RewardOutput:
        images = validate_images(images)
        prompts = validate_prompts(prompts, images.shape[0], self.requires_prompts)
        images = images.to(device=self.device, dtype=self.input_dtype)
        per_dim = {k: v.float() for k, v in self.compute(images, prompts).items()}
        total = sum(self._mix.values())
        scores = sum(w * per_dim[k] for k, w in self._mix.items()) / total
        return RewardOutput(scores=scores.float(), per_dim=per_dim)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> RewardOutput:
        """`forward` without gradients, for ranking and evaluation."""
        return self(images, prompts).detach()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dimensions={self.dimensions}, selection={self._mix}"
