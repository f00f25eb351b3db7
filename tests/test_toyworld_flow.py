"""The toy world's flow-matching twin: a shipped `StableDiffusion3Pipeline` that loads offline, matches its
manifest, reuses the SD toy's VAE and the toy CLIP's text tower, and follows held-out captions above chance."""

import pytest
import torch

import reward_plugins as rp
from alignment.toyworld import models, render, world


@pytest.fixture(scope="module")
def flow_pipe():
    return models.load_flow_pipeline()


def test_flow_weights_are_in_the_manifest_with_their_training_record():
    hashes = models.verify_weights()
    assert any(k.startswith("flow/transformer/") and k.endswith(".safetensors") for k in hashes)
    assert "flow/model_index.json" in models.read_manifest()["models"]["flow"]["files"]
    record = models.read_manifest()["models"]["flow"]["training"]
    assert record["command"].startswith("python examples/toyworld/train_flow_pipeline.py")
    assert record["args"]["seed"] == 0 and record["wall_s"] > 0 and record["cpu_s"] > 0
    assert record["data_size"] > 0 and record["args"]["wrong_fraction"] == 0.25  # the SD toy's fraction
    assert sum(p.stat().st_size for p in models.weight_files()) <= 20 * 1024 * 1024


def test_flow_pipeline_loads_offline_with_real_sd3_classes(flow_pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    pipe = flow_pipe
    assert isinstance(pipe, StableDiffusion3Pipeline) and isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.text_encoder_3 is None
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == models.FLOW_SHIFT


def test_flow_twin_reuses_the_toy_clip_text_tower_and_the_sd_toy_vae(flow_pipe):
    clip, _ = models.load_clip()
    ours = flow_pipe.text_encoder.state_dict()
    for k, v in clip.text_model.state_dict().items():
        assert torch.equal(ours[f"text_model.{k}"], v), k
    assert torch.equal(ours["text_projection.weight"], clip.text_projection.weight)
    sd_vae = models.load_pipeline().vae.state_dict()
    for k, v in flow_pipe.vae.state_dict().items():
        assert torch.equal(v, sd_vae[k]), k


def test_short_caption_context_equals_the_77_token_encoding(flow_pipe):
    # The flow twin's tokenizers stop at FLOW_TEXT_LENGTH tokens; the causal text tower gives those tokens
    # exactly the states (and the same pooled projection) of the 77-token input the toy CLIP was trained on.
    captions = world.train_prompts()[:5] + world.heldout_prompts()[:3]
    tok77 = models.build_tokenizer()
    short = flow_pipe.tokenizer(captions, padding="max_length", max_length=flow_pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids
    long = tok77(captions, padding="max_length", max_length=models.TEXT_LENGTH, return_tensors="pt").input_ids
    assert short.shape[1] == models.FLOW_TEXT_LENGTH and torch.equal(long[:, : short.shape[1]], short)
    te = flow_pipe.text_encoder
    with torch.no_grad():
        a, b = te(short, output_hidden_states=True), te(long, output_hidden_states=True)
    torch.testing.assert_close(a.text_embeds, b.text_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.hidden_states[-2], b.hidden_states[-2][:, : short.shape[1]], atol=1e-5, rtol=1e-5)


def test_flow_latents_round_trip_through_the_adapter(flow_pipe):
    from alignment.pipelines import PipelineAdapter

    ad = PipelineAdapter(flow_pipe)
    assert ad.family == "sd3" and ad.default_resolution == world.RESOLUTION
    images, _ = render.render(world.all_combinations()[:6], torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = ad.encode_images(images, sample=False)
        rec = ad.decode(z)
    assert z.shape == (6, 4, 8, 8) and abs(float(z.std()) - 1.0) < 0.3  # SD3's convention: unit-scale latents
    assert float((rec - images).abs().mean()) < 0.05


def test_flow_base_follows_heldout_captions_above_chance(flow_pipe):
    prompts = [p for p in world.heldout_prompts() for _ in range(2)]  # 36 images, held-out seeds
    gens = [torch.Generator().manual_seed(world.EVAL_SEED + i) for i in range(len(prompts))]
    out = flow_pipe(prompts, num_inference_steps=models.DEFAULT_STEPS, guidance_scale=models.DEFAULT_GUIDANCE,
                    output_type="pt", generator=gens, **models.FLOW_PIPELINE_KWARGS).images
    assert out.shape == (36, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    acc = {k: float(v.mean()) for k, v in rp.create_reward("toyworld-exact").score(out, prompts).per_dim.items()}
    # chance: colour 1/6, shape 1/3, position 1/5, all three 1/90 (the README states the 144-image numbers)
    assert acc["color"] >= 0.3 and acc["shape"] >= 0.4 and acc["position"] >= 0.4, acc
    assert acc["overall"] >= 0.1, acc  # 0.28 measured on these 36 images; chance is 0.011
