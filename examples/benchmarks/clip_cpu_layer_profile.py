"""Where one ViT-H/14 layer's CPU time goes on the bf16 CPU fast path (`reward_plugins.clip_cpu_inference`).

Times each op of one `_PackedLayer` on the chunks the tower runs (batch 16 as 4 chunks of 4 images, 257
tokens each, random weights at full width), with its GFLOP/s, and the whole layer chunked, unchunked and
as transformers' `CLIPEncoderLayer`. CPU time (user + system: page faults count), best of `--repeats`.
On a CPU without oneDNN bf16 support (no AVX-512 BF16/AMX) the tower runs in fp32 math instead; there it
times a one-layer ViT-H tower at batch 16 (patch embedding, layer, post-LN) that way, as transformers runs it
in bf16 and in fp32, and one MLP matmul in bf16 and fp32.

    OMP_NUM_THREADS=1 python examples/benchmarks/clip_cpu_layer_profile.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from reward_plugins import clip_cpu_inference  # noqa: E402
from reward_plugins.clip_backbone import build_clip, vit_h14_config  # noqa: E402
from reward_plugins.testing import seeded  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = vit_h14_config()
    cfg.vision_config.num_hidden_layers = cfg.text_config.num_hidden_layers = 1
    with seeded(0):
        vision = build_clip(cfg).vision_model.bfloat16().eval().requires_grad_(False)
        h = torch.randn(4, 257, cfg.vision_config.hidden_size).bfloat16()
    if not clip_cpu_inference._mkldnn_bf16():
        return profile_fp32_math(vision, args.repeats)
    layer, p = vision.encoder.layers[0], clip_cpu_inference._packed(vision).layers[0]
    lin = torch.ops.mkldnn._linear_pointwise
    b, s, d = h.shape
    nh, hd, m, mlp = p.heads, d // p.heads, b * s, cfg.vision_config.intermediate_size
    with torch.no_grad():
        x = h.reshape(m, d)
        y = F.layer_norm(x, (d,), p.ln1.weight, p.ln1.bias, p.ln1.eps)
        k, v = lin(y, p.kv, p.kv_bias, "none", [], "").view(b, s, 2, nh, hd).transpose(1, 3).unbind(2)
        kc, vc = k.contiguous(), v.contiguous()
        q = lin(y, p.q, p.q_bias, "none", [], "").view(b, s, nh, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, kc, vc, scale=p.scale).transpose(1, 2).reshape(m, d)
        u = lin(y, p.fc1, p.fc1_bias, "gelu", [], "none")
        ops = {  # name: (one chunk's call, its FLOPs)
            "layer norm x2": (lambda: [F.layer_norm(x, (d,), p.ln1.weight, p.ln1.bias, p.ln1.eps) for _ in "12"], 0),
            "q linear": (lambda: lin(y, p.q, p.q_bias, "none", [], ""), 2 * m * d * d),
            "k/v linear": (lambda: lin(y, p.kv, p.kv_bias, "none", [], ""), 4 * m * d * d),
            "k/v head-major copy": (lambda: (k.contiguous(), v.contiguous()), 0),
            "sdpa (flash)": (lambda: F.scaled_dot_product_attention(q, kc, vc, scale=p.scale), 4 * b * nh * s * s * hd),
            "out linear + residual": (lambda: lin.binary(o, x, p.o, p.o_bias, "add"), 2 * m * d * d),
            "fc1 + erf GELU": (lambda: lin(y, p.fc1, p.fc1_bias, "gelu", [], "none"), 2 * m * d * mlp),
            "fc2 + residual": (lambda: lin.binary(u, x, p.fc2, p.fc2_bias, "add"), 2 * m * d * mlp),
        }
        chunks = 4
        h16 = h.repeat(chunks, 1, 1)
        wholes = {
            "layer, 4 chunks of 4": lambda: [p(h, "gelu") for _ in range(chunks)],
            "layer, 16 at once": lambda: p(h16, "gelu"),
            "transformers layer, 16": lambda: layer(h16, None),
        }
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, (fn, _) in ops.items():
                t = cpu_s()
                for _ in range(chunks):
                    fn()
                best[name] = min(best.get(name, float("inf")), cpu_s() - t)
            for name, fn in wholes.items():
                t = cpu_s()
                fn()
                best[name] = min(best.get(name, float("inf")), cpu_s() - t)
    total = best["layer, 4 chunks of 4"]
    print(f"ViT-H/14 layer, batch {chunks * b} as {chunks} chunks of {b}, bf16, threads={torch.get_num_threads()}, "
          f"torch={torch.__version__}")
    for name, (_, flops) in ops.items():
        rate = f"{chunks * flops / best[name] / 1e9:8.0f} GFLOP/s" if flops else ""
        print(f"{name:<24}{best[name] * 1e3:9.1f} ms{100 * best[name] / total:7.1f} %{rate}")
    for name in wholes:
        print(f"{name:<24}{best[name] * 1e3:9.1f} ms")


def profile_fp32_math(vision, repeats: int) -> None:
    """CPUs without bf16 instructions: the one-layer tower in fp32 math (ours) against transformers'."""
    cfg = vision.config
    with seeded(1):
        px = torch.randn(16, 3, cfg.image_size, cfg.image_size).bfloat16()
        x = torch.randn(1028, cfg.hidden_size)
        w = torch.randn(cfg.intermediate_size, cfg.hidden_size) * 0.02
    vision32 = copy.deepcopy(vision).float()
    runs = {
        "ours (fp32 math), bf16 model": lambda: clip_cpu_inference.vision_forward(vision, px, pooled=False),
        "transformers, bf16 model": lambda: vision(pixel_values=px).last_hidden_state,
        "transformers, fp32 model": lambda: vision32(pixel_values=px.float()).last_hidden_state,
        "fc1 matmul bf16 (F.linear)": lambda: F.linear(x.bfloat16(), w.bfloat16()),
        "fc1 matmul fp32 (F.linear)": lambda: F.linear(x, w),
    }
    best: dict[str, float] = {}
    with torch.no_grad():
        assert clip_cpu_inference.applies(vision, px)
        for _ in range(repeats):
            for name, fn in runs.items():
                t = cpu_s()
                fn()
                best[name] = min(best.get(name, float("inf")), cpu_s() - t)
    print(f"this CPU has no oneDNN bf16 support: a bf16 tower runs in fp32 math; one-layer ViT-H/14 tower, batch 16 "
          f"(4 chunks of 4 for ours), threads={torch.get_num_threads()}, torch={torch.__version__}")
    flops = 2 * x.shape[0] * w.shape[0] * w.shape[1]
    for name, t in best.items():
        rate = f"{flops / t / 1e9:8.0f} GFLOP/s" if "matmul" in name else ""
        print(f"{name:<32}{t * 1e3:9.1f} ms{rate}")


if __name__ == "__main__":
    main()
