"""Pairs scored per second by `reward-align eval-reward`'s harness with image decoding in worker processes
against decoding in the main process, same set, same reward, same process, one run each (a ratio).

The set is a synthetic Pick-a-Pic parquet of JPEG pairs (decoding a JPEG is real work, as on the real set);
each run starts from an empty score cache so every image is decoded and scored.

    python examples/benchmarks/eval_decode_workers.py --pairs 128 --size 512 --workers 4
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch


def write_set(path: Path, pairs: int, size: int, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from reward_plugins.testing import random_images

    rows = []
    for i in range(pairs):
        imgs = random_images(2, size, size, seed=seed + i)
        enc = []
        for img in imgs:
            arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            enc.append(buf.getvalue())
        rows.append({"caption": f"a photo number {i}", "jpg_0": enc[0], "jpg_1": enc[1], "label_0": float(i % 2)})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--reward", default="pickscore-tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    from alignment.evaluation import evaluate, load_preference_set
    from reward_plugins import create_reward

    reward = create_reward(args.reward, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_set(Path(tmp) / "test.parquet", args.pairs, args.size)
        pset = load_preference_set(path)
        evaluate(pset, [args.reward], models={args.reward: reward}, bootstrap=0, progress=False,
                 batch_size=args.batch, workers=0, limit=2)  # warm-up: first-call costs out of the timing
        rates = {}
        for workers in (0, args.workers):
            cache = Path(tmp) / f"cache-{workers}"
            t0 = time.perf_counter()
            res = evaluate(pset, [args.reward], models={args.reward: reward}, cache_dir=cache, bootstrap=0,
                           progress=False, batch_size=args.batch, workers=workers)
            dt = time.perf_counter() - t0
            assert res.scoring.scored[args.reward] == 2 * args.pairs, res.scoring.scored
            rates[workers] = args.pairs / dt
    print(f"reward {args.reward} on {args.device}, {args.pairs} pairs of {args.size}px JPEG, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} (other work on the machine slows both runs alike)")
    print(f"{'decode workers':>15} {'pairs/s':>9}")
    for w, r in rates.items():
        print(f"{w:>15} {r:>9.2f}")
    ratio = rates[args.workers] / rates[0]
    print(f"ratio {args.workers} workers / 0: {ratio:.2f}x")
    return {"rates": rates, "ratio": ratio}


if __name__ == "__main__":
    main()
