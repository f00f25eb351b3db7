"""Log-prob samplers (alignment/sampling_logprob.py): each step against an independent formulation."""

import math

import pytest
import torch
from torch.distributions import Normal

from alignment.pipelines import PipelineAdapter
from alignment.sampling_logprob import (
    DDIMLogProbSampler,
    FlowLogProbSampler,
    ddim_step_logprob,
    denoiser_predictor,
    flow_step_logprob,
    gaussian_kl,
    rollout,
    transition,
)
from alignment.tiny import tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _normal_mean_logpdf(x, mean, std):
    """Independent reference: torch.distributions, averaged over non-batch dims."""
    return Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1).mean(1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_matches_diffusers_and_a_gaussian_density(prediction_type, eta):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    out = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    for t in (int(sched.timesteps[0]), int(sched.timesteps[4]), int(sched.timesteps[-1])):
        # diffusers' own step: mean with zero noise, the sample with given noise, std from its variance
        mean_ref = sched.step(out, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        prev_ref = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
        std_ref = eta * sched._get_variance(t, prev_t) ** 0.5
        step = ddim_step_logprob(sched, out, torch.full((3,), t), x, eta, prev_sample=prev_ref)
        torch.testing.assert_close(step.mean, mean_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step.std.flatten(), torch.full((3,), float(std_ref)), atol=1e-7, rtol=1e-5)
        expected = _normal_mean_logpdf(prev_ref, mean_ref, torch.tensor(float(std_ref)))
        torch.testing.assert_close(step.log_prob, expected, atol=1e-4, rtol=1e-5)
        # a drawn step is mean + std * N(0, 1)
        drawn = ddim_step_logprob(sched, out, t, x, eta, generator=torch.Generator().manual_seed(1))
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(drawn.prev_sample, mean_ref + float(std_ref) * z, atol=1e-5, rtol=1e-5)


def test_ddim_per_sample_timesteps_equal_single_steps():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(8)
    x, out, nxt = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    ts = sched.timesteps[[0, 3, 7]]
    batched = ddim_step_logprob(sched, out, ts, x, 1.0, prev_sample=nxt)
    for i in range(3):
        single = ddim_step_logprob(sched, out[i:i + 1], ts[i], x[i:i + 1], 1.0, prev_sample=nxt[i:i + 1])
        torch.testing.assert_close(batched.log_prob[i:i + 1], single.log_prob)


def _flow_reference(v, sigma, sigma_next, x, a, sigma_max):
    """Flow-GRPO's SDE written from the paper: x' = x + [v + g²/(2σ)(x + (1 − σ)v)]dt + g√(−dt) ε."""
    dt = sigma_next - sigma
    g = a * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    mean = x + (v + g * g / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    return mean, torch.tensor(g * math.sqrt(-dt))


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.6, 0.45), (0.2, 0.0)])
def test_flow_sde_step_matches_the_paper_form_and_a_gaussian_density(sigma, sigma_next):
    g = torch.Generator().manual_seed(0)
    x, v, nxt = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(3))
    step = flow_step_logprob(v, sigma, sigma_next, x, 0.7, "sde", sigma_max=0.9, prev_sample=nxt)
    mean, std = _flow_reference(v, sigma, sigma_next, x, 0.7, 0.9)
    torch.testing.assert_close(step.mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.log_prob, _normal_mean_logpdf(nxt, mean, std), atol=1e-4, rtol=1e-5)


def test_cps_step_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    x, v, nxt = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(3))
    s, s2, eta = 0.7, 0.5, 0.6
    std = s2 * math.sin(eta * math.pi / 2)
    mean = (1 - s2) * (x - s * v) + math.sqrt(s2**2 - std**2) * (x + (1 - s) * v)
    step = flow_step_logprob(v, s, s2, x, eta, "cps", prev_sample=nxt)
    torch.testing.assert_close(step.mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.log_prob, _normal_mean_logpdf(nxt, mean, torch.tensor(std)), atol=1e-4, rtol=1e-5)
    # the last step (σ' = 0) of CPS is deterministic: no log-prob, no NaN
    last = flow_step_logprob(v, 0.2, 0.0, x, eta, "cps")
    assert torch.equal(last.log_prob, torch.zeros(2)) and torch.isfinite(last.prev_sample).all()


