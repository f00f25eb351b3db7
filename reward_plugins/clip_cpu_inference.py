"""A faster bf16 CPU inference path for transformers CLIP vision towers (scoring without gradients).

The image tower is ~99 % of a CLIP reward's work. On CPU in bf16 the plain transformers forward runs each
`nn.Linear` through oneDNN with its weight in PyTorch's layout, so every call reorders the weight into
oneDNN's blocked layout, and the bias-GELU and residual additions are separate passes over the
activations. This path runs the same encoder layers with

- weights reordered once into oneDNN's layout (`torch.ops.mkldnn._reorder_linear_weight`, what
  inductor's freezing does) and kept beside the model, cached per tower, rebuilt when a weight changes;
- the exact (erf) GELU and the residual additions fused into the matmul epilogues (applied to the fp32
  accumulator, so one bf16 rounding fewer than the plain path per fused op);
- for pooled embeddings, only the CLS token computed in the last layer (its keys and values still see
  every token): the rest of the last layer's output is never read by `pooler_output`;
- the batch run through the tower a few images at a time (`CHUNK_TOKENS` tokens, 4 images of 257 for
  ViT-H/14): images never interact, and the result was bit-identical to the whole batch's at ViT-H and
  tiny shapes (oneDNN computes each row the same way; the tests check it), and every
  activation stays ~10 MB instead of 42 MB (ViT-H's MLP at batch 16). glibc serves blocks that size from
  its heap once freed instead of mapping fresh pages, so the ~26,000 page faults (~110 MB zeroed by the
  kernel) per layer of the whole-batch path disappear, and the working set stays in cache. Measured on one
  ViT-H layer at batch 16 (1 thread): 1.00 s -> 0.95 s of CPU time, page faults 25,669 -> 0.

Same math as transformers' `CLIPEncoderLayer` (pre-LN attention with SDPA, pre-LN MLP); the matmuls are
bit-identical to `F.linear`'s on the same inputs. It is used only where it helps and is exact to the
bf16 rounding: CPU, bf16 weights and input, gradients off, tower not compiled, "gelu"/"quick_gelu".
Everywhere else (fp32, CUDA, training through the reward) the transformers modules run unchanged.
The packed weights are a second copy of the tower's matmul weights (+1.2 GB for ViT-H/14 in bf16), made on
the first bf16 CPU scoring call (a few seconds for ViT-H on this CPU) and freed with the model or by `clear_cache()`.
Set ``REWARD_PLUGINS_CPU_FAST_PATH=0`` to turn it off.

On a CPU without bf16 instructions (no AVX-512 BF16/AMX, e.g. AMD Zen 3: oneDNN has no bf16 kernels there
and PyTorch's own bf16 GEMM runs at ~8 GFLOP/s per core against ~73 for fp32) a bf16 tower is instead
computed in fp32 (`_forward_fp32_math`): each layer's bf16 weights are upcast (exactly) once per call, the
patch embedding, layer norms, matmuls (MKL) and attention (flash SDPA) run in fp32, and the result is
rounded to bf16 once, at the end. That is the fp32 value of the bf16 model, closer to it than transformers'
bf16 path (which rounds after every op); no extra weight copy is kept (the upcast costs ~15 ms per ViT-H
layer, <1 % of its compute). Images must be at the model's size there (no position interpolation).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_ACTS = ("gelu", "quick_gelu")
# Tokens per chunk of images: 4 ViT-H/14 images (257 tokens each); their MLP activation is 10.5 MB.
CHUNK_TOKENS = 1028
_CACHE: weakref.WeakKeyDictionary[nn.Module, _PackedTower] = weakref.WeakKeyDictionary()


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str = "none") -> torch.Tensor:
    if act == "gelu":
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")  # erf GELU, as nn.GELU()
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _linear_add(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, b, "add")


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.detach())


@dataclass
class _PackedLayer:
    ln1: nn.LayerNorm
    ln2: nn.LayerNorm
    q: torch.Tensor
    q_bias: torch.Tensor | None
    kv: torch.Tensor  # k and v stacked: one matmul
    kv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    fc1: torch.Tensor
    fc1_bias: torch.Tensor | None
    fc2: torch.Tensor
    fc2_bias: torch.Tensor | None
    heads: int
    scale: float

    @classmethod
    def of(cls, layer: nn.Module) -> _PackedLayer:
        a, m = layer.self_attn, layer.mlp

        def bias(*lins):
            bs = [lin.bias for lin in lins]
            return None if any(b is None for b in bs) else torch.cat([b.detach() for b in bs])

        return cls(
            ln1=layer.layer_norm1, ln2=layer.layer_norm2,
            q=_pack(a.q_proj.weight), q_bias=bias(a.q_proj),
            kv=_pack(torch.cat([a.k_proj.weight, a.v_proj.weight])), kv_bias=bias(a.k_proj, a.v_proj),
            o=_pack(a.out_proj.weight), o_bias=bias(a.out_proj),
            fc1=_pack(m.fc1.weight), fc1_bias=bias(m.fc1), fc2=_pack(m.fc2.weight), fc2_bias=bias(m.fc2),
            heads=a.num_heads, scale=a.scale,
        )

    def __call__(self, h: torch.Tensor, act: str, cls_only: bool = False) -> torch.Tensor:
        """One `CLIPEncoderLayer` on (B, S, D); with `cls_only`, the (B, 1, D) output at token 0."""
        b, s, d = h.shape
        hd = d // self.heads
        x = h.reshape(b * s, d)
        y = F.layer_norm(x, (d,), self.ln1.weight, self.ln1.bias, self.ln1.eps)
        k, v = _linear(y, self.kv, self.kv_bias).view(b, s, 2, self.heads, hd).transpose(1, 3).unbind(2)
        # SDPA's CPU flash kernel reads keys and values ~8 % faster head-major; the copy of a chunk is in cache.
        k, v = k.contiguous(), v.contiguous()
        if cls_only:  # only token 0 is read after the last layer; it still attends to every token
            y, x, s = y.view(b, s, d)[:, 0], x.view(b, s, d)[:, 0].contiguous(), 1
        q = _linear(y, self.q, self.q_bias).view(b, s, self.heads, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(b * s, d)
        x = _linear_add(o, self.o, self.o_bias, x)
        y = F.layer_norm(x, (d,), self.ln2.weight, self.ln2.bias, self.ln2.eps)
        if act == "gelu":
            y = _linear(y, self.fc1, self.fc1_bias, "gelu")
        else:  # transformers' QuickGELUActivation
            y = _linear(y, self.fc1, self.fc1_bias)
            y = y * torch.sigmoid(1.702 * y)
        return _linear_add(y, self.fc2, self.fc2_bias, x).view(b, s, d)


def _signature(layers: nn.Module) -> tuple:
    # A weight replaced (load, .to) changes its data pointer; one updated in place bumps its version.
    return tuple((p.data_ptr(), p._version, p.dtype) for p in layers.parameters())


class _PackedTower:
    def __init__(self, layers: nn.ModuleList) -> None:
        self.signature = _signature(layers)
        self.layers = [_PackedLayer.of(layer) for layer in layers]


def _packed(vision: nn.Module) -> _PackedTower:
    layers = vision.encoder.layers
    packed = _CACHE.get(vision)
    if packed is None or packed.signature != _signature(layers):
        with torch.no_grad():
            packed = _PackedTower(layers)
        _CACHE[vision] = packed
    return packed


def clear_cache() -> None:
    """Drop every packed weight copy (they are rebuilt on the next bf16 CPU scoring call)."""
    _CACHE.clear()


def _mkldnn_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def applies(vision: nn.Module, pixels: torch.Tensor) -> bool:
    """Whether `vision` (a transformers CLIP vision model) runs on the fast path for these pixels."""
    if os.environ.get("REWARD_PLUGINS_CPU_FAST_PATH", "1") == "0":
        return False
    if torch.is_grad_enabled() or pixels.device.type != "cpu" or pixels.dtype != torch.bfloat16:
        return False
    if getattr(vision, "_compiled_call_impl", None) is not None:  # the user compiled it: run that
        return False
    cfg = getattr(vision, "config", None)
    if getattr(cfg, "hidden_act", None) not in _ACTS or not hasattr(vision, "encoder"):
        return False
    weight = vision.embeddings.patch_embedding.weight
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return False
    # Without bf16 instructions the tower runs in fp32 (`_forward_fp32_math`), which reimplements the
    # embeddings without position interpolation: other sizes go to transformers (and its error).
    return _mkldnn_bf16() or tuple(pixels.shape[-2:]) == (cfg.image_size, cfg.image_size)


@torch.no_grad()
def vision_forward(vision: nn.Module, pixels: torch.Tensor, pooled: bool) -> torch.Tensor:
    """`vision(pixel_values=pixels)`'s `pooler_output` (B, D) if `pooled`, else `last_hidden_state` (B, N, D).

    Call only where `applies(vision, pixels)`.
    """
    tokens = (pixels.shape[-1] // vision.config.patch_size) * (pixels.shape[-2] // vision.config.patch_size) + 1
    per_chunk = max(1, CHUNK_TOKENS // tokens)  # images never interact: chunks give the same bits
    if not _mkldnn_bf16():
        return _forward_fp32_math(vision, pixels, pooled, per_chunk)
    packed = _packed(vision)
    return torch.cat([_forward(vision, packed, px, pooled) for px in pixels.split(per_chunk)])


def _forward(vision: nn.Module, packed: _PackedTower, pixels: torch.Tensor, pooled: bool) -> torch.Tensor:
    act = vision.config.hidden_act
    h = vision.pre_layrnorm(vision.embeddings(pixels))
    last = len(packed.layers) - 1
    for i, layer in enumerate(packed.layers):
        h = layer(h, act, cls_only=pooled and i == last)
    return vision.post_layernorm(h[:, 0]) if pooled else h


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float()


def _layer_norm_f32(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, _f32(ln.weight), _f32(ln.bias), ln.eps)


def _forward_fp32_math(vision: nn.Module, pixels: torch.Tensor, pooled: bool, per_chunk: int) -> torch.Tensor:
    """The bf16 tower computed in fp32 (CPUs without bf16 instructions), layer by layer over image chunks.

    Each layer's weights are upcast once and used for every chunk; the result is rounded to bf16 at the end.
    """
    emb, act = vision.embeddings, vision.config.hidden_act
    conv = emb.patch_embedding
    x = F.conv2d(pixels.float(), _f32(conv.weight), _f32(conv.bias), stride=conv.stride, padding=conv.padding)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([_f32(emb.class_embedding).expand(x.shape[0], 1, -1), x], dim=1)
    x = _layer_norm_f32(x + _f32(emb.position_embedding(emb.position_ids)), vision.pre_layrnorm)
    hs = list(x.split(per_chunk))
    layers = vision.encoder.layers
    for i, layer in enumerate(layers):
        a, m = layer.self_attn, layer.mlp
        q, q_b = _f32(a.q_proj.weight), _f32(a.q_proj.bias)
        kv = torch.cat([a.k_proj.weight, a.v_proj.weight]).float()
        kv_b = None if a.k_proj.bias is None or a.v_proj.bias is None else torch.cat([a.k_proj.bias, a.v_proj.bias]).float()
        o, o_b = _f32(a.out_proj.weight), _f32(a.out_proj.bias)
        fc1, fc1_b, fc2, fc2_b = _f32(m.fc1.weight), _f32(m.fc1.bias), _f32(m.fc2.weight), _f32(m.fc2.bias)
        cls_only = pooled and i == len(layers) - 1
        for j, h in enumerate(hs):
            b, s, d = h.shape
            heads = a.num_heads
            hd = d // heads
            x = h.reshape(b * s, d)
            y = _layer_norm_f32(x, layer.layer_norm1)
            k, v = F.linear(y, kv, kv_b).view(b, s, 2, heads, hd).transpose(1, 3).unbind(2)
            k, v = k.contiguous(), v.contiguous()
            if cls_only:  # only token 0 is read after the last layer; it still attends to every token
                y, x, s = y.view(b, s, d)[:, 0], x.view(b, s, d)[:, 0], 1
            qh = F.linear(y, q, q_b).view(b, s, heads, hd).transpose(1, 2)
            att = F.scaled_dot_product_attention(qh, k, v, scale=a.scale).transpose(1, 2).reshape(b * s, d)
            x = F.linear(att, o, o_b).add_(x)
            y = F.linear(_layer_norm_f32(x, layer.layer_norm2), fc1, fc1_b)
            y = F.gelu(y) if act == "gelu" else y.mul_(torch.sigmoid(1.702 * y))  # quick_gelu as transformers
            hs[j] = F.linear(y, fc2, fc2_b).add_(x).view(b, s, d)
    h = torch.cat(hs)
    out = _layer_norm_f32(h[:, 0], vision.post_layernorm) if pooled else h
    return out.to(pixels.dtype)
