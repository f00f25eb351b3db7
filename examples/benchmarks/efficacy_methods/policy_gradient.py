"""Policy gradient (DDPO): needs only reward values, so it can train on the exact oracle itself."""

from __future__ import annotations

from alignment.toyworld import world

from .registry import Context, common_train, method

EXACT_TERMS = {f"toyworld-exact:{d}": 1.0 for d in ("color", "shape", "position")}


def policy_gradient(ctx: Context, name: str, terms: dict, epochs: int, lr: float, group: int = 8, prompts: int = 8,
                    clip_range: float = 1e-4) -> dict:
    """DDPO with LoRA: DDIM eta = 1 rollouts of `prompts` training captions x `group` seeds per epoch,
    group-relative advantages, PPO clipping, every step trained, 4 updates per epoch."""
    from alignment.trainers.policy_gradient import (
        PGSamplingSection,
        PolicyGradientConfig,
        PolicyGradientTrainer,
        PolicySection,
    )
    from alignment.trainers.reward_finetune import DataSection, RewardSection

    model, lora, train = common_train(ctx, name, epochs, lr, 16)
    cfg = PolicyGradientConfig(
        model=model, lora=lora, train=train,
        method=PolicySection(name="ddpo", group_size=group, prompts_per_epoch=prompts, clip_range=clip_range),
        sampling=PGSamplingSection(num_steps=ctx.steps, guidance_scale=ctx.guidance, eta=1.0, batch_size=64,
                                   reward_batch_size=64),
        reward=RewardSection(terms=terms, normalize=False),
        data=DataSection(prompts=world.train_prompts(), val_prompts=world.train_prompts()[:2]),
    )
    cfg.eval_reward = None
    summary = PolicyGradientTrainer(cfg, pipe=ctx.pipe).train()
    return {"pipe": ctx.pipe, "samples": summary["epochs"] * group * prompts}


@method("ddpo", "toyworld-exact")
def ddpo(ctx: Context) -> dict:
    """DDPO on the exact oracle (its color + shape + position 0/1 scores): no reward gradient needed"""
    return policy_gradient(ctx, "ddpo", EXACT_TERMS, epochs=10, lr=1e-3, clip_range=1e-2)


@method("ddpo-clip", "toyworld-clip")
def ddpo_clip(ctx: Context) -> dict:
    """DDPO on the learned toyworld-clip reward (judged by the exact oracle it never sees)"""
    return policy_gradient(ctx, "ddpo-clip", {"toyworld-clip": 1.0}, epochs=10, lr=1e-3, clip_range=1e-2)
