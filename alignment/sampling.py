"""A denoising loop with gradients, for reward-gradient fine-tuning (DRaFT, AlignProp, ReFL).

The loop runs the pipeline's own UNet, VAE and a diffusers scheduler (DDIM, DDPM, Euler, Euler
ancestral), but keeps the autograd graph only where the method needs it:

- `grad_steps=K` keeps the graph for the last K steps (DRaFT-K; AlignProp draws K at random; K = 0 is
  plain sampling). The steps before run under `no_grad`, so memory is bounded by K, not by the number
  of sampling steps.
- `stop_at=i` runs steps 0..i only and returns the model's predicted clean latent x̂₀ at step i (ReFL).
- `renoise_final_step` re-noises a finished sample n times and redoes the last step with gradients
  (DRaFT-LV).

Each UNet call with gradients is wrapped in `torch.utils.checkpoint` (its activations are recomputed
in the backward pass, so a step costs its inputs, not its activations), and `decode` checkpoints the
VAE decoder the same way. Images leave `decode` as tensors in [0, 1], ready for any `RewardModel`.

Example:
    >>> ad = PipelineAdapter(pipe)
    >>> cond = ad.encode_prompts(["a cat"] * 2)
    >>> out = denoise(ad, cond, negative_embeds(ad, cond), num_steps=50, grad_steps=1)
    >>> images = decode(ad, out.latents)          # (2, 3, 512, 512) in [0, 1], differentiable
    >>> (-reward(images, ["a cat"] * 2).scores.mean()).backward()
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .losses import anchor_l2
from .pipelines import PipelineAdapter, PromptEmbeds, scheduler_from_config

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}

# A callable giving the frozen base model's prediction for the same UNet input (KL/L2 anchor).
Reference = Callable[[torch.Tensor, torch.Tensor, PromptEmbeds], torch.Tensor]


@dataclass
class DenoiseOutput:
    """What `denoise` returns.

    Attributes:
        latents: (B, C, h, w) final latents, or the predicted x̂₀ at `stop_at`; carries the autograd
            graph of the last `grad_steps` steps.
        anchor: mean squared difference between the UNet's and the reference's predictions over the
            steps run with gradients (a differentiable scalar), or None without a reference.
        grad_unet_calls: how many UNet calls kept their graph (K, or 1 for ReFL).
        timesteps: the scheduler's timesteps for this run.
    """

    latents: torch.Tensor
    anchor: torch.Tensor | None
    grad_unet_calls: int
    timesteps: torch.Tensor


def make_scheduler(adapter: PipelineAdapter, kind=None):
    """A fresh scheduler built from a config (never the pipeline's own object, whose step counters and
    timesteps other code may rely on).

    Args:
        adapter: the pipeline adapter.
        kind: None (the pipeline's scheduler class; DDIM with a warning if the loop does not support it),
            one of ``ddim``, ``ddpm``, ``euler``, ``euler_ancestral``, or a scheduler instance of those classes.

    Raises:
        ValueError: an unknown name or an unsupported scheduler instance.

    Example:
        >>> sched = make_scheduler(PipelineAdapter(pipe), "euler")
    """
    import diffusers

    allowed = {k: v for k, v in SCHEDULERS.items() if v in adapter.sampling_schedulers}
    if kind is not None and not isinstance(kind, str):
        if type(kind).__name__ not in allowed.values():
            raise ValueError(
                f"scheduler {type(kind).__name__} is not supported by the gradient sampling loop for "
                f"{adapter.family} pipelines; pass one of {sorted(allowed)} (by name or instance)."
            )
        return scheduler_from_config(type(kind), kind.config)
    base = adapter.scheduler
    if kind is None:
        if type(base).__name__ in allowed.values():
            return scheduler_from_config(type(base), base.config)
        fallback = "ddim" if "ddim" in allowed else sorted(allowed)[0]
        # PNDM (SD 1.5's default), DPM-Solver, LMS ...: multistep or without `pred_original_sample`, which
        # the truncated loop and ReFL's x0 need. DDIM is the usual choice for reward-gradient methods.
        warnings.warn(
            f"the pipeline's scheduler {type(base).__name__} is not supported by the gradient sampling loop; "
            f"using {SCHEDULERS[fallback]} with its config (set sampling.scheduler to one of {sorted(allowed)} to choose).",
            stacklevel=2,
        )
        return scheduler_from_config(getattr(diffusers, SCHEDULERS[fallback]), base.config)
    if kind not in allowed:
        what = "is not supported by the gradient sampling loop" if kind in SCHEDULERS else "is unknown"
        raise ValueError(
            f"scheduler {kind!r} {what} for {adapter.family} pipelines; use one of {sorted(allowed)} "
            "or None for the pipeline's own."
        )
    return scheduler_from_config(getattr(diffusers, SCHEDULERS[kind]), base.config)


def negative_embeds(adapter: PipelineAdapter, cond: PromptEmbeds) -> PromptEmbeds | None:
    """Unconditional embeddings for classifier-free guidance, as the pipeline itself builds them: the
    empty prompt, zeros for SDXL pipelines with ``force_zeros_for_empty_prompt``, None for
    guidance-distilled families (FLUX), whose guidance goes into an embedding instead."""
    return adapter.negative_embeds(cond)


def initial_latents(
    adapter: PipelineAdapter, batch: int, scheduler, resolution: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gaussian starting latents (B, C, res/s, res/s), s the VAE downsampling factor, scaled by the scheduler's `init_noise_sigma`."""
    from diffusers.utils.torch_utils import randn_tensor

    res = resolution or adapter.default_resolution
    if res % adapter.resolution_multiple:
        raise ValueError(
            f"resolution must be a multiple of {adapter.resolution_multiple} for {adapter.family} pipelines "
            f"(VAE downsampling x denoiser patching); got {res}."
        )
    side = res // adapter.vae_scale
    shape = (batch, adapter.latent_channels, side, side)
    x = randn_tensor(shape, generator=generator, device=adapter.device, dtype=torch.float32)
    return x * getattr(scheduler, "init_noise_sigma", 1.0)


def _step_kwargs(scheduler, eta: float, generator) -> dict:
    params = inspect.signature(scheduler.step).parameters
    kw = {}
    if "eta" in params:
        kw["eta"] = eta
    if "generator" in params:
        kw["generator"] = generator
    return kw


def _unet_forward(adapter: PipelineAdapter, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds, unet) -> torch.Tensor:
    model = unet if unet is not None else adapter.unet_model
    dtype = next(model.parameters()).dtype
    # The scheduler works in fp32; the UNet gets its own dtype (autocast handles mixed precision).
    return adapter.unet(x.to(dtype), t, cond, unet=model).float()


def _predict(
    adapter: PipelineAdapter, scheduler, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds,
    guided: PromptEmbeds | None, guidance_scale: float, unet, use_checkpoint: bool,
    reference: Reference | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (guided) UNet prediction; with gradients, checkpointed. Returns (prediction, anchor term)."""
    x_in = torch.cat([x, x]) if guided is not None else x
    if hasattr(scheduler, "scale_model_input"):  # flow-matching schedulers take x_t as it is
        x_in = scheduler.scale_model_input(x_in, t)
    emb = guided if guided is not None else cond
    if use_checkpoint and torch.is_grad_enabled():
        # Non-reentrant checkpointing: only the inputs are kept; activations are recomputed in backward.
        raw = _checkpoint(_unet_forward, adapter, x_in, t, emb, unet, use_reentrant=False)
    else:
        raw = _unet_forward(adapter, x_in, t, emb, unet)
    anchor = None
    if reference is not None and torch.is_grad_enabled():
        with torch.no_grad():
            ref = reference(x_in, t, emb).float()
        anchor = anchor_l2(raw, ref)
    if guided is not None:
        uncond, text = raw.chunk(2)
        raw = uncond + guidance_scale * (text - uncond)
    return raw, anchor


def denoise(
    adapter: PipelineAdapter,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None = None,
    *,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    grad_steps: int = 0,
    stop_at: int | None = None,
    latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    scheduler=None,
    eta: float = 0.0,
    resolution: int | None = None,
    use_checkpoint: bool = True,
    reference: Reference | None = None,
    unet=None,
) -> DenoiseOutput:
    """Run the denoising loop, keeping the autograd graph only for the last `grad_steps` steps.

    Args:
        adapter: the pipeline adapter (SD or SDXL).
        cond: prompt embeddings, one row per image.
        uncond: unconditional embeddings for classifier-free guidance (see `negative_embeds`); None
            or ``guidance_scale <= 1`` samples without guidance.
        num_steps: sampling steps.
        guidance_scale: classifier-free guidance weight.
        grad_steps: keep the graph for the last this-many steps that are run (0: no gradients).
        stop_at: run steps 0..stop_at only and return the predicted x̂₀ at that step (ReFL).
        latents: starting unit-variance noise (default: drawn from `generator`); scaled by the
            scheduler's `init_noise_sigma` here, as the diffusers pipelines do with `latents=`.
        generator: RNG for the starting noise and stochastic schedulers (DDPM, DDIM with eta > 0, Euler a).
        scheduler: a scheduler kind (``ddim``, ``ddpm``, ``euler``, ``euler_ancestral``), a scheduler
            object (copied), or None for the pipeline's own class.
        eta: DDIM's eta (ignored by other schedulers).
        resolution: image side in pixels (default: the UNet's native size).
        use_checkpoint: gradient-checkpoint each UNet call that keeps its graph.
        reference: the frozen base model's prediction for the same input; adds the anchor term.
        unet: the module to call (e.g. the LoRA-wrapped UNet); default the pipeline's UNet.

    Returns:
        DenoiseOutput with the final latents (or x̂₀ at `stop_at`) and the anchor term.

    Example:
        >>> out = denoise(ad, cond, negative_embeds(ad, cond), num_steps=40, stop_at=35)  # ReFL's x̂₀
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int; got {num_steps!r}.")
    if stop_at is not None and not 0 <= stop_at < num_steps:
        raise ValueError(f"stop_at must be a step index in [0, {num_steps - 1}]; got {stop_at}.")
    run = num_steps if stop_at is None else stop_at + 1
    if not 0 <= grad_steps <= run:
        raise ValueError(f"grad_steps must be in [0, {run}] (the steps that are run); got {grad_steps}.")
    sched = make_scheduler(adapter, scheduler)
    adapter.set_timesteps(sched, num_steps, resolution or (None if latents is None else latents.shape[-1] * adapter.vae_scale))
    timesteps = sched.timesteps
    batch = cond.embeds.shape[0]
    if latents is None:
        x = initial_latents(adapter, batch, sched, resolution, generator)
    else:
        x = latents.float().to(adapter.device) * getattr(sched, "init_noise_sigma", 1.0)
    if not adapter.uses_cfg:  # guidance-distilled (FLUX-dev): the scale goes into the guidance embedding
        cond = adapter.with_guidance(cond, guidance_scale)
    guided = uncond.cat(cond) if (uncond is not None and guidance_scale > 1) else None
    step_kw = _step_kwargs(sched, eta, generator)
    first_grad = run - grad_steps
    anchors: list[torch.Tensor] = []
    x0 = x
    for i in range(run):
        t = timesteps[i]
        with torch.set_grad_enabled(i >= first_grad and torch.is_grad_enabled()):
            if i == first_grad:
                x = x.detach()  # the graph starts here: nothing before step `first_grad` is kept
            pred, anchor = _predict(adapter, sched, x, t, cond, guided, guidance_scale, unet, use_checkpoint, reference)
            if anchor is not None:
                anchors.append(anchor)
            out = sched.step(pred, t, x, **step_kw, return_dict=True)
            if stop_at is not None and i == stop_at:
                # ReFL's one-step estimate: the scheduler's own where it gives one, else the family's
                # formula (flow schedulers return none: x̂₀ = x_t − σ·v)
                x0 = getattr(out, "pred_original_sample", None)
                if x0 is None:
                    x0 = adapter.predicted_x0(x, pred, t, sched)
            x = out.prev_sample.float()
    final = x if stop_at is None else x0.float()
    anchor = torch.stack(anchors).mean() if anchors else None
    return DenoiseOutput(final, anchor, grad_steps, timesteps)


def renoise_final_step(
    adapter: PipelineAdapter,
    latents: torch.Tensor,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None = None,
    *,
    n: int = 2,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    scheduler=None,
    eta: float = 0.0,
    use_checkpoint: bool = True,
    reference: Reference | None = None,
    unet=None,
) -> DenoiseOutput:
    """DRaFT-LV: re-noise finished samples `n` times to the last step's noise level and redo that
    step with gradients. Returns (B·n) latents ordered sample-major (row i·n + j is sample i, draw j).

    Example:
        >>> base = denoise(ad, cond, uncond, num_steps=50).latents
        >>> lv = renoise_final_step(ad, base, cond, uncond, n=2, num_steps=50)
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (re-noised copies per sample) must be a positive int; got {n!r}.")
    from diffusers.utils.torch_utils import randn_tensor

    sched = make_scheduler(adapter, scheduler)
    adapter.set_timesteps(sched, num_steps, latents.shape[-1] * adapter.vae_scale)
    last = len(sched.timesteps) - 1
    if hasattr(sched, "set_begin_index"):
        # Euler-family schedulers index sigmas by step position; start them at the last step.
        sched.set_begin_index(last)
    t = sched.timesteps[last]
    x0 = latents.detach().float().repeat_interleave(n, dim=0)
    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x = adapter.renoise(sched, x0, noise, t)
    if not adapter.uses_cfg:
        cond = adapter.with_guidance(cond, guidance_scale)
    cond_n = cond.repeat(n)
    uncond_n = uncond.repeat(n) if uncond is not None else None
    guided = uncond_n.cat(cond_n) if (uncond_n is not None and guidance_scale > 1) else None
    pred, anchor = _predict(adapter, sched, x, t, cond_n, guided, guidance_scale, unet, use_checkpoint, reference)
    out = sched.step(pred, t, x, **_step_kwargs(sched, eta, generator), return_dict=True)
    return DenoiseOutput(out.prev_sample.float(), anchor, 1, sched.timesteps)


def decode(adapter: PipelineAdapter, latents: torch.Tensor, use_checkpoint: bool = True) -> torch.Tensor:
    """Latents -> images (B, 3, H, W) in [0, 1]; with gradients, the VAE decoder is checkpointed.

    A VAE that supports it (diffusers' AutoencoderKL) is checkpointed block by block, so the backward
    pass holds one up-block's activations at a time (a single whole-decoder checkpoint would hold them
    all during its recompute: 10-20 GB for a 1024 px SDXL image).

    Example:
        >>> images = decode(ad, out.latents)
    """
    if use_checkpoint and torch.is_grad_enabled() and latents.requires_grad:
        vae = adapter.vae
        if getattr(vae, "_supports_gradient_checkpointing", False):
            if not getattr(vae.decoder, "gradient_checkpointing", False):
                vae.enable_gradient_checkpointing()
            return adapter.decode(latents)
        return _checkpoint(adapter.decode, latents, use_reentrant=False)
    return adapter.decode(latents)
