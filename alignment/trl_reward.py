"""Any reward as the `reward_fn` of trl's DDPOTrainer and AlignPropTrainer (trl <= 0.23, which shipped
both; 0.24 removed them).

trl calls ``reward_fn(images, prompts, prompt_metadata) -> (rewards, reward_metadata)`` with images
(B, 3, H, W) in [0, 1] (its pipelines decode with ``output_type="pt"``), a tuple of prompts and a
tuple of per-prompt metadata. DDPOTrainer only needs the values; AlignPropTrainer backpropagates
through them, so `differentiable=True` keeps the graph (the reward must then be differentiable).

Example:
    >>> from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline
    >>> reward_fn = trl_reward_fn(create_reward("aesthetic", device="cuda"))
    >>> DDPOTrainer(DDPOConfig(), reward_fn, prompt_fn, DefaultDDPOStableDiffusionPipeline("sd-model")).train()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from reward_plugins.base import RewardModel


def trl_reward_fn(
    reward: RewardModel, differentiable: bool = False, batch_size: int | None = None, nan_to: float | None = None
) -> Callable[[torch.Tensor, Sequence[str], Sequence[Any]], tuple[torch.Tensor, dict]]:
    """Wrap `reward` as trl's ``reward_fn(images, prompts, prompt_metadata) -> (rewards, metadata)``.

    Args:
        reward: any `RewardModel` or `CompositeReward`.
        differentiable: keep the autograd graph (AlignPropTrainer); False scores under `no_grad` (DDPOTrainer).
        batch_size: images per reward call (None: all at once).
        nan_to: replace non-finite rewards by this value (trl would otherwise propagate NaN into its
            advantages); None keeps them. The metadata counts them either way.

    Returns:
        The callable; its metadata is ``{"per_dim": {name: list[float]}, "nan_count": int}``.

    Raises:
        ValueError: `differentiable=True` with a reward that is not differentiable.
    """
    if not isinstance(reward, RewardModel):
        raise TypeError(f"reward must be a reward_plugins RewardModel; got {type(reward).__name__}.")
    if differentiable and not getattr(reward, "is_differentiable", False):
        raise ValueError(
            f"reward {reward.name!r} is not differentiable (is_differentiable=False); AlignPropTrainer needs "
            "reward gradients. Use differentiable=False with DDPOTrainer instead."
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None; got {batch_size}.")

    def reward_fn(images: torch.Tensor, prompts: Sequence[str], prompt_metadata: Sequence[Any] = ()):
        if not torch.is_tensor(images) or images.ndim != 4:
            raise TypeError(
                f"images must be a (B, 3, H, W) tensor in [0, 1] (trl's output_type='pt'); got "
                f"{type(images).__name__}{'' if not torch.is_tensor(images) else tuple(images.shape)}."
            )
        prompts = list(prompts)
        step = batch_size or images.shape[0]
        scores, per_dim = [], {}
        for i in range(0, images.shape[0], step):
            with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
                out = reward(images[i:i + step], prompts[i:i + step])
            scores.append(out.scores)
            for k, v in out.per_dim.items():
                per_dim.setdefault(k, []).extend(v.detach().float().cpu().tolist())
        s = torch.cat(scores)
        bad = ~torch.isfinite(s.detach())
        if nan_to is not None and bool(bad.any()):
            s = torch.where(bad, torch.full_like(s, float(nan_to)), s)
        if not differentiable:
            s = s.detach()
        return s, {"per_dim": per_dim, "nan_count": int(bad.sum())}

    return reward_fn
