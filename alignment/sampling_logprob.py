"""Stochastic samplers that record every transition's Gaussian log-probability, for policy-gradient
training (DDPO, Flow-GRPO).

A denoising chain x_T -> ... -> x_0 sampled with noise is a Markov decision process whose policy is
the Gaussian transition p_θ(x_{i+1} | x_i) = N(μ_θ(x_i), s_i² I). Two families of steps:

- **DDIM with η > 0** for ε- and v-prediction models (SD 1.x/2.x, SDXL; DDPO, Black et al. 2023):
  μ = √ᾱ_prev x̂₀ + √(1 − ᾱ_prev − s²) ε̂ and s = η √((1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev)).
  η = 1 is DDPO's default (DDPM's variance).
- **The flow SDE** for rectified-flow models (SD3, FLUX; Flow-GRPO, Liu et al. 2025), with the same
  marginals as the ODE dx = v dσ: from σ to σ' < σ (dt = σ' − σ < 0),
  μ = x + [v + g²/(2σ) (x + (1 − σ) v)] dt, s = g √(−dt), g = a √(σ / (1 − σ)), `a` the noise level
  (0.7 in Flow-GRPO; at σ = 1 the denominator uses the schedule's second sigma, as the official code).
  **Coefficients-preserving sampling** (CPS, Wang & Yu 2025) is the option ``kind="cps"``: with
  x̂₀ = x − σ v and x̂₁ = x + (1 − σ) v, μ = (1 − σ') x̂₀ + √(σ'² − s²) x̂₁ and s = σ' sin(a π/2), so a
  sample keeps exactly the coefficients of the forward process x = (1 − σ') x₀ + σ' ε.

Every log-probability here is the **mean over the non-batch dimensions** of the elementwise Gaussian
log-density (both official codes do this; the per-element scale keeps PPO's clip range independent
of the image size). CPS's official code drops the constants and the 1/(2s²) factor; this module keeps
the true density for every kind (the variance does not depend on θ, so ratios only differ in scale).

**Block exploration noise** (``noise_block`` f > 1, an opt-in variance reduction of this project, not in
either paper): each stochastic step draws z ~ N(0, I) at low resolution, (B, C, h/f, w/f), and
nearest-upsamples it by f, so x_{i+1} = μ + s·up(z). Every latent element keeps its std s, but the step's
randomness lives in k = C·h·w/f² dimensions instead of C·h·w, and the score-function estimator's
per-group signal share ceiling 1/(1 + D/G) rises with D = k per trained step. The log-prob is the density
of what is random, the f × f block means: bm(x_{i+1}) ~ N(bm(μ), s²) elementwise, so the log-prob is
`gaussian_log_prob(bm(x_{i+1}), bm(μ), s)` (mean over the k block elements) and the KL is taken on
block means too. The bias of the option: the within-block detail of μ (μ − up(bm(μ))) follows the
policy deterministically and gets no score-function gradient, and the chain's joint law is not DDPM's /
the SDE's (the noise is block-constant). f = 1 is the ordinary per-element noise, bit for bit.

`rollout` runs a whole chain and records latents and log-probs; `transition` recomputes the
log-prob of recorded transitions under the current model (the ratio's numerator). Both call the
model through one function, so the first recomputation equals what was recorded.

Example:
    >>> sampler = DDIMLogProbSampler(adapter, num_steps=50, eta=1.0)
    >>> traj = rollout(sampler, predict, latents, generator=g)          # traj.log_probs (B, 50)
    >>> out = transition(sampler, predict, traj.latents[:, 3], traj.latents[:, 4], torch.full((B,), 3))
    >>> ratio = (out.log_prob - traj.log_probs[:, 3]).exp()             # 1 before any update
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .pipelines import PipelineAdapter, PromptEmbeds

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
FLOW_KINDS = ("sde", "cps", "ode")

# predict(x, step_index (B,) long, model_time (B,)) -> the model's (guided) prediction, fp32
Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepLogProb:
    """One transition.

    Attributes:
        prev_sample: x_{i+1} (drawn, or the recorded one that was passed in).
        log_prob: (B,) mean over non-batch dims of log N(prev_sample | mean, std²); 0 where std = 0.
        mean: the transition mean μ_θ(x_i), differentiable in the model output.
        std: (B, 1, ..., 1) the transition standard deviation (independent of the model).
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _per_sample(v, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) value as a (B, 1, ..., 1) fp32 tensor on `like`'s device."""
    v = torch.as_tensor(v, dtype=torch.float32, device=like.device)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def check_noise_block(f, shape: tuple | torch.Size | None = None, key: str = "noise_block") -> int:
    """`f` if it is a valid block size: a positive integer dividing the last two dims of `shape` (if given).

    Raises:
        ValueError: a one-line message naming `key`, the value and the latent size.
    """
    if not isinstance(f, int) or isinstance(f, bool) or f < 1:
        raise ValueError(f"{key} must be a positive integer (1 = per-element step noise); got {f!r}.")
    if f > 1 and shape is not None:
        if len(shape) < 2 or shape[-2] % f or shape[-1] % f:
            size = " x ".join(str(int(d)) for d in shape[-2:])
            raise ValueError(f"{key}={f} must divide the latent height and width ({size}); use a divisor such as 1 or 2.")
    return f


