"""Model-family adapters (alignment/pipelines/): forward processes and targets against diffusers'
training scripts' formulas, VAE encode as the exact inverse of decode, explicit `clip_sample`, the
flow sampling loop against the pipelines' own `__call__`, the registry."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from alignment.pipelines import (
    FluxAdapter,
    PipelineAdapter,
    SD3Adapter,
    adapter_class,
    check_pipeline,
    families,
    register_family,
)
from alignment.sampling import decode, denoise, make_scheduler, negative_embeds, renoise_final_step
from alignment.tiny import load_pipeline, save_tiny_pipeline, tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["sd", "sdxl", "sd3", "flux"]


@pytest.fixture(scope="module")
def pipes():
    return {f: tiny_pipeline(f) for f in FAMILIES}


def test_each_family_has_its_adapter(pipes):
    expected = {"sd": "SDAdapter", "sdxl": "SDXLAdapter", "sd3": "SD3Adapter", "flux": "FluxAdapter"}
    for fam, pipe in pipes.items():
        ad = PipelineAdapter(pipe)
        assert type(ad).__name__ == expected[fam] and ad.family == fam == check_pipeline(pipe)
        assert ad.is_flow == (fam in ("sd3", "flux"))


def test_unsupported_pipeline_class_names_the_supported_ones():
    with pytest.raises(TypeError, match="unsupported pipeline class object; supported: ") as err:
        PipelineAdapter(object())
    for name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        assert name in str(err.value)


def test_a_new_family_is_one_decorated_class():
    from alignment.pipelines.base import _FAMILIES

    class ToyPipeline:  # stands in for e.g. diffusers' QwenImagePipeline
        vae = scheduler = None

    @register_family
    class ToyAdapter(FluxAdapter):
        family = "toy_flow"
        pipeline_classes = ("ToyPipeline",)

    try:
        assert families()["toy_flow"] is ToyAdapter and adapter_class(ToyPipeline()) is ToyAdapter
        assert type(PipelineAdapter(ToyPipeline())) is ToyAdapter

        class Again(FluxAdapter):
            family = "other"
            pipeline_classes = ("ToyPipeline",)

        with pytest.raises(ValueError, match="already handled by family 'toy_flow'"):
            register_family(Again)
    finally:
        _FAMILIES.pop("toy_flow")


# --- issue 11 item 2: encode is the exact inverse of decode -----------------------------------------


def _vae_with_stats(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = pipe.vae.config.latent_channels
    mean, std = torch.randn(c, generator=g).tolist(), (torch.rand(c, generator=g) + 0.5).tolist()
    pipe.vae.register_to_config(latents_mean=mean, latents_std=std)
    return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


def test_encode_applies_latents_mean_and_std_like_decode():
    pipe = tiny_pipeline("sdxl")
    mean, std = _vae_with_stats(pipe)
    ad = PipelineAdapter(pipe)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = pipe.vae.encode(images * 2 - 1).latent_dist.mean
        latents = ad.encode_images(images, sample=False)
        s = pipe.vae.config.scaling_factor
        torch.testing.assert_close(latents, (z - mean) * s / std)  # diffusers' SDXL training scripts
        # decode(encode(x)) is the VAE's own reconstruction: the normalisation cancels exactly
        torch.testing.assert_close(ad.decode(latents), (pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_noise_round_trip_through_encode_and_decode(pipes, family):
    """x0 = encode(x); x_t at zero noise level is x0; decode gives the VAE's reconstruction."""
    pipe = pipes[family]
    ad = PipelineAdapter(pipe)
    cfg = pipe.vae.config
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z = pipe.vae.encode(images * 2 - 1).latent_dist.mean
        x0 = ad.encode_images(images, sample=False)
        shift = cfg.shift_factor or 0.0
        torch.testing.assert_close(x0, (z - shift) * cfg.scaling_factor)  # the training scripts' encode
        t0 = torch.zeros(1) if ad.is_flow else torch.zeros(1, dtype=torch.long)
        xt = ad.add_noise(x0, torch.randn_like(x0), t0)
        if ad.is_flow:
            torch.testing.assert_close(xt, x0)  # σ = 0 exactly
        recon = (pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(ad.decode(x0), recon, atol=1e-5, rtol=0)


# --- issue 11 item 4: clip_sample explicit -----------------------------------------------------------


def test_schedulers_built_from_an_euler_config_do_not_clip():
    pipe = tiny_pipeline("sdxl")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    config = dict(pipe.scheduler.config)
    config.pop("clip_sample", None)  # SDXL's Euler config may lack it; DDIM/DDPM then default to True
    pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    ad = PipelineAdapter(pipe)
    assert ad.noise_scheduler.config.clip_sample is False
    for kind in ("ddim", "ddpm"):
        sched = make_scheduler(ad, kind)
        assert sched.config.clip_sample is False, kind
        sched.set_timesteps(4)
        t = sched.timesteps[0]
        x = torch.full((1, 4, 2, 2), 3.0)
        out = sched.step(torch.zeros_like(x), t, x)  # ε = 0: x̂₀ = x_t/√ᾱ, far outside [-1, 1]
        assert out.pred_original_sample.abs().max() > 2.0, kind


def test_a_config_that_clips_keeps_clipping():
    pipe = tiny_pipeline("sd")
    pipe.scheduler.register_to_config(clip_sample=True)
    assert make_scheduler(PipelineAdapter(pipe), "ddim").config.clip_sample is True


# --- forward process and target vs diffusers' training scripts -------------------------------------


def _script_sigmas(sched, timesteps, n_dim):
    """get_sigmas() of diffusers' train_dreambooth_lora_{sd3,flux}.py: look the timesteps up in the schedule."""
    sigmas = sched.sigmas
    step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    sigma = sigmas[step_indices].flatten()
    while len(sigma.shape) < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma


@pytest.mark.parametrize("family,scheme", [("sd3", "logit_normal"), ("flux", "none"), ("sd3", "mode")])
def test_flow_forward_process_matches_the_official_scripts(pipes, family, scheme):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    pipe = pipes[family]
    ad = PipelineAdapter(pipe)
    assert ad.weighting_scheme == {"sd3": "logit_normal", "flux": "none"}[family]  # each script's default
    ad.configure_timesteps(scheme)
    x0 = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(2, 4, 4, 4) / 50 - 1
    eps = torch.linspace(-2, 2, x0.numel()).view_as(x0).flip(-1)
    t = ad.sample_timesteps(2, torch.Generator().manual_seed(7), device="cpu")
    # the script: u from diffusers' density, index the training schedule, σ by lookup
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    u = compute_density_for_timestep_sampling(scheme, 2, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(7))
    t_ref = sched.timesteps[(u * sched.config.num_train_timesteps).long()]
    torch.testing.assert_close(t, t_ref)
    sigma = _script_sigmas(sched, t_ref, 4)
    torch.testing.assert_close(ad.add_noise(x0, eps, t), (1.0 - sigma) * x0 + sigma * eps)
    torch.testing.assert_close(ad.target(x0, eps, t), eps - x0)
    torch.testing.assert_close(ad.loss_weights(t), torch.ones(2))


def test_sd3_training_schedule_is_shifted_and_flux_is_not(pipes):
    s = torch.linspace(1, 1000, 1000).flip(0) / 1000
    sd3_t = PipelineAdapter(pipes["sd3"]).noise_scheduler.timesteps / 1000
    flux_t = PipelineAdapter(pipes["flux"]).noise_scheduler.timesteps / 1000
    torch.testing.assert_close(sd3_t, 3 * s / (1 + 2 * s))  # shift 3 (SD3's config)
    torch.testing.assert_close(flux_t, s)  # dynamic shifting: none at training (the script's schedule)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_ddpm_timesteps_are_uniform_integers(pipes, family):
    ad = PipelineAdapter(pipes[family])
    t = ad.sample_timesteps(4096, torch.Generator().manual_seed(0), device="cpu")
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    ref = torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, ref)  # diffusers' SD scripts: torch.randint(0, T)


