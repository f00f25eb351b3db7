"""Best-of-N scoring with PickScore: ours against a plain transformers implementation, side by side.

Same weights, dtype and batch (N images over a few prompts, as best-of-N and pair mining score them):
- plain: what a user writes with transformers: the pipeline's PIL images -> `CLIPProcessor(images=...,
  text=..., padding=True, truncation=True, max_length=77)` -> `get_image_features` / `get_text_features`
  (transformers' default SDPA attention) -> exp(logit_scale) * cos;
- ours cold: `reward.score(tensor_images, prompts)` with an empty prompt cache (each unique prompt
  encoded once, its ids cut after EOT; one batched tensor preprocessing pass);
- ours warm: the same with the prompts already cached (every later batch of a best-of-N run);
- ours compiled (`--compile`): the image tower under `torch.compile(dynamic=False)` (meant for CUDA);
- ours, transformers tower (`--ablate`): warm cache with the bf16 CPU tower path off
  (`REWARD_PLUGINS_CPU_FAST_PATH=0`), i.e. the transformers modules themselves.
Paths are interleaved repeat by repeat and the best time of each is kept. Both wall time and process
CPU time are reported: on a shared CPU (other jobs preempting this one) wall time is mostly noise, while
with one thread (`--threads 1`) the CPU time is the work done; the CPU-time ratio is the one to read there.
On CUDA (or with `--peak`) it also reports the image tower's FLOP rate as a % of the measured matmul peak
in the same dtype. `--dry-run` runs all of that (compile with the "eager" backend, a small peak matmul)
on the tiny model, so the GPU command is exercised on CPU by the tests.

    python examples/benchmarks/plain_transformers.py                                   # tiny, CPU
    python examples/benchmarks/plain_transformers.py --full --dtype bf16 --batch 16 --prompts 4 --threads 1
    python examples/benchmarks/plain_transformers.py --full --device cuda --dtype bf16 --batch 64 --compile
    python examples/benchmarks/plain_transformers.py --dtype bf16 --batch 8 --compile --dry-run   # CPU check
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.benchmarks.cases.pickscore import clip_processor, full_tokenizer, vit_flops  # noqa: E402
from examples.benchmarks.score_throughput import matmul_peak, sync  # noqa: E402
from reward_plugins.clip_backbone import build_clip, image_embeds, tiny_clip_config, vit_h14_config  # noqa: E402
from reward_plugins.preprocess import tensor_to_pil  # noqa: E402
from reward_plugins.registry import resolve_dtype  # noqa: E402
from reward_plugins.rewards.pickscore import PickScore  # noqa: E402
from reward_plugins.testing import random_images, seeded  # noqa: E402
from reward_plugins.tokenization import tiny_clip_tokenizer  # noqa: E402

PROMPTS = ["a photo of a cat", "a red sports car in the rain", "an astronaut riding a horse on the moon",
           "a bowl of ramen with a soft-boiled egg", "a watercolor painting of a lighthouse", "a corgi wearing sunglasses"]


def features(out) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features, 4.x a tensor.
    return out if torch.is_tensor(out) else out.pooler_output


def plain_path(model, tokenizer, device: str, dtype: torch.dtype):
    from transformers import CLIPProcessor

    proc = CLIPProcessor(image_processor=clip_processor(), tokenizer=tokenizer)

    @torch.no_grad()
    def run(pil_images, prompts):
        inputs = proc(images=pil_images, text=prompts, padding=True, truncation=True, max_length=77,
                      return_tensors="pt").to(device)
        img = F.normalize(features(model.get_image_features(pixel_values=inputs["pixel_values"].to(dtype))), dim=-1)
        txt = F.normalize(features(model.get_text_features(input_ids=inputs["input_ids"],
                                                           attention_mask=inputs["attention_mask"])), dim=-1)
        return (model.logit_scale.exp() * (img * txt).sum(-1)).float()

    return run


@contextmanager
def fast_path_off():
    old = os.environ.get("REWARD_PLUGINS_CPU_FAST_PATH")
    os.environ["REWARD_PLUGINS_CPU_FAST_PATH"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["REWARD_PLUGINS_CPU_FAST_PATH"]
        else:
            os.environ["REWARD_PLUGINS_CPU_FAST_PATH"] = old


def time_interleaved(paths: dict, device: str, repeats: int) -> tuple[dict, dict, dict]:
    """Best wall and best process-CPU seconds of each path over `repeats` interleaved rounds, last outputs."""
    best = {k: float("inf") for k in paths}
    best_cpu = dict(best)
    outs = {}
    for _ in range(repeats):
        for name, fn in paths.items():
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            outs[name] = fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t)
            best_cpu[name] = min(best_cpu[name], time.process_time() - c)
    return best, best_cpu, outs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="full PickScore size (ViT-H/14, random weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=4, help="distinct prompts in the batch")
    ap.add_argument("--size", type=int, default=512, help="image side (SD 1.5 output: 512)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time ours with a compiled image tower")
    ap.add_argument("--compile-backend", default="inductor", help='torch.compile backend ("eager": a quick check)')
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own setting)")
    ap.add_argument("--ablate", action="store_true", help="also time ours with the transformers image tower")
    ap.add_argument("--peak", action="store_true", help="report the tower's % of matmul peak (default on CUDA)")
    ap.add_argument("--peak-size", type=int, default=8192, help="side of the square matmuls timed for the peak")
    ap.add_argument("--dry-run", action="store_true",
                    help="quick CPU check of every code path: tiny model, --peak with a 256 matmul, compile backend "
                         '"eager", one repeat')
    args = ap.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        ap.error(f"--prompts must be in 1..{len(PROMPTS)}; got {args.prompts}")
    if args.dry_run:
        if args.full:
            ap.error("--dry-run runs the tiny model; drop --full")
        args.peak, args.peak_size, args.compile_backend, args.repeats = True, 256, "eager", 1
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype)

    with seeded(0):
        if args.full:
            model, tok, flops = build_clip(vit_h14_config()), full_tokenizer(), vit_flops(1280, 32, 5120, 257, 14)
        else:
            model, tok, flops = build_clip(tiny_clip_config()), tiny_clip_tokenizer(), vit_flops(32, 2, 64, 50, 32)
    model = model.to(device=args.device, dtype=dtype).eval().requires_grad_(False)
    reward = PickScore(model, tok)  # the same module: both paths run the same weights

    images = random_images(args.batch, args.size, args.size, seed=0)
    pil = [tensor_to_pil(x) for x in images]  # what the plain path gets from a pipeline (output_type="pil")
    dev_images = images.to(args.device)
    prompts = [PROMPTS[i % args.prompts] for i in range(args.batch)]
    plain = plain_path(model, tok, args.device, dtype)

    def ours_cold():
        reward.prompt_cache.clear()
        return reward.score(dev_images, prompts).scores

    def ours_transformers_tower():
        with fast_path_off():
            return reward.score(dev_images, prompts).scores

    paths = {"plain transformers": partial(plain, pil, prompts), "ours (cold cache)": ours_cold,
             "ours (warm cache)": lambda: reward.score(dev_images, prompts).scores}
    if args.ablate:
        paths["ours (warm, hf tower)"] = ours_transformers_tower
    # Warm-up: kernels, allocator, lazy init (one image, one prompt); ours also packs its CPU bf16 weights once.
    t = time.perf_counter()
    plain(pil[:1], prompts[:1])
    t_plain_warm, t = time.perf_counter() - t, time.perf_counter()
    reward.score(dev_images[:1], prompts[:1])
    t_ours_warm = time.perf_counter() - t
    best, best_cpu, outs = time_interleaved(paths, args.device, args.repeats)
    if args.compile:
        opts = ({"mode": "max-autotune-no-cudagraphs" if args.device.startswith("cuda") else "default"}
                if args.compile_backend == "inductor" else {"backend": args.compile_backend})
        reward.compile_image_tower(**opts)
        reward.score(dev_images, prompts)  # compiles for this batch size
        b, c, o = time_interleaved({"ours (compiled, warm)": lambda: reward.score(dev_images, prompts).scores},
                                   args.device, args.repeats)
        best.update(b)
        best_cpu.update(c)
        outs.update(o)

    print(f"PickScore {'ViT-H/14' if args.full else 'tiny'} device={args.device} dtype={dtype} batch={args.batch} "
          f"prompts={args.prompts} size={args.size} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"warm-up s: plain {t_plain_warm:.2f}, ours {t_ours_warm:.2f}")
    ref = outs["plain transformers"].cpu()
    t_plain, c_plain = best["plain transformers"], best_cpu["plain transformers"]
    print(f"{'path':<24}{'s/batch':>10}{'img/s':>9}{'vs plain':>10}{'max |diff|':>12}{'cpu s':>10}{'cpu vs plain':>14}")
    for name, t in best.items():
        diff = float((outs[name].float().cpu() - ref).abs().max())
        c = best_cpu[name]
        print(f"{name:<24}{t:>10.3f}{args.batch / t:>9.2f}{t_plain / t:>9.2f}x{diff:>12.4f}{c:>10.3f}"
              f"{c_plain / max(c, 1e-9):>13.2f}x")

    if args.peak or args.device.startswith("cuda"):
        peak = matmul_peak(args.device, dtype, n=args.peak_size)
        px = reward.transform(dev_images).to(dtype)
        tower = partial(image_embeds, reward.model, px)  # what scoring runs: compiled, CPU bf16 path or transformers
        with torch.no_grad():
            tower()
            b, _, _ = time_interleaved({"tower": tower}, args.device, max(args.repeats, 3))
        rate = flops * args.batch / b["tower"]
        compiled = "compiled " if args.compile else ""
        print(f"{compiled}image tower: {rate / 1e12:.3f} TFLOP/s = {100 * rate / peak:.1f}% of the measured {dtype} "
              f"matmul peak ({peak / 1e12:.3f} TFLOP/s, {args.peak_size}-square matmuls)")


if __name__ == "__main__":
    main()
