"""Block exploration noise (`sampling.noise_block`): block-constant step noise and the block means' log-prob."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence
from trainer_helpers import CenterBright

from alignment.sampling_logprob import (
    DDIMLogProbSampler,
    FlowLogProbSampler,
    check_noise_block,
    ddim_step_logprob,
    flow_step_logprob,
    gaussian_kl,
    gaussian_log_prob,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _scheduler():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(10)
    return sched


def _block_logpdf(x, mean, std, f):
    """Independent reference: average-pool both to f x f block means, torch's Normal, mean over the blocks."""
    bx, bm = F.avg_pool2d(x, f), F.avg_pool2d(mean, f)
    return Normal(bm, std.expand_as(bm)).log_prob(bx).flatten(1).mean(1)


def _steps(f, gen_seed=0):
    """One DDIM and one flow SDE / CPS step at block size f on the same random inputs."""
    torch.manual_seed(1)
    x, out = torch.randn(3, 4, 8, 12), torch.randn(3, 4, 8, 12)
    g = lambda: torch.Generator().manual_seed(gen_seed)  # noqa: E731
    return x, out, {
        "ddim": ddim_step_logprob(_scheduler(), out, torch.tensor([801, 501, 201]), x, 1.0, generator=g(), noise_block=f),
        "sde": flow_step_logprob(out, 0.8, 0.6, x, 0.7, "sde", generator=g(), noise_block=f),
        "cps": flow_step_logprob(out, 0.8, 0.6, x, 0.7, "cps", generator=g(), noise_block=f),
    }


@pytest.mark.parametrize("f", [2, 4])
def test_block_noise_log_prob_is_the_gaussian_density_of_the_block_means(f):
    _, _, steps = _steps(f)
    for kind, st in steps.items():
        noise = st.prev_sample - st.mean
        # the step noise is constant on each f x f block and keeps the per-element std
        up = F.interpolate(F.avg_pool2d(noise, f), scale_factor=f, mode="nearest")
        torch.testing.assert_close(noise, up, atol=1e-6, rtol=0, msg=kind)
        z = F.avg_pool2d(noise, f) / st.std
        assert abs(float(z.mean())) < 0.3 and 0.6 < float(z.std()) < 1.4, kind
        torch.testing.assert_close(st.log_prob, _block_logpdf(st.prev_sample, st.mean, st.std, f), msg=kind)
    # scoring a recorded sample under a moved policy (the PPO ratio's numerator): the block means' density,
    # which differs from the per-element one as soon as the mean has within-block detail
    x, out, _ = _steps(f)
    moved = out + 0.3 * torch.randn_like(out)
    st, kw = steps["ddim"], {"prev_sample": steps["ddim"].prev_sample, "noise_block": f}
    rescored = ddim_step_logprob(_scheduler(), moved, torch.tensor([801, 501, 201]), x, 1.0, **kw)
    torch.testing.assert_close(rescored.log_prob, _block_logpdf(st.prev_sample, rescored.mean, st.std, f))
    assert not torch.allclose(rescored.log_prob, gaussian_log_prob(st.prev_sample, rescored.mean, st.std))
    for kind in ("sde", "cps"):
        kw["prev_sample"] = steps[kind].prev_sample
        rescored = flow_step_logprob(moved, 0.8, 0.6, x, 0.7, kind, **kw)
        torch.testing.assert_close(rescored.log_prob, _block_logpdf(kw["prev_sample"], rescored.mean, rescored.std, f))
    # a recorded sample is scored by its block means, whatever the within-block detail
    st = steps["ddim"]
    detail = torch.randn_like(st.prev_sample)
    detail = detail - F.interpolate(F.avg_pool2d(detail, f), scale_factor=f, mode="nearest")
    torch.testing.assert_close(gaussian_log_prob(st.prev_sample + detail, st.mean, st.std, f), st.log_prob)


def test_block_kl_is_the_kl_of_the_block_means():
    m, mr = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    std = torch.tensor([0.3, 0.7]).view(2, 1, 1, 1)
    bm, bmr = F.avg_pool2d(m, 2), F.avg_pool2d(mr, 2)
    ref = kl_divergence(Normal(bm, std.expand_as(bm)), Normal(bmr, std.expand_as(bm))).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_kl(m, mr, std, 2), ref)
    torch.testing.assert_close(gaussian_kl(m, mr, std, 1), gaussian_kl(m, mr, std))


def test_block_size_one_is_the_ordinary_step_bit_for_bit():
    x, out, steps = _steps(1)
    # today's rule written out: mean + std * one N(0, I) draw of the latent's full shape, per-element density
    for kind, st in steps.items():
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        assert torch.equal(st.prev_sample, st.mean + st.std * z), kind
        assert torch.equal(st.log_prob, gaussian_log_prob(st.prev_sample, st.mean, st.std)), kind
    g = torch.Generator().manual_seed(0)
    plain = ddim_step_logprob(_scheduler(), out, torch.tensor([801, 501, 201]), x, 1.0, generator=g)
    assert torch.equal(plain.prev_sample, steps["ddim"].prev_sample) and torch.equal(plain.log_prob, steps["ddim"].log_prob)
    plain = flow_step_logprob(out, 0.8, 0.6, x, 0.7, "sde", generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain.prev_sample, steps["sde"].prev_sample) and torch.equal(plain.log_prob, steps["sde"].log_prob)