def block_mean(x: torch.Tensor, f: int) -> torch.Tensor:
    """The mean of each f x f block of the last two dims: (..., h, w) -> (..., h/f, w/f); `x` itself for f = 1."""
    if f == 1:
        return x
    check_noise_block(f, x.shape)
    *lead, h, w = x.shape
    return x.reshape(*lead, h // f, f, w // f, f).mean(dim=(-3, -1))


def block_upsample(z: torch.Tensor, f: int) -> torch.Tensor:
    """Nearest upsampling of the last two dims by f (each value fills an f x f block); `z` itself for f = 1."""
    if f == 1:
        return z
    return z.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)


def _blocks(t: torch.Tensor, like: torch.Tensor, f: int) -> torch.Tensor:
    """Block means of `t` where it spans `like`'s last two dims; a broadcast (…, 1, 1) `t` as it is."""
    if f > 1 and t.ndim == like.ndim and t.shape[-2:] == like.shape[-2:]:
        return block_mean(t, f)
    return t


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, block: int = 1) -> torch.Tensor:
    """Mean over non-batch dims of the elementwise log N(x | mean, std²); rows with std = 0 give 0.

    `x` is treated as data (detached): the gradient flows through `mean` only. With `block` f > 1 the
    density is that of the f x f block means, log N(bm(x) | bm(mean), std²), averaged over the block
    elements: the law of a step whose noise is `block_upsample`d from (…, h/f, w/f) (std constant per block).
    """
    if block > 1:
        x, std, mean = block_mean(x.detach(), block), _blocks(std, mean, block), block_mean(mean, block)
    std = std.expand_as(mean) if std.shape != mean.shape else std
    safe = torch.where(std > 0, std, torch.ones_like(std))
    lp = -((x.detach() - mean) ** 2) / (2 * safe**2) - torch.log(safe) - LOG_SQRT_2PI
    lp = torch.where(std > 0, lp, torch.zeros_like(lp))
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor, block: int = 1) -> torch.Tensor:
    """(B,) KL(N(mean, std²) || N(mean_ref, std²)) per element, averaged over non-batch dims.

    With a shared variance the KL between two Gaussian transitions is ‖μ − μ_ref‖² / (2 s²) (Flow-GRPO's
    KL term); rows with std = 0 give 0. With `block` f > 1 it is the KL of the f x f block means (the
    random part of a block-noise step), averaged over the block elements.
    """
    if block > 1:
        std, mean, mean_ref = _blocks(std, mean, block), block_mean(mean, block), block_mean(mean_ref, block)
    std = std.expand_as(mean) if std.shape != mean.shape else std
    safe = torch.where(std > 0, std, torch.ones_like(std))
    kl = (mean - mean_ref.detach()) ** 2 / (2 * safe**2)
    kl = torch.where(std > 0, kl, torch.zeros_like(kl))
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def _noise(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=like.device, dtype=torch.float32)


