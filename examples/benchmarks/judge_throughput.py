"""Annotated images per second of the MLLM judge, one run, same tiny model everywhere:
HTTP against a local `transformers serve` (sequential vs concurrent requests) and the local backend
(batched generation vs one request at a time).

    python examples/benchmarks/judge_throughput.py                    # 16 requests x 2 images, 32 new tokens
    python examples/benchmarks/judge_throughput.py --no-server        # local backend only

The model is the random tiny LLaVA of `reward_plugins.judge.tiny` (saved to a temporary dir, served from it),
so only relative speed means anything. Generation is unconstrained and a random model rarely stops early:
every request produces about `--max-new-tokens` tokens on every path. Each path is warmed up once first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from reward_plugins.judge import Judge  # noqa: E402
from reward_plugins.judge.backends.http import HTTPBackend  # noqa: E402
from reward_plugins.judge.backends.local import LocalBackend  # noqa: E402
from reward_plugins.judge.tiny import save_tiny_vlm  # noqa: E402
from reward_plugins.testing import random_images  # noqa: E402

SUBJECTS = ["a red fox", "a bowl of ramen", "an astronaut on a horse", "a lighthouse at dawn", "two cats", "a city"]


def _requests(judge: Judge, n: int, k: int, size: int):
    images = random_images(n * k, size, size, seed=0)
    return [judge.request("annotation_aesthetic", f"{SUBJECTS[i % len(SUBJECTS)]}, variation {i}",
                          list(images[i * k : (i + 1) * k])) for i in range(n)]


def _time(backend, reqs, max_new_tokens: int) -> tuple[float, int]:
    backend.generate(reqs[:1], max_new_tokens)  # warm-up
    t0 = time.perf_counter()
    out = backend.generate(reqs, max_new_tokens)
    dt = time.perf_counter() - t0
    errors = [c.error for c in out if c.error]
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]}")
    return dt, sum(c.completion_tokens for c in out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--images-per-request", dest="k", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-server", dest="server", action="store_false")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)

    print(f"# judge throughput: {args.requests} requests x {args.k} images, {args.max_new_tokens} new tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, {platform.machine()}")
    results: dict[str, dict[str, float]] = {}
    images = args.requests * args.k
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_vlm(Path(tmp) / "tiny_vlm")
        one = LocalBackend(str(model_dir), batch_size=1)
        batched = LocalBackend(str(model_dir), batch_size=args.batch_size)
        reqs = _requests(Judge(one), args.requests, args.k, args.image_size)
        for name, backend in (("local, one at a time", one), (f"local, batch {args.batch_size}", batched)):
            dt, toks = _time(backend, reqs, args.max_new_tokens)
            results[name] = {"seconds": dt, "images_per_s": images / dt, "tokens": toks}
        if args.server:
            from reward_plugins.judge.local_server import TransformersServe

            with TransformersServe(model_dir) as server:
                for name, conc in (("http, sequential", 1), (f"http, concurrency {args.concurrency}", args.concurrency)):
                    backend = HTTPBackend(server.base_url, concurrency=conc, timeout=300)
                    dt, toks = _time(backend, reqs, args.max_new_tokens)
                    results[name] = {"seconds": dt, "images_per_s": images / dt, "tokens": toks}
    print(f"{'path':<28}{'seconds':>10}{'images/s':>12}{'tokens':>9}")
    for name, r in results.items():
        print(f"{name:<28}{r['seconds']:>10.2f}{r['images_per_s']:>12.2f}{r['tokens']:>9d}")
    ratios = {"local batched / one at a time": results[f"local, batch {args.batch_size}"]["images_per_s"]
              / results["local, one at a time"]["images_per_s"]}
    if args.server:
        ratios["http concurrent / sequential"] = (results[f"http, concurrency {args.concurrency}"]["images_per_s"]
                                                  / results["http, sequential"]["images_per_s"])
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}x")
    doc = {"settings": vars(args), "results": results, "ratios": ratios}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    main()
