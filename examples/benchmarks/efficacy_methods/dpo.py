"""Diffusion-DPO on pairs mined by the learned reward: each loss type, offline and online."""

from __future__ import annotations

from pathlib import Path

from alignment.toyworld import world
from reward_plugins import create_reward

from .registry import Context, common_train, method

# β per loss type, chosen so that each loss stops pushing a pair at the same separation of denoising
# errors. Sigmoid's weight σ(−logits) is ~0.02 at logits 4, i.e. (β/2)·Δ = 4 with Δ the pair's error-gap
# difference against the reference: Δ = 1.6e-3 at β = 5000. Hinge stops at logits 1 (relu(1 − logits)) and
# IPO's optimum is logits ½, both whatever β: at β = 5000 they stop at Δ = 4e-4 and 2e-4, 4 and 8 times
# sooner than sigmoid (their first rows barely moved). The same Δ = 1.6e-3 needs β = 1250 (hinge) and
# β = 625 (IPO).
BETA = {"sigmoid": 5000.0, "hinge": 1250.0, "ipo": 625.0}


def mined_pairs(ctx: Context, reward: str = "toyworld-clip", n: int = 6, pairs_per_prompt: int = 3) -> Path:
    """Pairs mined once per work dir with the base model on the training captions (resumable): `n` images
    per caption, its `pairs_per_prompt` widest-gap pairs. (Mining is inside the method's CPU time only on
    the run that mines; a later run in the same --out reuses the cache.)"""
    from alignment.pairs import mine_pairs

    out = ctx.workdir / ("pairs" if (n, pairs_per_prompt) == (6, 3) else f"pairs-n{n}-k{pairs_per_prompt}")
    mine_pairs(ctx.pipe, world.train_prompts(), create_reward(reward), n, out, rule="dimension",
               margin=0.0, pairs_per_prompt=pairs_per_prompt, shard_size=72, seed=ctx.seed, batch_size=48,
               num_inference_steps=ctx.steps, guidance_scale=ctx.guidance, progress=True)
    return out


def dpo(ctx: Context, loss_type: str, online: bool = False, steps: int = 200, beta: float | None = None,
        lr: float = 5e-4, pair_images: int = 6, pairs_per_prompt: int = 3, batch: int = 8,
        timestep_range: list[float] | None = None, rounds: int = 2, caption_dropout: float = 0.0) -> dict:
    # Measured (sigmoid, offline, held-out exact overall from 0.188; README "DPO and RWR, second pass"):
    # beta 5000, lr 5e-4: 60 steps 0.208, 200 steps 0.271 (colour 0.50, shape 0.55, position 0.67), 400 steps
    # 0.243; 12 images / 6 pairs per caption, 300 steps 0.215; beta 2000, lr 1e-3, 150 steps 0.153; beta 500,
    # lr 2e-3 drifted (colour 0.34, shape 0.42). Third pass: 16 images / 16 pairs per caption (1152 pairs),
    # 400 steps 0.222 (shape 0.55); 16 images / 3 pairs, t in [0.3, 1) 0.188; 6 images / 3 pairs, t in
    # [0.3, 1) 0.236; batch 32, 1152 pairs, 150 steps 0.146; caption dropout 0.2, 200 steps 0.215. Shape never
    # rose: the learned reward's pairs carry little shape signal (winner minus loser exact shape accuracy
    # +0.09..+0.17 in every selection rule tried, against +0.36..+0.59 for colour). These entries
    # (`efficacy.py --out outputs/eff_dpo/final --bon-slots 4 --threads 1 --force`, CPU s with mining):
    # sigmoid offline 0.188 -> 0.271 (colour 0.50, shape 0.55, position 0.67; 102 s); hinge offline (beta
    # 1250) 0.208 (0.49, 0.52, 0.72; 77 s); IPO offline (beta 625) 0.271 (0.51, 0.55, 0.67; 72 s; at beta
    # 5000 it was 0.201); online, 2 rounds: sigmoid 0.222 (0.49, 0.53, 0.65; 134 s), hinge 0.201 (0.47, 0.53,
    # 0.70; 127 s), IPO 0.229 (0.49, 0.53, 0.67; 123 s). None reaches +10 points.
    from alignment.trainers.dpo import DataSection, DPOConfig, DPOSection, OnlineSection, train_dpo

    name = f"dpo-{loss_type}-{'online' if online else 'offline'}"
    model, lora, train = common_train(ctx, name, steps, lr, batch)
    beta = BETA[loss_type] if beta is None else beta
    cfg = DPOConfig(model=model, lora=lora, train=train, dpo=DPOSection(
        beta=beta, loss_type=loss_type, vae_sample=False, timestep_range=timestep_range))
    cfg.data.caption_dropout = caption_dropout  # online rounds read their pairs with these data settings too
    if online:
        # Every training caption each round, mined with the current policy (round 0 is the base model's).
        cfg.online = OnlineSection(enabled=True, prompts=world.train_prompts(), reward="toyworld-clip",
                                   images_per_prompt=pair_images, steps_per_round=max(1, -(-ctx.budget(steps) // rounds)),
                                   mine_kwargs={"num_inference_steps": ctx.steps, "guidance_scale": ctx.guidance,
                                                "pairs_per_prompt": pairs_per_prompt, "batch_size": 48})
        samples = len(world.train_prompts()) * pair_images * rounds
    else:
        cfg.data = DataSection(path=str(mined_pairs(ctx, n=pair_images, pairs_per_prompt=pairs_per_prompt)),
                               caption_dropout=caption_dropout)
        samples = len(world.train_prompts()) * pair_images
    train_dpo(cfg, pipe=ctx.pipe)
    return {"pipe": ctx.pipe, "samples": samples}


for _lt in ("sigmoid", "hinge", "ipo"):
    method(f"dpo-{_lt}-offline", "toyworld-clip", f"Diffusion-DPO ({_lt}) on pairs mined once by the learned reward")(
        lambda ctx, _lt=_lt: dpo(ctx, _lt))
    method(f"dpo-{_lt}-online", "toyworld-clip", f"online Diffusion-DPO ({_lt}): 2 rounds of mining + training")(
        lambda ctx, _lt=_lt: dpo(ctx, _lt, online=True))