def test_flow_sde_keeps_the_marginals_of_a_gaussian_toy():
    """Data x₀ ~ N(0, s²): the exact velocity is linear in x; the SDE must end at variance s² and pass
    through the forward process's marginals (1 − σ)² s² + σ² on the way."""
    s2 = 0.25

    def predict(x, step, t):
        sig = (t / 1000).view(-1, 1)
        var = (1 - sig) ** 2 * s2 + sig**2
        return (sig - (1 - sig) * s2) / var * x

    # Euler-Maruyama error is largest near σ = 1 (the official guard there); 160 steps keep it small
    sigmas = torch.linspace(1, 0, 161)
    sampler = FlowLogProbSampler(sigmas, noise_level=0.7, kind="sde")
    traj = rollout(sampler, predict, torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)),
                   generator=torch.Generator().manual_seed(1))
    assert abs(float(traj.final.var()) - s2) < 0.01
    for i in (40, 80, 120):
        expected = (1 - sigmas[i]) ** 2 * s2 + sigmas[i] ** 2
        assert abs(float(traj.latents[:, i].var()) - float(expected)) < 0.04


def test_cps_preserves_the_noise_coefficient_with_an_exact_model():
    """A point-mass data set (x₀ = c, so x̂₀ and x̂₁ are exact): every CPS state is (1 − σ) c + σ z with
    unit-variance z, i.e. exactly the forward-process coefficients, for any noise level."""
    c = 0.8

    def predict(x, step, t):
        sig = (t / 1000).view(-1, 1)
        eps = (x - (1 - sig) * c) / sig
        return eps - c

    sigmas = torch.linspace(1, 0, 11)
    for level in (0.3, 0.9):
        sampler = FlowLogProbSampler(sigmas, noise_level=level, kind="cps")
        traj = rollout(sampler, predict, torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)),
                       generator=torch.Generator().manual_seed(2))
        for i in (3, 6, 9):
            z = (traj.latents[:, i] - (1 - sigmas[i]) * c) / sigmas[i]
            assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
        torch.testing.assert_close(traj.final, torch.full_like(traj.final, c), atol=1e-4, rtol=0)
        assert torch.equal(traj.log_probs[:, -1], torch.zeros(20000))  # σ' = 0: deterministic last step


def test_gaussian_kl_equals_a_closed_form():
    from torch.distributions import kl_divergence

    m, mr = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    std = torch.tensor([0.3, 0.7]).view(2, 1, 1)
    ref = kl_divergence(Normal(m, std.expand_as(m)), Normal(mr, std.expand_as(m))).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_kl(m, mr, std), ref)


def test_samplers_refuse_a_deterministic_policy():
    pipe = tiny_sd_pipeline()
    with pytest.raises(ValueError, match="eta must be > 0"):
        DDIMLogProbSampler(PipelineAdapter(pipe), 4, eta=0.0)
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        FlowLogProbSampler(torch.linspace(1, 0, 5), noise_level=0.0)
    with pytest.raises(ValueError, match="decrease strictly"):
        FlowLogProbSampler(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="sigma_max"):
        flow_step_logprob(torch.zeros(1, 2), 1.0, 0.5, torch.zeros(1, 2), 0.7, "sde")


def test_recomputed_log_prob_equals_the_recorded_one_on_a_tiny_pipeline():
    pipe = tiny_sd_pipeline()
    ad = PipelineAdapter(pipe)
    prompts = ["a cat", "a dog", "a red car"]
    cond = ad.encode_prompts(prompts)
    uncond = ad.negative_embeds(cond)
    sampler = DDIMLogProbSampler(ad, 4, eta=1.0)
    predict = denoiser_predictor(ad, pipe.unet, cond, uncond, 3.0)
    traj = rollout(sampler, predict, torch.randn(3, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape == (3, 5, 4, 16, 16) and traj.log_probs.shape == (3, 4)
    assert torch.isfinite(traj.log_probs).all()
    for j in range(4):
        step = torch.full((3,), j)
        with torch.no_grad():
            out = transition(sampler, predict, traj.latents[:, j], traj.latents[:, j + 1], step)
        assert torch.equal(out.log_prob, traj.log_probs[:, j])  # ratio exactly 1
        torch.testing.assert_close(out.prev_sample, traj.latents[:, j + 1])