def test_flow_x0_estimate_inverts_the_forward_process(pipes):
    ad = PipelineAdapter(pipes["sd3"])
    x0, eps, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([800.0, 120.0])
    xt = ad.add_noise(x0, eps, t)
    torch.testing.assert_close(ad.predicted_x0(xt, ad.target(x0, eps, t), t, None), x0)  # x̂₀ = x_t − σ·v


# --- denoiser calls and the flow sampling loop against the pipelines ----------------------------------


def test_flux_predict_packs_like_the_pipeline(pipes):
    from diffusers import FluxPipeline

    pipe = pipes["flux"]
    ad = PipelineAdapter(pipe)
    cond = ad.encode_prompts(["a cat"])
    x = torch.randn(1, 4, 8, 8)
    packed = FluxPipeline._pack_latents(x, 1, 4, 8, 8)
    with torch.no_grad():
        raw = pipe.transformer(
            hidden_states=packed, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
            pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=cond.shared["text_ids"],
            img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", x.dtype), return_dict=False,
        )[0]
        ours = ad.predict(x, torch.tensor(500.0), cond)
    assert ours.shape == x.shape
    torch.testing.assert_close(FluxPipeline._pack_latents(ours, 1, 4, 8, 8), raw)


@pytest.mark.parametrize("family,guidance", [("sd3", 4.0), ("flux", 3.5)])
def test_no_grad_flow_loop_matches_the_pipeline(pipes, family, guidance):
    pipe = pipes[family]
    ad = PipelineAdapter(pipe)
    prompts = ["a cat", "a dog"]
    ref = pipe(prompt=prompts, num_inference_steps=3, guidance_scale=guidance, height=32, width=32,
               output_type="pt", generator=torch.Generator().manual_seed(5)).images
    cond = ad.encode_prompts(prompts)
    assert (negative_embeds(ad, cond) is None) == (family == "flux")  # FLUX-dev: guidance embedding, no CFG
    with torch.no_grad():
        out = denoise(ad, cond, negative_embeds(ad, cond), num_steps=3, guidance_scale=guidance, resolution=32,
                      generator=torch.Generator().manual_seed(5))
        images = decode(ad, out.latents)
    torch.testing.assert_close(images, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_refl_and_lv_have_gradients(pipes, family):
    pipe = pipes[family]
    ad = PipelineAdapter(pipe)
    cond = ad.encode_prompts(["a cat"])
    pipe.transformer.requires_grad_(True)
    try:
        out = denoise(ad, cond, negative_embeds(ad, cond), num_steps=3, stop_at=1, grad_steps=1, resolution=32,
                      guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
        assert out.latents.requires_grad and out.grad_unet_calls == 1
        lv = renoise_final_step(ad, out.latents.detach(), cond, negative_embeds(ad, cond), n=2, num_steps=3,
                                guidance_scale=2.0, generator=torch.Generator().manual_seed(1))
        assert lv.latents.shape[0] == 2 and lv.latents.requires_grad
        lv.latents.sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.transformer.parameters())
    finally:
        pipe.transformer.requires_grad_(False)
        pipe.transformer.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="not supported by the gradient sampling loop"):
        make_scheduler(ad, "ddim")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tiny_flow_pipelines_save_and_reload(tmp_path, family):
    path = save_tiny_pipeline(tmp_path / family, family=family)
    pipe = load_pipeline(path)
    assert check_pipeline(pipe) == family
    fresh = tiny_pipeline(family)
    ad, ad2 = PipelineAdapter(pipe), PipelineAdapter(fresh)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(600.0)
    with torch.no_grad():
        torch.testing.assert_close(ad.predict(x, t, ad.encode_prompts(["a"])), ad2.predict(x, t, ad2.encode_prompts(["a"])))
    assert isinstance(ad, SD3Adapter if family == "sd3" else FluxAdapter)