def _step_noise(like: torch.Tensor, generator: torch.Generator | None, block: int) -> torch.Tensor:
    """N(0, I) shaped like `like`; with `block` f > 1 drawn at (…, h/f, w/f) and nearest-upsampled by f."""
    if block == 1:
        return _noise(like.shape, like, generator)
    small = (*like.shape[:-2], like.shape[-2] // block, like.shape[-1] // block)
    return block_upsample(_noise(small, like, generator), block)


# ---------------------------------------------------------------------------------------------------
# DDIM (ε / v prediction)
# ---------------------------------------------------------------------------------------------------


def ddim_step_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float | torch.Tensor = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_block: int = 1,
) -> StepLogProb:
    """One DDIM step with η > 0 and the log-prob of its result; timesteps may differ per sample.

    Args:
        scheduler: a diffusers `DDIMScheduler` after `set_timesteps` (its ᾱ table, spacing, prediction
            type and sample clipping are used; the previous timestep is t − T // N as in diffusers).
        model_output: the (guided) UNet prediction, ε, v or x₀ per ``prediction_type``.
        timestep: (B,) or scalar integer timesteps t.
        sample: x_t.
        eta: DDIM's η, scalar or (B,); 0 makes the step deterministic (log-prob 0).
        prev_sample: the recorded x_{t−1} to score instead of drawing one.
        generator: RNG for the step noise (ignored with `prev_sample`).
        noise_block: f; > 1 draws block-constant step noise (f x f blocks) and scores the block means
            (see the module docstring; 1 is the ordinary step).

    Raises:
        ValueError: no `set_timesteps` yet, an unsupported prediction type, thresholding, or a block size
            that does not divide the latent height and width.
    """
    check_noise_block(noise_block, sample.shape)
    cfg = scheduler.config
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no timesteps; call scheduler.set_timesteps(num_steps) first.")
    if cfg.get("thresholding", False):
        raise ValueError("dynamic thresholding makes the DDIM step non-Gaussian in the model output; disable it.")
    x = sample.float()
    out = model_output.float()
    t = torch.as_tensor(timestep, device=x.device).long().reshape(-1).expand(x.shape[0])
    prev_t = t - cfg.num_train_timesteps // scheduler.num_inference_steps
    ac = scheduler.alphas_cumprod.to(device=x.device, dtype=torch.float32)
    final = torch.as_tensor(float(scheduler.final_alpha_cumprod), device=x.device)
    a_t = _per_sample(ac[t], x)
    a_prev = _per_sample(torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], final), x)
    b_t = 1 - a_t
    kind = cfg.prediction_type
    if kind == "epsilon":
        x0, eps = (x - b_t.sqrt() * out) / a_t.sqrt(), out
    elif kind == "v_prediction":
        x0, eps = a_t.sqrt() * x - b_t.sqrt() * out, a_t.sqrt() * out + b_t.sqrt() * x
    elif kind == "sample":
        x0, eps = out, (x - a_t.sqrt() * out) / b_t.sqrt()
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}; use epsilon, v_prediction or sample.")
    if cfg.get("clip_sample", False):
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = _per_sample(eta, x) * variance.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        prev_sample = mean + std * _step_noise(x, generator, noise_block)
    prev_sample = prev_sample.float()
    return StepLogProb(prev_sample, gaussian_log_prob(prev_sample, mean, std, noise_block), mean, std)


# ---------------------------------------------------------------------------------------------------
# Flow matching (velocity prediction): SDE and CPS
# ---------------------------------------------------------------------------------------------------


