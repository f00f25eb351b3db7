"""Time the shipped toy pipeline: 16 images (one call, CFG on), median of a few repeats, on this machine.

    python examples/benchmarks/toyworld_sampling.py [--steps 10] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment.toyworld import models, world  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=models.DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=models.DEFAULT_GUIDANCE)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = models.load_pipeline()
    prompts = (world.heldout_prompts() * 2)[:16]
    pipe(prompts[:2], num_inference_steps=2, output_type="pt")  # warm-up
    times = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="pt",
             generator=torch.Generator().manual_seed(r))
        times.append(time.perf_counter() - t0)
    print(f"16 images, {args.steps} DDIM steps, CFG {args.guidance}, {torch.get_num_threads()} threads: "
          f"median {statistics.median(times):.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)}); "
          f"load avg {Path('/proc/loadavg').read_text().split()[0] if Path('/proc/loadavg').exists() else '?'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
