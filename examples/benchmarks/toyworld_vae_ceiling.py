"""The toy world's VAE ceiling: the exact oracle's accuracy on rendered scenes after one VAE round trip.

Every image a toy model makes passes the shipped AutoencoderKL's decoder, and RWR, DPO and supervised
fitting train on encoder latents, so what the round trip loses no method that fits latents can win back.
This prints the round trip's exact accuracy (per dimension, per colour, per shape) on `--per-caption`
rendered scenes of every held-out and training caption. `--finetune-decoder N` then trains the decoder alone
(`examples/toyworld/finetune_decoder.py`'s stage: encoder frozen, so the latent space the UNet and the flow
transformer were trained on is unchanged) for N steps, prints the ceiling again, and with `--eval-base` the held-out exact accuracy of both shipped base models sampled through the
new decoder (`--save PATH` keeps its state dict):

    OMP_NUM_THREADS=1 python examples/benchmarks/toyworld_vae_ceiling.py --finetune-decoder 1500 --eval-base
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment.toyworld import models, world  # noqa: E402
from examples.toyworld.finetune_decoder import DIMS, ceiling, finetune_decoder  # noqa: E402


def show(label: str, c: dict) -> None:
    dims = "  ".join(f"{d} {c['dims'][d]:.3f}" for d in DIMS)
    vals = "  ".join(f"{k} {v:.2f}" for k, v in sorted(c["values"].items()))
    print(f"{label:<28} {dims}\n{'':<28} {vals}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-caption", type=int, default=4, help="rendered scenes per caption (default 4)")
    p.add_argument("--finetune-decoder", type=int, default=0, metavar="N", help="decoder-only fine-tuning steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-base", action="store_true", help="held-out exact accuracy of both base models, new decoder")
    p.add_argument("--save", type=Path, help="write the fine-tuned decoder's VAE state dict here")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.finetune_decoder < 0 or args.per_caption < 1:
        p.error(f"--finetune-decoder must be >= 0 and --per-caption >= 1, got {args.finetune_decoder} and {args.per_caption}")
    torch.set_num_threads(args.threads)
    vae = models.load_pipeline().vae
    splits = {"held-out": world.heldout_prompts(), "training": world.train_prompts()}
    for name, prompts in splits.items():
        show(f"shipped VAE, {name}", ceiling(vae, prompts, args.per_caption))
    if not args.finetune_decoder:
        return 0
    c0 = time.process_time()
    finetune_decoder(vae, args.finetune_decoder, args.lr, args.batch, args.seed)
    print(f"decoder fine-tuned: {args.finetune_decoder} steps, {time.process_time() - c0:.0f} CPU s", flush=True)
    for name, prompts in splits.items():
        show(f"fine-tuned decoder, {name}", ceiling(vae, prompts, args.per_caption))
    if args.save:
        torch.save(vae.state_dict(), args.save)
    if args.eval_base:
        from examples.benchmarks.efficacy_methods.registry import evaluate, load_base

        for base in ("sd", "flow"):
            for label, state in (("shipped", None), ("fine-tuned", vae.state_dict())):
                pipe = load_base(base=base)
                if state is not None:
                    pipe.vae.load_state_dict(state)
                ex = evaluate(pipe, "toyworld", 10, 7.0, base=base)["exact"]
                print(f"{base} base, {label} decoder: " + "  ".join(f"{d} {ex[d]:.3f}" for d in DIMS), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