def flow_step_logprob(
    model_output: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    sample: torch.Tensor,
    noise_level: float | torch.Tensor = 0.7,
    kind: str = "sde",
    sigma_max: float | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_block: int = 1,
) -> StepLogProb:
    """One stochastic step of a rectified-flow sampler (velocity v = ε − x₀) and its log-prob.

    Args:
        model_output: the (guided) velocity prediction at `sample`.
        sigma, sigma_next: current and next noise levels (scalars or (B,)), sigma_next < sigma.
        sample: x_σ.
        noise_level: Flow-GRPO's `a` (``sde``) or CPS's η (``cps``); 0 gives the Euler ODE step.
        kind: ``sde`` (Flow-GRPO), ``cps`` (coefficients-preserving) or ``ode`` (deterministic Euler).
        sigma_max: the schedule's largest sigma below 1 (its second entry), used in g's denominator
            where σ = 1; required for ``sde`` when a sigma equals 1.
        prev_sample: the recorded next sample to score instead of drawing one.
        generator: RNG for the step noise.
        noise_block: f; > 1 draws block-constant step noise (f x f blocks) and scores the block means
            (see the module docstring; 1 is the ordinary step).

    Raises:
        ValueError: an unknown kind, σ = 1 with ``sde`` and no `sigma_max`, or a block size that does not
            divide the latent height and width.
    """
    if kind not in FLOW_KINDS:
        raise ValueError(f"unknown flow step kind {kind!r}; use one of {FLOW_KINDS}.")
    check_noise_block(noise_block, sample.shape)
    x = sample.float()
    v = model_output.float()
    s = _per_sample(sigma, x)
    s_next = _per_sample(sigma_next, x)
    a = _per_sample(noise_level, x)
    dt = s_next - s
    if kind == "ode":
        mean, std = x + v * dt, torch.zeros_like(s)
    elif kind == "sde":
        at_one = s >= 1
        if bool(at_one.any()) and sigma_max is None:
            raise ValueError("sigma = 1 needs sigma_max (the schedule's second sigma) for the SDE's noise scale.")
        denom = torch.where(at_one, torch.full_like(s, float(sigma_max or 0.0)), s)
        g = a * (s / (1 - denom)).sqrt()
        mean = x + (v + g**2 / (2 * s) * (x + (1 - s) * v)) * dt
        std = g * (-dt).clamp(min=0).sqrt()
    else:  # cps
        std = s_next * torch.sin(a * math.pi / 2)
        x0 = x - s * v
        x1 = x + (1 - s) * v
        mean = (1 - s_next) * x0 + (s_next**2 - std**2).clamp(min=0).sqrt() * x1
    if prev_sample is None:
        prev_sample = mean + std * _step_noise(x, generator, noise_block)
    prev_sample = prev_sample.float()
    return StepLogProb(prev_sample, gaussian_log_prob(prev_sample, mean, std, noise_block), mean, std)


# ---------------------------------------------------------------------------------------------------
# Samplers: a schedule plus the step rule
# ---------------------------------------------------------------------------------------------------


class DDIMLogProbSampler:
    """DDIM with η > 0 over a pipeline's scheduler config (SD 1.x/2.x, SDXL; ε or v prediction).

    Args:
        adapter: the pipeline adapter.
        num_steps: sampling steps N.
        eta: η of every stochastic step.
        noise_block: f of the block exploration noise (1: per-element noise; see the module docstring).

    Example:
        >>> sampler = DDIMLogProbSampler(PipelineAdapter(pipe), num_steps=50, eta=1.0)
    """

    def __init__(self, adapter: PipelineAdapter, num_steps: int, eta: float = 1.0, noise_block: int = 1) -> None:
        from .sampling import make_scheduler

        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int; got {num_steps!r}.")
        if not eta > 0:
            raise ValueError(f"eta must be > 0 for a stochastic policy (DDPO uses 1.0); got {eta}.")
        self.scheduler = make_scheduler(adapter, "ddim")
        self.scheduler.set_timesteps(num_steps, device=adapter.device)
        self.num_steps = num_steps
        self.noise = float(eta)
        self.noise_block = check_noise_block(noise_block)
        self.init_noise_sigma = float(self.scheduler.init_noise_sigma)

    def model_time(self, step: torch.Tensor) -> torch.Tensor:
        """The model's timestep input for step indices (B,)."""
        return self.scheduler.timesteps.to(step.device)[step]

    def step(self, pred, step, x, noise, prev_sample=None, generator=None) -> StepLogProb:
        return ddim_step_logprob(self.scheduler, pred, self.model_time(step), x, noise, prev_sample, generator,
                                 self.noise_block)


