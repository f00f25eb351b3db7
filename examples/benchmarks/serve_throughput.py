"""Reward server throughput on loopback: images/s and request latency (p50/p99) under 1, 8 and 64
concurrent clients, against in-process scoring of the same tiny reward, in one run (ratios).

    python examples/benchmarks/serve_throughput.py                         # lescore-tiny, 64 px, 1 image/request
    python examples/benchmarks/serve_throughput.py --protocol pickle       # flow_grpo's JPEG pickle protocol
    python examples/benchmarks/serve_throughput.py --images-per-request 4 --clients 1 8 64

The server runs as its own process (`reward-align serve`), as it would in production; the clients are
threads of this process sharing one `create_reward("remote", ...)` client (one keep-alive connection per
thread). In-process scoring is `reward.score` on batches of `--max-batch-size` images in this process.
Both sides use `--threads` torch threads. In-process throughput is measured right before and right
after each concurrency level and the ratio uses their mean (the load of a shared machine drifts). Client-side encoding counts against the server path, as it does
for a trainer. `--in-thread` runs the server on a thread of this process instead (a smoke test: the
GIL is then shared, so its numbers are not the server's).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import reward_plugins as rp  # noqa: E402
from reward_plugins.testing import random_images  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car on a street", "two dogs playing in the snow", "a bowl of soup"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "alignment.cli", "serve", "--reward", args.reward, "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue-images", "4096", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up within 300 s")


def server_stats(remote) -> dict:
    return remote.refresh_info()["stats"]


def in_process(reward, images: torch.Tensor, prompts: list[str], batch: int) -> float:
    """Images/s of `reward.score` over all images in batches of `batch` (after one warm-up batch)."""
    reward.score(images[:batch], prompts[:batch])
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        reward.score(images[i : i + batch], prompts[i : i + batch])
    return len(images) / (time.perf_counter() - t0)


def run_clients(remote, images: torch.Tensor, prompts: list[str], clients: int, per_request: int) -> dict:
    """`clients` threads send all images, `per_request` at a time; images/s and latency percentiles."""
    starts = list(range(0, len(images) - per_request + 1, per_request))
    nxt, lock, latencies = iter(starts), threading.Lock(), []

    def worker() -> None:
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            t = time.perf_counter()
            remote.score(images[i : i + per_request], prompts[i : i + per_request])
            with lock:
                latencies.append(time.perf_counter() - t)

    before = server_stats(remote)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    after = server_stats(remote)
    lat = np.array(latencies) * 1000
    batches = after["batches"] - before["batches"]
    return {
        "images_per_s": len(starts) * per_request / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_batch": (after["images"] - before["images"]) / max(batches, 1),
        # Share of the wall time the server's model thread spent scoring (1.0: the model is the bottleneck).
        "model_busy": (after["busy_seconds"] - before["busy_seconds"]) / wall,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", default="lescore-tiny")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--images", type=int, default=512, help="images scored per concurrency level")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--protocol", default="safetensors", choices=["safetensors", "json", "pickle"])
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process run and of the server")
    p.add_argument("--in-thread", action="store_true", help="server on a thread of this process (smoke test)")
    args = p.parse_args(argv)
    if args.images < args.images_per_request:
        p.error(f"--images ({args.images}) must be at least --images-per-request ({args.images_per_request})")

    torch.set_num_threads(args.threads)
    images = random_images(args.images, args.size, args.size, seed=0)
    prompts = [f"{PROMPTS[i % 4]} #{i % 16}" for i in range(args.images)]
    reward = rp.create_reward(args.reward)
    in_process(reward, images, prompts, args.max_batch_size)  # warm-up (prompt-embedding cache included)

    proc, background = None, None
    if args.in_thread:
        from reward_plugins.serving import BackgroundServer, ServeLimits

        limits = ServeLimits(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue_images=4096)
        background = BackgroundServer(rp.create_reward(args.reward), limits=limits).start()
        url = background.url
    else:
        port = free_port()
        proc = start_process_server(args, port)
        url = f"http://127.0.0.1:{port}"
    results = {}
    print(f"reward {args.reward}, {args.size}x{args.size} images, {args.images_per_request} image(s)/request, "
          f"protocol {args.protocol}, max batch {args.max_batch_size}, max wait {args.max_wait_ms} ms, "
          f"{args.threads} torch thread(s), server {'in-thread' if args.in_thread else 'process'}")
    print("in-process = reward.score in batches of the max batch size, measured right before and right after each "
          "server run (the ratio uses their mean: on a shared CPU the load drifts)")
    print(f"{'clients':>7}  {'images/s':>9}  {'in-process':>10}  {'ratio':>6}  {'p50 ms':>8}  {'p99 ms':>8}  "
          f"{'mean batch':>10}  {'model busy':>10}")
    try:
        remote = rp.create_reward("remote", url=url, protocol=args.protocol, timeout_s=120)
        warm = min(len(images), 4 * args.images_per_request)
        run_clients(remote, images[:warm], prompts[:warm], 4, args.images_per_request)  # warm-up
        for c in args.clients:
            before = in_process(reward, images, prompts, args.max_batch_size)
            r = run_clients(remote, images, prompts, c, args.images_per_request)
            after = in_process(reward, images, prompts, args.max_batch_size)
            r["in_process_images_per_s"] = (before + after) / 2
            r["ratio"] = r["images_per_s"] / r["in_process_images_per_s"]
            results[c] = r
            print(f"{c:>7}  {r['images_per_s']:>9.1f}  {r['in_process_images_per_s']:>10.1f}  {r['ratio']:>6.0%}  "
                  f"{r['p50_ms']:>8.1f}  {r['p99_ms']:>8.1f}  {r['mean_batch']:>10.1f}  {r['model_busy']:>10.0%}",
                  flush=True)
    finally:
        if background is not None:
            background.stop()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    return {"clients": results}

if __name__ == "__main__":
    main()
