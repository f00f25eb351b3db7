"""The denoising loop with gradients (alignment/sampling.py) on tiny random SD / SDXL pipelines."""

import pytest
import torch

from alignment.pipelines import PipelineAdapter
from alignment.sampling import decode, denoise, make_scheduler, negative_embeds, renoise_final_step
from alignment.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a cat", "a dog"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _lora_pipe(sdxl: bool = False):
    from peft import LoraConfig

    pipe = (tiny_sdxl_pipeline if sdxl else tiny_sd_pipeline)()
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # non-zero B so the adapter changes the output (peft starts B at 0)
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return pipe


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize("kind", [None, "ddpm", "euler", "euler_ancestral"])
def test_no_grad_loop_matches_the_pipeline(sdxl, kind):
    pipe = (tiny_sdxl_pipeline if sdxl else tiny_sd_pipeline)()
    ad = PipelineAdapter(pipe)
    if kind is not None:
        pipe.scheduler = make_scheduler(ad, kind)
        ad = PipelineAdapter(pipe)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ref = pipe(PROMPTS, latents=noise, num_inference_steps=4, guidance_scale=5.0, output_type="pt",
               generator=torch.Generator().manual_seed(3)).images
    cond = ad.encode_prompts(PROMPTS)
    with torch.no_grad():
        out = denoise(ad, cond, negative_embeds(ad, cond), num_steps=4, guidance_scale=5.0, latents=noise,
                      generator=torch.Generator().manual_seed(3))
        images = decode(ad, out.latents)
    assert images.shape == (2, 3, 32, 32)
    assert 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sdxl", [False, True])
def test_gradients_reach_only_lora_parameters(sdxl):
    pipe = _lora_pipe(sdxl)
    ad = PipelineAdapter(pipe)
    cond = ad.encode_prompts(PROMPTS)
    out = denoise(ad, cond, negative_embeds(ad, cond), num_steps=4, grad_steps=2, generator=torch.Generator().manual_seed(0))
    decode(ad, out.latents).mean().backward()
    lora = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())
    assert sum(float(p.grad.abs().sum()) for p in lora.values()) > 0
    frozen = [p for n, p in pipe.unet.named_parameters() if "lora_" not in n]
    frozen += [*pipe.vae.parameters(), *pipe.text_encoder.parameters()]
    assert all(p.grad is None for p in frozen)


def _grad_unet_calls(pipe) -> list[bool]:
    calls: list[bool] = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    return calls


