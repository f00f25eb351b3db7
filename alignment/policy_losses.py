"""Pure pieces of policy-gradient training (DDPO, Flow-GRPO): advantages and the clipped objective.

- `group_advantages`: GRPO's group-relative advantage, (r − mean_g) / max(std, floor) over the G
  samples of one prompt (or with the std of the whole batch, Flow-GRPO's ``global_std``).
- `PerPromptStatTracker`: DDPO's running per-prompt statistics (a bounded buffer of past rewards per
  prompt; the batch statistics until a prompt has `min_count` values).
- `ppo_clip_loss`: PPO's pessimistic clipped surrogate on per-transition log-prob ratios.

Example:
    >>> adv = group_advantages(rewards, groups, valid)
    >>> loss, stats = ppo_clip_loss(log_prob, old_log_prob, adv, clip_range=1e-4, adv_clip=5.0)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import torch


def group_advantages(
    rewards: torch.Tensor,
    groups: torch.Tensor,
    valid: torch.Tensor | None = None,
    std_floor: float = 1e-4,
    global_std: bool = False,
) -> torch.Tensor:
    """Group-relative advantages.

    Args:
        rewards: (N,) rewards (entries with ``valid = False`` may hold NaN).
        groups: (N,) integer group id per sample (samples of one prompt share an id).
        valid: (N,) bool, False for samples whose reward failed; they get advantage 0 and do not enter
            any statistic. Default: every finite reward.
        std_floor: the denominator is max(std, std_floor), so a group whose rewards (nearly) agree
            gives (nearly) zero advantages instead of amplified noise.
        global_std: divide by the std of all valid rewards instead of the group's (Flow-GRPO's option).

    Returns:
        (N,) float32 advantages; 0 for invalid samples and for groups with fewer than 2 valid ones.
    """
    rewards = rewards.detach().double()
    valid = torch.isfinite(rewards) if valid is None else (valid.bool() & torch.isfinite(rewards))
    adv = torch.zeros_like(rewards)
    if int(valid.sum()) == 0:
        return adv.float()
    glob = rewards[valid].std(unbiased=False) if global_std else None
    for g in torch.unique(groups):
        m = (groups == g) & valid
        if int(m.sum()) < 2:
            continue
        r = rewards[m]
        std = glob if global_std else r.std(unbiased=False)
        adv[m] = (r - r.mean()) / max(float(std), std_floor)
    return adv.float()


class PerPromptStatTracker:
    """DDPO's running per-prompt reward statistics.

    Each prompt keeps its last `buffer_size` rewards. A prompt with fewer than `min_count` stored
    rewards is normalised with the current batch's mean and std instead. The state is a plain dict
    (`state_dict`), so a checkpoint can store it and a resumed run continues exactly.

    Example:
        >>> tracker = PerPromptStatTracker(buffer_size=32, min_count=16)
        >>> adv = tracker.update(["a cat", "a cat", "a dog"], torch.tensor([1.0, 2.0, 0.5]))
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, std_floor: float = 1e-6) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1; got {buffer_size}, {min_count}.")
        self.buffer_size, self.min_count, self.std_floor = int(buffer_size), int(min_count), float(std_floor)
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Store the valid rewards and return (N,) advantages (0 for invalid samples)."""
        r = rewards.detach().double().cpu()
        valid = torch.isfinite(r) if valid is None else (valid.bool().cpu() & torch.isfinite(r))
        adv = torch.zeros_like(r)
        if int(valid.sum()) == 0:
            return adv.float()
        batch = r[valid].numpy()
        names = np.array(list(prompts), dtype=object)
        ok = valid.numpy()
        for p in dict.fromkeys(names[ok].tolist()):
            m = (names == p) & ok
            buf = self.stats.setdefault(p, deque(maxlen=self.buffer_size))
            buf.extend(r.numpy()[m].tolist())
            ref = np.asarray(buf) if len(buf) >= self.min_count else batch
            mean, std = float(ref.mean()), float(ref.std())
            adv[torch.from_numpy(m)] = (r[torch.from_numpy(m)] - mean) / max(std, self.std_floor)
        return adv.float()

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state.get("stats", {}).items()}


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, mean over the batch: max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)), ρ = exp(Δ log p).

    Args:
        log_prob: (B,) log-prob of the recorded transitions under the current policy (differentiable).
        old_log_prob: (B,) the log-prob recorded at sampling time.
        advantages: (B,) advantages, clipped to [−adv_clip, adv_clip] first when `adv_clip` is set.
        clip_range: ε.
        weights: (B,) per-sample weights instead of the mean's 1/B (e.g. 0 for a sample whose reward failed,
            1/n_valid for the others); the loss is Σ wᵢ lᵢ and the statistics are w-weighted.

    Returns:
        (loss, stats) with detached ``ratio`` (B,), ``clipfrac`` and ``approx_kl`` (½ E[Δ²], DDPO's log).
    """
    adv = advantages.detach().float()
    if adv_clip is not None:
        adv = adv.clamp(-adv_clip, adv_clip)
    diff = log_prob.float() - old_log_prob.detach().float()
    ratio = diff.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if weights is None:
        w = torch.full_like(per_sample, 1.0 / max(per_sample.numel(), 1))
    else:
        w = weights.detach().float().to(per_sample.device)
        if w.shape != per_sample.shape:
            raise ValueError(f"weights must have one entry per sample {tuple(per_sample.shape)}; got {tuple(w.shape)}.")
    loss = (w * per_sample).sum()
    norm = w.sum().clamp(min=1e-12)
    stats = {
        "ratio": ratio.detach(),
        "clipfrac": (w * ((ratio.detach() - 1).abs() > clip_range).float()).sum() / norm,
        "approx_kl": (w * 0.5 * diff.detach() ** 2).sum() / norm,
    }
    return loss, stats
