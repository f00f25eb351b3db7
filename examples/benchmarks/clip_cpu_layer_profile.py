"""Where one ViT-H/14 layer's CPU time goes on the bf16 CPU fast path (`reward_plugins.clip_cpu_inference`).

Times each op of one `_PackedLayer` on the chunks the tower runs (batch 16 as 4 chunks of 4 images, 257
tokens each, random weights at full width), with its GFLOP/s, and the whole layer chunked, unchunked and
as transformers' `CLIPEncoderLayer`. CPU time (user + system: page faults count), best of `--repeats`.

    OMP_NUM_THREADS=1 python examples/benchmarks/clip_cpu_layer_profile.py --threads 1
"""

from __future__ import annotations

import argparse
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
    if not clip_cpu_inference._mkldnn_bf16():
        sys.exit("this CPU has no oneDNN bf16 support: the fast path does not run here")
    cfg = vit_h14_config()
    cfg.vision_config.num_hidden_layers = cfg.text_config.num_hidden_layers = 1
    with seeded(0):
        vision = build_clip(cfg).vision_model.bfloat16().eval().requires_grad_(False)
        h = torch.randn(4, 257, cfg.vision_config.hidden_size).bfloat16()
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


if __name__ == "__main__":
    main()