def _saved_bytes(fn) -> int:
    """Bytes of tensors autograd saves for backward while `fn` runs (the graph's memory)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_truncation_bounds_the_graph_by_k_not_by_steps():
    pipe = _lora_pipe()
    ad = PipelineAdapter(pipe)
    cond = ad.encode_prompts(PROMPTS)
    uncond = negative_embeds(ad, cond)
    calls = _grad_unet_calls(pipe)

    def run(k, n, ckpt=False):
        def fn():
            out = denoise(ad, cond, uncond, num_steps=n, grad_steps=k, generator=torch.Generator().manual_seed(0),
                          use_checkpoint=ckpt)
            return decode(ad, out.latents, use_checkpoint=ckpt)

        calls.clear()
        size = _saved_bytes(fn)
        return size, sum(calls), len(calls)

    b1_n4, g1_n4, all_n4 = run(1, 4)
    b1_n8, g1_n8, all_n8 = run(1, 8)
    b3_n8, g3_n8, _ = run(3, 8)
    # Only K UNet calls keep a graph, however many steps are run.
    assert (g1_n4, g1_n8, g3_n8) == (1, 1, 3) and (all_n4, all_n8) == (4, 8)
    # The saved activations (the backward's memory) do not grow with the number of steps...
    assert b1_n8 == b1_n4
    # ...but grow with K: each extra step adds one UNet's activations.
    assert b3_n8 > 2.5 * b1_n8
    # Per-step checkpointing keeps far less than the activations.
    b3_ckpt, _, _ = run(3, 8, ckpt=True)
    assert b3_ckpt < 0.2 * b3_n8


def test_checkpointing_gives_the_same_gradients():
    pipe = _lora_pipe()
    ad = PipelineAdapter(pipe)
    cond = ad.encode_prompts(PROMPTS)
    grads = []
    for ckpt in (False, True):
        pipe.unet.zero_grad(set_to_none=True)
        out = denoise(ad, cond, negative_embeds(ad, cond), num_steps=3, grad_steps=2,
                      generator=torch.Generator().manual_seed(0), use_checkpoint=ckpt)
        decode(ad, out.latents, use_checkpoint=ckpt).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in pipe.unet.named_parameters() if "lora_" in n]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_stop_at_returns_the_predicted_x0_with_one_grad_call():
    pipe = _lora_pipe()
    ad = PipelineAdapter(pipe)
    cond = ad.encode_prompts(PROMPTS)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    calls = _grad_unet_calls(pipe)
    out = denoise(ad, cond, None, num_steps=6, stop_at=3, grad_steps=1, guidance_scale=1.0, latents=noise)
    assert calls == [False, False, False, True]
    assert out.latents.requires_grad
    # Independent reference: the pipeline's own latents after step 2 (its step callback), then the
    # epsilon-parameterisation x̂₀ = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t) at step 3's timestep.
    seen = {}

    def grab(p, i, t, kw):
        if i == 2:
            seen["x"] = kw["latents"].clone()
        return kw

    pipe(PROMPTS, latents=noise, num_inference_steps=6, guidance_scale=1.0, output_type="latent", callback_on_step_end=grab)
    sched = make_scheduler(ad)
    sched.set_timesteps(6)
    t = sched.timesteps[3]
    ab = sched.alphas_cumprod[int(t)]
    with torch.no_grad():
        eps = ad.unet(seen["x"], t, cond)
    torch.testing.assert_close(out.latents.detach(), (seen["x"] - (1 - ab).sqrt() * eps) / ab.sqrt(), rtol=1e-4, atol=1e-5)


def test_renoise_final_step_repeats_each_sample_n_times():
    pipe = _lora_pipe()
    ad = PipelineAdapter(pipe)
    cond = ad.encode_prompts(PROMPTS)
    with torch.no_grad():
        final = denoise(ad, cond, None, num_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).latents
    for kind in (None, "euler"):
        calls = _grad_unet_calls(pipe)
        out = renoise_final_step(ad, final, cond, None, n=3, num_steps=4, guidance_scale=1.0, scheduler=kind,
                                 generator=torch.Generator().manual_seed(1))
        assert out.latents.shape == (6, 4, 16, 16) and out.latents.requires_grad
        assert calls == [True]
        # Re-noising to the last (lowest) noise level keeps each copy close to its source sample.
        d_same = (out.latents[:3] - final[0]).pow(2).mean()
        d_other = (out.latents[:3] - final[1]).pow(2).mean()
        assert d_same < d_other
        pipe.unet._forward_pre_hooks.clear()


def test_anchor_is_zero_against_itself_and_positive_against_the_base():
    pipe = _lora_pipe()
    ad = PipelineAdapter(pipe)
    cond = ad.encode_prompts(PROMPTS)

    def same(x, t, emb):
        return ad.unet(x, t, emb)

    def base(x, t, emb):
        pipe.unet.disable_adapters()
        try:
            return ad.unet(x, t, emb)
        finally:
            pipe.unet.enable_adapters()

    kw = dict(num_steps=3, grad_steps=2, guidance_scale=1.0)
    a0 = denoise(ad, cond, None, generator=torch.Generator().manual_seed(0), reference=same, **kw).anchor
    a1 = denoise(ad, cond, None, generator=torch.Generator().manual_seed(0), reference=base, **kw).anchor
    assert float(a0.detach()) < 1e-10 and float(a1.detach()) > 1e-6
    a1.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pipe.unet.named_parameters() if "lora_" in n)


def test_argument_errors_teach():
    pipe = tiny_sd_pipeline()
    ad = PipelineAdapter(pipe)
    cond = ad.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="grad_steps must be in"):
        denoise(ad, cond, num_steps=3, grad_steps=4)
    with pytest.raises(ValueError, match="stop_at must be a step index"):
        denoise(ad, cond, num_steps=3, stop_at=3)
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        denoise(ad, cond, num_steps=0)
    with pytest.raises(ValueError, match="scheduler 'dpm' is unknown"):
        make_scheduler(ad, "dpm")
    with pytest.raises(ValueError, match="resolution must be a multiple of 4"):
        denoise(ad, cond, num_steps=1, resolution=33)
    with pytest.raises(ValueError, match="positive int"):
        renoise_final_step(ad, torch.zeros(2, 4, 16, 16), cond, n=0)
