"""The bf16 CPU inference path of CLIP vision towers computes what transformers computes, to bf16 rounding."""

import pytest
import torch

from reward_plugins import clip_cpu_inference
from reward_plugins.clip_backbone import build_clip, image_embeds, image_tokens, tiny_clip_config
from reward_plugins.rewards.pickscore import PickScore
from reward_plugins.testing import random_images, seeded
from reward_plugins.tokenization import tiny_clip_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
onednn_bf16 = pytest.mark.skipif(not clip_cpu_inference._mkldnn_bf16(), reason="this CPU has no oneDNN bf16 support")


# Weights scaled up from init (std 0.02) so the attention and MLP change the residual stream a lot.
MUL = 3.0


def tiny(act: str = "gelu"):
    with seeded(0):
        model = build_clip(tiny_clip_config(act=act))
    with torch.no_grad():
        for p in model.vision_model.encoder.parameters():
            p.mul_(MUL if p.ndim == 2 else 1.0)
    return model.eval().requires_grad_(False)


def pixels(n: int = 3) -> torch.Tensor:
    with seeded(1):
        return torch.randn(n, 3, 224, 224)


def plain(model, px, fn):
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("REWARD_PLUGINS_CPU_FAST_PATH", "0")
        return fn(model, px)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean() / b.float().abs().mean())


@onednn_bf16
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("fn", [image_embeds, image_tokens])
def test_fast_path_matches_transformers_to_bf16_rounding(act, fn):
    model = tiny(act).bfloat16()
    px = pixels().bfloat16()
    ref = plain(tiny(act).bfloat16().float(), px.float(), fn)  # the same bf16 weights and pixels in fp32
    assert clip_cpu_inference.applies(model.vision_model, px) is False  # grad mode is on here
    with torch.no_grad():
        assert clip_cpu_inference.applies(model.vision_model, px)
        fast = fn(model, px)
    hf = plain(model, px, fn)
    assert fast.shape == hf.shape == ref.shape and fast.dtype == hf.dtype == torch.bfloat16
    # Both are bf16 approximations of the fp32 value, off by ~1 %; the fused path is no further off.
    err_fast, err_hf = rel(fast, ref), rel(hf, ref)
    assert err_hf < 0.03 and err_fast < 1.5 * err_hf + 1e-3, (err_fast, err_hf)
    # The check is sensitive: swapping keys and values in one layer moves the output far more.
    swapped = tiny(act).bfloat16().float()
    attn = swapped.vision_model.encoder.layers[0].self_attn
    attn.k_proj, attn.v_proj = attn.v_proj, attn.k_proj
    assert rel(plain(swapped, px.float(), fn), ref) > 5 * err_hf


def test_not_used_for_fp32_or_with_gradients():
    model = tiny()
    px = pixels(1)
    with torch.no_grad():
        assert not clip_cpu_inference.applies(model.vision_model, px)  # fp32: transformers runs unchanged
    model = model.bfloat16()
    assert not clip_cpu_inference.applies(model.vision_model, px.bfloat16())


@onednn_bf16
def test_weights_changed_in_place_are_repacked():
    model = tiny().bfloat16()
    px = pixels(2).bfloat16()
    with torch.no_grad():
        before = image_embeds(model, px)
        model.vision_model.encoder.layers[0].mlp.fc1.weight.mul_(-1.0)
        after = image_embeds(model, px)
    hf = plain(model, px, image_embeds)
    assert rel(after, before) > 0.1 and rel(after, hf) < 0.03
    assert model.vision_model in clip_cpu_inference._CACHE
    clip_cpu_inference.clear_cache()
    assert model.vision_model not in clip_cpu_inference._CACHE


def test_pickscore_bf16_scores_follow_the_transformers_path():
    model = tiny().bfloat16()
    reward = PickScore(model, tiny_clip_tokenizer())
    images, prompts = random_images(4, 96, 128, seed=2), ["a cat", "a dog", "a cat", "a red car"]
    fast = reward.score(images, prompts).scores
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REWARD_PLUGINS_CPU_FAST_PATH", "0")
        hf = reward.score(images, prompts).scores
    assert torch.isfinite(fast).all() and rel(fast, hf) < 0.03


@onednn_bf16
@pytest.mark.parametrize("fn", [image_embeds, image_tokens])
def test_the_batch_runs_in_chunks_of_images_with_the_same_result(fn, monkeypatch):
    model = tiny().bfloat16()
    px = pixels(5).bfloat16()  # the tiny tower has 50 tokens per image
    with torch.no_grad():
        whole = fn(model, px)
        monkeypatch.setattr(clip_cpu_inference, "CHUNK_TOKENS", 100)  # 2 images per chunk: 2 + 2 + 1
        calls = []
        forward = clip_cpu_inference._forward
        monkeypatch.setattr(clip_cpu_inference, "_forward", lambda *a: calls.append(a[2].shape[0]) or forward(*a))
        chunked = fn(model, px)
    assert calls == [2, 2, 1]
    assert chunked.shape == whole.shape and torch.equal(chunked, whole)


@pytest.fixture
def no_bf16_isa(monkeypatch):
    """The path of CPUs without bf16 instructions (fp32 math), on any CPU."""
    monkeypatch.setattr(clip_cpu_inference, "_mkldnn_bf16", lambda: False)


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("fn", [image_embeds, image_tokens])
def test_without_bf16_instructions_the_bf16_tower_is_computed_in_fp32(act, fn, no_bf16_isa, monkeypatch):
    model = tiny(act).bfloat16()
    px = pixels(5).bfloat16()
    ref = plain(tiny(act).bfloat16().float(), px.float(), fn)  # the same bf16 weights and pixels in fp32
    with torch.no_grad():
        assert clip_cpu_inference.applies(model.vision_model, px)
        monkeypatch.setattr(clip_cpu_inference, "CHUNK_TOKENS", 100)  # 2 images per chunk: 2 + 2 + 1
        fast = fn(model, px)
    hf = plain(model, px, fn)
    assert fast.shape == hf.shape == ref.shape and fast.dtype == hf.dtype == torch.bfloat16
    # Rounded to bf16 once (output and projection) instead of after every op: ~1/4 of transformers' error.
    err_fast, err_hf = rel(fast, ref), rel(hf, ref)
    assert err_hf < 0.03 and err_fast < 0.25 * err_hf and err_fast < 4e-3, (err_fast, err_hf)
    assert model.vision_model not in clip_cpu_inference._CACHE  # no packed copy on this path


def test_without_bf16_instructions_other_image_sizes_go_to_transformers(no_bf16_isa):
    model = tiny().bfloat16()
    with torch.no_grad():
        assert clip_cpu_inference.applies(model.vision_model, pixels(1).bfloat16())
        assert not clip_cpu_inference.applies(model.vision_model, torch.zeros(1, 3, 112, 224, dtype=torch.bfloat16))
        assert not clip_cpu_inference.applies(model.float().vision_model, pixels(1))  # fp32: transformers
