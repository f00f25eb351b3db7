"""How legible the toy sampler's one-step prediction x̂0 is at each of its steps (what ReFL's step range rests on).

For the shipped base pipeline (10 DDIM steps, CFG 7, the benchmark's sampler), for every step i it decodes the
scheduler's predicted clean sample x̂0 at step i and reports the soft oracle on it (what ReFL would train on),
the exact oracle's accuracy on it, and how often the exact oracle's verdict on x̂0 agrees with its verdict on
the finished image, per dimension. Measured on the training captions (never the held-out ones) and seeds
below the evaluation seeds.

Example:
    OMP_NUM_THREADS=1 python examples/toyworld/x0_legibility.py --repeats 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment.sampling import decode, denoise, negative_embeds  # noqa: E402
from alignment.toyworld import models, world  # noqa: E402
from alignment.trainers.common import ModelSection, build_adapter  # noqa: E402
from reward_plugins import create_reward  # noqa: E402

DIMS = ("color", "shape", "position")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="images per training caption")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1 (images per training caption); got {a.repeats}")
    torch.set_num_threads(a.threads)
    pipe = models.load_pipeline()
    ad = build_adapter(pipe, ModelSection(pipeline=str(models.PIPELINE_DIR)))
    soft, exact = create_reward("toyworld"), create_reward("toyworld-exact")
    prompts = world.train_prompts() * a.repeats
    latents = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(a.seed))
    kw = dict(num_steps=models.DEFAULT_STEPS, guidance_scale=models.DEFAULT_GUIDANCE, latents=latents, scheduler="ddim")
    rows = []
    with torch.no_grad():
        cond = ad.encode_prompts(prompts, world.RESOLUTION)
        uncond = negative_embeds(ad, cond)
        final = decode(ad, denoise(ad, cond, uncond, **kw).latents)
        final_exact = exact.score(final, prompts).per_dim
        print(f"final image ({len(prompts)} images): soft {float(soft.score(final, prompts).scores.mean()):.3f}, exact "
              + ", ".join(f"{d} {float(final_exact[d].float().mean()):.2f}" for d in (*DIMS, "overall")))
        for i in range(models.DEFAULT_STEPS):
            out = denoise(ad, cond, uncond, stop_at=i, **kw)
            x0 = decode(ad, out.latents)
            e = exact.score(x0, prompts).per_dim
            row = {"step": i, "t": int(out.timesteps[i]), "soft": float(soft.score(x0, prompts).scores.mean()),
                   "exact": {d: float(e[d].float().mean()) for d in (*DIMS, "overall")},
                   "agree": {d: float((e[d] == final_exact[d]).float().mean()) for d in DIMS}}
            rows.append(row)
            print(f"step {i} (t = {row['t']}): x̂0 soft {row['soft']:.3f}; exact "
                  + ", ".join(f"{d} {row['exact'][d]:.2f}" for d in (*DIMS, "overall"))
                  + "; verdict as the final image's: " + ", ".join(f"{d} {row['agree'][d]:.2f}" for d in DIMS), flush=True)
    return rows


if __name__ == "__main__":
    main()
