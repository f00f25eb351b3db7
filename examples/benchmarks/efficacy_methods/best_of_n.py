"""Best-of-N on held-out prompts: the learned reward picks one of N fresh candidates per evaluation slot."""

from __future__ import annotations

import json

from alignment.best_of_n import best_of_n
from alignment.toyworld import world
from reward_plugins import create_reward

from .registry import DIMS, Context, method

BEST_OF_N = (1, 2, 4, 8, 16)


def best_of_n_curve(ctx: Context, selector: str = "toyworld-clip") -> dict[int, dict]:
    """One draw of 16 candidates per evaluation slot; best-of-m uses the first m of them (m = 1..16)."""
    cache = ctx.workdir / "best_of_n_curve.json"
    if cache.is_file():
        return {int(k): v for k, v in json.loads(cache.read_text()).items()}
    nmax, slots = max(BEST_OF_N), ctx.bon_slots
    prompts = world.heldout_prompts()
    res = best_of_n(ctx.pipe, prompts, create_reward(selector), nmax * slots, k=1, batch_size=48,
                    seed=world.BEST_OF_N_SEED, num_inference_steps=ctx.steps, guidance_scale=ctx.guidance,
                    progress=True)
    exact = create_reward("toyworld-exact")
    imgs = res.images.flatten(0, 1)
    flat_prompts = [p for p in prompts for _ in range(res.n)]
    ex = exact.score(imgs, flat_prompts).per_dim
    ex = {d: v.view(len(prompts), slots, nmax) for d, v in ex.items()}
    sel = res.scores.view(len(prompts), slots, nmax)
    curve = {}
    for m in BEST_OF_N:
        pick = sel[..., :m].argmax(dim=-1, keepdim=True)  # ties: the lower index, as best_of_n ranks
        curve[m] = {"exact": {d: float(ex[d].gather(-1, pick).mean()) for d in DIMS},
                    "reward": float(sel.gather(-1, pick).mean()), "samples": len(prompts) * slots * m}
    cache.write_text(json.dumps(curve, indent=2))
    return curve


def _bon(m: int):
    def run(ctx: Context) -> dict:
        return best_of_n_curve(ctx)[m]

    run.__doc__ = f"best-of-{m}: the learned reward picks one of {m} held-out candidates per slot"
    return run


for _m in BEST_OF_N:
    method(f"best-of-{_m}", "toyworld-clip")(_bon(_m))
