"""Reward-gradient methods on the soft oracle: DRaFT-K, DRaFT-LV, AlignProp, ReFL."""

from __future__ import annotations

from .registry import Context, method, reward_finetune


@method("draft", "toyworld")
def draft(ctx: Context) -> dict:
    """DRaFT-K (K = 10: every sampler step keeps its graph) on the soft oracle"""
    # Measured on the toy world: K = 1 at lr 2e-3 moved nothing in 40 steps (0.188 -> 0.201) and collapsed by
    # 160. The last of 10 DDIM steps runs at t = 1, where d x_prev / d eps = -0.012 (0.2-0.6 at every other
    # step): K = 1 trains on almost no signal. K = 10 at lr 1e-3: 50 steps 0.292, 100 steps 0.333, 200 steps
    # 0.438 (every dimension +16 points or more, 337 s); lr 2e-3 with K = 10 was worse (50 steps: 0.229).
    return reward_finetune(ctx, "draft", "toyworld", steps=200, lr=1e-3, k=10)


@method("draft-lv", "toyworld")
def draft_lv(ctx: Context) -> dict:
    """DRaFT-LV (n = 2) on the soft oracle"""
    return reward_finetune(ctx, "draft-lv", "toyworld", steps=50, lr=1e-3, lv_n=2)


@method("alignprop", "toyworld")
def alignprop(ctx: Context) -> dict:
    """AlignProp: K ~ U{1..10} on the soft oracle"""
    return reward_finetune(ctx, "alignprop", "toyworld", steps=50, lr=1e-3, truncation_range=[1, 10])


@method("refl", "toyworld")
def refl(ctx: Context) -> dict:
    """ReFL: one gradient step at a late x0-hat on the soft oracle (hinge at 1.0)"""
    return reward_finetune(ctx, "refl", "toyworld", steps=50, lr=1e-3, refl_target=1.0, refl_scale=1.0)
