"""How a toy-world LoRA changes each branch of classifier-free guidance, and what the sampler makes of it.

Along the base model's own DDIM trajectories on the 144 held-out evaluation images (the efficacy
benchmark's prompts and seeds, CFG 7), prints per sampler step the mean L2 norms (over the 4x8x8 latent)
of the caption's effect in the base model ``ε_c − ε_u``, the LoRA's change of the conditional prediction
``Δc`` and of the empty-caption one ``Δu``, their cosine, the caption-dependent part ``Δc − Δu`` and what the
guided sampler receives, ``w·Δc − (w − 1)·Δu``. Then the held-out exact accuracy of the LoRA sampled with
both branches adapted, and (a probe only) with the reference's unconditional branch (``w·Δc``).

    python examples/benchmarks/dpo_cfg_drift.py --lora outputs/dpo/guided_s0/work/dpo-sigmoid-offline

`--lora` is a directory written by the trainers' `export_lora` (``pytorch_lora_weights.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment.toyworld import models, world  # noqa: E402
from reward_plugins import create_reward  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", required=True, help="directory holding pytorch_lora_weights.safetensors")
    p.add_argument("--guidance", type=float, default=models.DEFAULT_GUIDANCE)
    p.add_argument("--steps", type=int, default=models.DEFAULT_STEPS)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if not (Path(args.lora) / "pytorch_lora_weights.safetensors").is_file():
        print(f"error: no pytorch_lora_weights.safetensors in {args.lora!r}; pass the directory a trainer exported "
              "(e.g. outputs/.../work/dpo-sigmoid-offline).", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    pipe = models.load_pipeline()
    pipe.load_lora_weights(args.lora)
    unet, w = pipe.unet, args.guidance
    prompts = [q for q in world.heldout_prompts() for _ in range(world.EVAL_IMAGES_PER_PROMPT)]
    c, u = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * len(prompts))
    x0 = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(world.EVAL_SEED + i))
                    for i in range(len(prompts))])
    exact = create_reward("toyworld-exact")

    def eps(x, t, e, lora: bool):
        unet.enable_adapters() if lora else unet.disable_adapters()
        return unet(x, t, encoder_hidden_states=e).sample

    def norm(v):
        return round(float(v.flatten(1).norm(dim=1).mean()), 4)

    @torch.no_grad()
    def sample(uncond_lora: bool, stats: bool):
        s = pipe.scheduler
        s.set_timesteps(args.steps)
        x = x0 * s.init_noise_sigma
        for t in s.timesteps:
            ec, eu = eps(x, t, c, True), eps(x, t, u, uncond_lora)
            if stats:  # on this (adapted) trajectory: both branches with and without the LoRA
                ec0, eu0 = eps(x, t, c, False), eps(x, t, u, False)
                dc, du = ec - ec0, eps(x, t, u, True) - eu0
                cos = torch.nn.functional.cosine_similarity(dc.flatten(1), du.flatten(1), dim=1).mean()
                print(json.dumps({"t": int(t), "caption effect |e_c - e_u|": norm(ec0 - eu0), "|dc|": norm(dc),
                                  "|du|": norm(du), "cos(dc, du)": round(float(cos), 3), "|dc - du|": norm(dc - du),
                                  "sampler |w dc - (w-1) du|": norm(w * dc - (w - 1) * du), "|w dc|": norm(w * dc)}))
            x = s.step(eu + w * (ec - eu), t, x).prev_sample
        unet.enable_adapters()
        img = (pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        o = exact(img, prompts)
        return {d: round(float(o.per_dim[d].float().mean()), 3) for d in ("color", "shape", "position", "overall")}

    print("LoRA on both branches:", json.dumps(sample(True, True)))
    print("reference's unconditional branch (probe):", json.dumps(sample(False, False)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