class FlowLogProbSampler:
    """Flow-GRPO's SDE (or CPS) over a sigma schedule 1 ≥ σ_0 > ... > σ_N = 0.

    Args:
        sigmas: (N + 1,) the schedule, ending at 0 (e.g. a `FlowMatchEulerDiscreteScheduler`'s
            `sigmas` after `set_timesteps`, shift included).
        noise_level: `a` for ``sde``, η for ``cps``.
        kind: ``sde`` or ``cps``.
        time_scale: model time = σ · time_scale (1000 for diffusers' SD3 / FLUX transformers).
        timesteps: (N,) the scheduler's own model times, used instead of σ · time_scale when given.
        noise_block: f of the block exploration noise (1: per-element noise; see the module docstring).

    Example:
        >>> sched.set_timesteps(10); sampler = FlowLogProbSampler(sched.sigmas, noise_level=0.7)
    """

    def __init__(
        self, sigmas: torch.Tensor, noise_level: float = 0.7, kind: str = "sde", time_scale: float = 1000.0,
        timesteps: torch.Tensor | None = None, noise_block: int = 1,
    ) -> None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
        if sigmas.numel() < 2 or not bool((sigmas[1:] < sigmas[:-1]).all()) or float(sigmas[0]) > 1 or float(sigmas[-1]) < 0:
            raise ValueError(f"sigmas must decrease strictly inside [0, 1] with at least 2 entries; got {sigmas.tolist()}.")
        if kind not in ("sde", "cps"):
            raise ValueError(f"flow sampler kind must be 'sde' or 'cps'; got {kind!r}.")
        if not noise_level > 0:
            raise ValueError(f"noise_level must be > 0 for a stochastic policy (Flow-GRPO uses 0.7); got {noise_level}.")
        if kind == "cps" and noise_level > 1:
            raise ValueError(f"CPS noise_level is η in (0, 1] (std = σ' sin(η π/2)); got {noise_level}.")
        self.sigmas = sigmas
        self.num_steps = sigmas.numel() - 1
        self.noise = float(noise_level)
        self.kind = kind
        self.noise_block = check_noise_block(noise_block)
        self.time_scale = float(time_scale)
        self.sigma_max = float(sigmas[1]) if sigmas.numel() > 2 else float(sigmas[0])
        self.init_noise_sigma = 1.0
        self.timesteps = None if timesteps is None else torch.as_tensor(timesteps, dtype=torch.float32).flatten()
        if self.timesteps is not None and self.timesteps.numel() != self.num_steps:
            raise ValueError(f"timesteps must have one entry per step ({self.num_steps}); got {self.timesteps.numel()}.")

    def model_time(self, step: torch.Tensor) -> torch.Tensor:
        if self.timesteps is not None:
            return self.timesteps.to(step.device)[step]
        return self.sigmas.to(step.device)[step] * self.time_scale

    def step(self, pred, step, x, noise, prev_sample=None, generator=None) -> StepLogProb:
        sig = self.sigmas.to(x.device)
        return flow_step_logprob(pred, sig[step], sig[step + 1], x, noise, self.kind, self.sigma_max, prev_sample, generator,
                                 self.noise_block)


Sampler = DDIMLogProbSampler | FlowLogProbSampler