def test_a_bad_block_size_is_refused_with_a_clear_message():
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="must be a positive integer"):
            check_noise_block(bad, key="sampling.noise_block")
    with pytest.raises(ValueError, match=r"noise_block=3 must divide the latent height and width \(8 x 12\)"):
        ddim_step_logprob(_scheduler(), torch.zeros(1, 4, 8, 12), 801, torch.zeros(1, 4, 8, 12), noise_block=3)
    with pytest.raises(ValueError, match=r"noise_block=8 must divide the latent height and width \(8 x 12\)"):
        flow_step_logprob(torch.zeros(1, 4, 8, 12), 0.8, 0.6, torch.zeros(1, 4, 8, 12), noise_block=8)
    with pytest.raises(ValueError, match="must be a positive integer"):
        FlowLogProbSampler(torch.linspace(1, 0, 5), noise_block=0)
    assert check_noise_block(4, (2, 4, 8, 12)) == 4


def _cfg(*extra):
    from alignment.configs import load_config
    from alignment.trainers.policy_gradient import PolicyGradientConfig

    fast = ["train.report_to=none", "train.max_steps=1", "train.validate_every=0", "train.save_every=1",
            "train.batch_size=4", "train.gradient_accumulation_steps=1", "method.group_size=2",
            "method.prompts_per_epoch=2", "method.inner_epochs=1", "method.contact_sheet_every=0",
            "method.train_steps=all", "sampling.num_steps=2", "sampling.batch_size=4", "train.lr=1e-2"]
    cfg = load_config(PolicyGradientConfig, "configs/tiny/rl_ddpo.yaml", fast + list(extra))
    cfg.eval_reward = None
    return cfg


def test_trainer_refuses_a_block_size_that_does_not_fit_the_latents(tmp_path):
    from alignment.trainers.policy_gradient import PolicyGradientTrainer

    with pytest.raises(ValueError, match=r"sampling.noise_block=3 must divide the latent height and width \(16 x 16\)"):
        PolicyGradientTrainer(_cfg("sampling.noise_block=3"), reward=CenterBright(), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="sampling.noise_block must be a positive integer"):
        PolicyGradientTrainer(_cfg("sampling.noise_block=0"), reward=CenterBright(), output_dir=str(tmp_path))


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_rollouts_and_the_ratio_use_the_block_rule(family, tmp_path):
    from alignment.sampling_logprob import transition
    from alignment.tiny import tiny_pipeline
    from alignment.trainers.policy_gradient import PolicyGradientTrainer

    extra = ["method.name=grpo", "sampling.flow_kind=sde"] if family == "sd3" else []
    cfg = _cfg("sampling.noise_block=4", "method.kl_weight=0.1", "method.inner_epochs=2", "train.max_steps=1", *extra)
    trainer = PolicyGradientTrainer(cfg, reward=CenterBright(), output_dir=str(tmp_path), pipe=tiny_pipeline(family))
    assert trainer.sampler.noise_block == 4
    ro = trainer.sample_epoch(0)
    # the recorded step noise is block-constant and its log-prob is that of the 4 x 4 block means
    cond, uncond = trainer._encode([trainer.prompts[i] for i in ro.prompt_ids.tolist()])
    predict = trainer._predictor(trainer.model, cond, uncond)
    st = torch.zeros(len(ro.prompt_ids), dtype=torch.long)
    with torch.no_grad():
        out = transition(trainer.sampler, predict, ro.traj.latents[:, 0], ro.traj.latents[:, 1], st)
    noise = ro.traj.latents[:, 1] - out.mean
    torch.testing.assert_close(noise, F.interpolate(F.avg_pool2d(noise, 4), scale_factor=4, mode="nearest"),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(ro.traj.log_probs[:, 0], _block_logpdf(ro.traj.latents[:, 1], out.mean, out.std, 4),
                               atol=1e-5, rtol=0)
    adv, _, valid = trainer.advantages(ro)
    stats = trainer.train_on(ro, adv, valid, 0)
    assert stats["policy/ratio_dev_first"] == 0.0 and stats["policy/logprob_recompute_err"] < 1e-5
    assert stats["kl"] >= 0
    # after the updates the ratio's numerator is still the block means' density (the per-element one differs
    # once the mean has moved within blocks)
    with torch.no_grad():
        moved = transition(trainer.sampler, predict, ro.traj.latents[:, 0], ro.traj.latents[:, 1], st)
    torch.testing.assert_close(moved.log_prob, _block_logpdf(ro.traj.latents[:, 1], moved.mean, moved.std, 4),
                               atol=1e-5, rtol=0)
    assert not torch.equal(moved.mean, out.mean)
    assert not torch.allclose(moved.log_prob, gaussian_log_prob(ro.traj.latents[:, 1], moved.mean, moved.std), atol=1e-7, rtol=0)


def test_samplers_carry_the_block_size():
    from alignment.pipelines import PipelineAdapter
    from alignment.tiny import tiny_sd_pipeline

    assert DDIMLogProbSampler(PipelineAdapter(tiny_sd_pipeline()), 4, noise_block=2).noise_block == 2
    assert FlowLogProbSampler(torch.linspace(1, 0, 5)).noise_block == 1
