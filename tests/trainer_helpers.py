"""Small rewards the trainer tests share (imported as `from trainer_helpers import ...`, like evaluation_helpers)."""

from __future__ import annotations

from reward_plugins.base import RewardModel


class Brightness(RewardModel):
    """Mean pixel value minus `offset`: a non-differentiable reward (detached pixels) whose sign a test can set."""

    dimensions = ("brightness",)
    default_dimension = "brightness"
    is_differentiable = False
    requires_prompts = False

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__()
        self.offset = offset

    def compute(self, images, prompts):
        return {"brightness": images.detach().mean((1, 2, 3)) - self.offset}


class CenterBright(RewardModel):
    """Non-differentiable: the share of the central 8x8 pixels whose grey level exceeds 0.5."""

    is_differentiable = False
    requires_prompts = False

    def compute(self, images, prompts):
        h, w = images.shape[-2:]
        grey = images.mean(1)[:, h // 2 - 4:h // 2 + 4, w // 2 - 4:w // 2 + 4]
        return {"score": (grey > 0.5).float().mean((1, 2))}