@dataclass
class Trajectory:
    """A recorded chain.

    Attributes:
        latents: (B, N + 1, ...) x_0 (the starting noise) ... x_N (the sample), fp32.
        log_probs: (B, N) the log-prob of each transition when it was drawn (0 for deterministic steps).
        stochastic: (N,) bool, the steps drawn with noise (the only ones a policy gradient can train).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    stochastic: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


def rollout(
    sampler: Sampler,
    predict: Predict,
    latents: torch.Tensor,
    generator: torch.Generator | None = None,
    stochastic: torch.Tensor | None = None,
) -> Trajectory:
    """Run the chain from unit-variance noise `latents`, recording every x_i and log-prob.

    Args:
        sampler: the step rule and schedule.
        predict: `predict(x, step (B,), model_time (B,))` -> the (guided) model output.
        latents: (B, ...) starting noise, scaled by the sampler's init sigma here.
        generator: RNG of the step noise.
        stochastic: (N,) bool; False steps run deterministically (DDIM η = 0 / the Euler ODE),
            as MixGRPO does outside its training window. Default: every step is stochastic.
    """
    n = sampler.num_steps
    stochastic = torch.ones(n, dtype=torch.bool) if stochastic is None else torch.as_tensor(stochastic, dtype=torch.bool).cpu()
    if stochastic.shape != (n,):
        raise ValueError(f"stochastic must have one entry per step ({n}); got shape {tuple(stochastic.shape)}.")
    x = latents.float() * sampler.init_noise_sigma
    b = x.shape[0]
    xs, lps = [x], []
    for i in range(n):
        step = torch.full((b,), i, dtype=torch.long, device=x.device)
        with torch.no_grad():
            pred = predict(x, step, sampler.model_time(step))
            out = sampler.step(pred, step, x, sampler.noise if bool(stochastic[i]) else 0.0, generator=generator)
        x = out.prev_sample
        xs.append(x)
        lps.append(out.log_prob)
    return Trajectory(torch.stack(xs, 1), torch.stack(lps, 1), stochastic)


def transition(
    sampler: Sampler, predict: Predict, x: torch.Tensor, next_x: torch.Tensor, step: torch.Tensor
) -> StepLogProb:
    """Log-prob of recorded transitions x -> next_x at step indices `step` (B,) under `predict`'s model.

    Gradients flow into the model through the transition mean (run it with grad enabled to train).
    """
    step = step.to(x.device).long()
    pred = predict(x.float(), step, sampler.model_time(step))
    return sampler.step(pred, step, x.float(), sampler.noise, prev_sample=next_x)


def denoiser_predictor(
    adapter: PipelineAdapter,
    model: torch.nn.Module,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None,
    guidance_scale: float,
    autocast=None,
) -> Predict:
    """`predict` for any family's denoiser: classifier-free guidance with [uncond, cond] in one call.

    Args:
        adapter: the pipeline adapter (its `predict` calls the UNet or transformer).
        model: the denoiser to call (e.g. the LoRA-wrapped one, possibly with its adapter disabled).
        cond, uncond: embeddings with one row per latent; `uncond` None or guidance <= 1 disables CFG
            (guidance-distilled families get their guidance value through `adapter.with_guidance`).
        guidance_scale: the CFG weight.
        autocast: a context-manager factory (accelerate's `autocast`) for mixed precision, or None.
    """
    import contextlib

    guided = uncond.cat(cond) if (uncond is not None and guidance_scale > 1) else None
    dtype = next(model.parameters()).dtype

    def predict(x: torch.Tensor, step: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ctx = autocast() if autocast is not None else contextlib.nullcontext()
        with ctx:
            if guided is None:
                return adapter.predict(x.to(dtype), t, cond, model=model).float()
            raw = adapter.predict(torch.cat([x, x]).to(dtype), torch.cat([t, t]), guided, model=model).float()
        uncond_pred, text_pred = raw.chunk(2)
        return uncond_pred + guidance_scale * (text_pred - uncond_pred)

    return predict


def make_sampler(
    adapter: PipelineAdapter, num_steps: int, noise: float, kind: str = "sde", resolution: int | None = None,
    noise_block: int = 1,
) -> Sampler:
    """The log-prob sampler of `adapter`'s family: DDIM (η = `noise`) for ε/v families, the flow SDE
    (`kind` ``sde`` or ``cps``, noise level `noise`) over the pipeline's own sigma schedule for flow ones;
    `noise_block` f > 1 makes every stochastic step's noise block-constant (see the module docstring).

    Example:
        >>> sampler = make_sampler(PipelineAdapter(pipe), num_steps=10, noise=0.7)   # SD3: Flow-GRPO's SDE
    """
    if not getattr(adapter, "is_flow", False):
        return DDIMLogProbSampler(adapter, num_steps, eta=noise, noise_block=noise_block)
    sched = type(adapter.scheduler).from_config(adapter.scheduler.config)
    adapter.set_timesteps(sched, num_steps, resolution)
    sigmas = sched.sigmas.float().cpu()
    return FlowLogProbSampler(sigmas, noise_level=noise, kind=kind, timesteps=sched.timesteps.float().cpu(),
                              noise_block=noise_block)
