"""Pure loss functions for alignment, tested on hand-made tensors.

Section 1: Diffusion-DPO (owned by trainers/dpo.py). Section 2: reward fine-tuning (RWR weights and
reward-gradient losses, owned by trainers/reward_finetune.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# 1. Diffusion-DPO
# ---------------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖target − pred‖² averaged over every dim but the batch, in float32: (B, ...) -> (B,).

    Example:
        >>> per_sample_mse(torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8))
        tensor([1., 1.])
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape; got {tuple(pred.shape)} and {tuple(target.shape)}.")
    # float32 because the DPO logits multiply differences of these by beta ~ 5000: bf16 rounding would dominate.
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def guided_denoising_error(mse_cond: torch.Tensor, mse_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The denoising-error proxy of the classifier-free-guided sampler's log-density: ``w·mse_c − (w − 1)·mse_u``.

    A CFG sampler at scale w follows the score ``w·∇log p(x|c) − (w − 1)·∇log p(x)``, the score of the
    product ``p(x|c)^w · p(x)^(1−w)``. Diffusion-DPO stands in ``−mse`` (times a constant) for each
    log-likelihood, so the same product's log-ratio against the reference is ``−(w·Δmse_c − (w − 1)·Δmse_u)``:
    passing this for the model and for the reference to `diffusion_dpo_loss` makes the implicit reward the
    one of the sampler that drew the pairs and is evaluated. A change shared by both branches counts once
    (as the sampler sees it, where ``w − (w − 1) = 1``); a change of the caption's effect ``ε_c − ε_u`` counts
    w times. ``w = 1`` is the conditional error itself (the paper's loss).

    Args:
        mse_cond: (B,) per-sample error of the prediction with the caption.
        mse_uncond: (B,) the same latents, noise and timesteps with the empty caption.
        guidance_scale: w >= 1, the scale the model is sampled with.

    Example:
        >>> guided_denoising_error(torch.tensor([0.2]), torch.tensor([0.3]), 7.0)   # 7·0.2 − 6·0.3
        tensor([-0.4000])
    """
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 1:
        raise ValueError(f"guidance_scale must be a number >= 1 (the CFG scale the model is sampled with); got {guidance_scale!r}.")
    if mse_cond.shape != mse_uncond.shape or mse_cond.ndim != 1:
        raise ValueError(f"mse_cond and mse_uncond must be (B,) tensors of one shape; got {tuple(mse_cond.shape)} "
                         f"and {tuple(mse_uncond.shape)}.")
    return guidance_scale * mse_cond.float() - (guidance_scale - 1.0) * mse_uncond.float()


def diffusion_dpo_loss(
    model_w: torch.Tensor,
    model_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Diffusion-DPO loss (Wallace et al. 2024) from per-sample denoising errors.

    With ``logits = −(β/2)·((mse_w − mse_l) − (ref_w − ref_l))`` (the implicit reward margin of the
    winner over the loser), the per-pair loss is ``−log σ(logits)`` ("sigmoid") or ``relu(1 − logits)``
    ("hinge"), averaged over the batch.

    "ipo" is IPO (Azar et al. 2023), ``(h − 1/(2β))²``, on the *unscaled* log-ratio difference
    ``h = logits / β = −½·((mse_w − mse_l) − (ref_w − ref_l))``, not on the β-scaled logits: its optimum
    is ``logits = ½`` whatever β, so pairs the model prefers by less than that keep being pushed apart.
    (IPO's target applied to the already scaled logits would put the optimum at logits = 1/(2β), 1e-4 at
    β = 5000, and push the winner's error up from there on: it cannot learn.) The loss is returned
    multiplied by β², ``β²·(h − 1/(2β))² = (logits − ½)²``: the same minimiser and Adam direction, but
    gradients on the scale of the sigmoid loss's. Unscaled, its gradients are β²/(β/2) times smaller
    (at β = 5000 the toy-world LoRA gradient norm was ~1e-5, ~4e-8 per parameter): Adam's ε = 1e-8 then
    shrinks the updates, and a fixed `max_grad_norm` or loss weighting means something else for IPO.

    Args:
        model_w: (B,) MSE of the trained model's prediction on the winner's noisy latent.
        model_l: (B,) the same on the loser (same noise and timestep as the winner).
        ref_w: (B,) MSE of the frozen reference model on the winner (no gradient needed).
        ref_l: (B,) the reference on the loser.
        beta: the KL-regularisation strength β (> 0; the paper uses 2000–5000).
        loss_type: ``"sigmoid"``, ``"hinge"`` or ``"ipo"``.

    Returns:
        ``(loss, metrics)``: the scalar loss and detached scalars ``implicit_acc`` (fraction of pairs
        with logits > 0, ties counted as half), ``reward_margin`` (mean logits), ``reward_w`` and
        ``reward_l`` (mean implicit rewards −(β/2)(mse − ref) of winners and losers), ``model_mse`` and
        ``ref_mse`` (mean denoising errors over both images: a rising ``model_mse`` flags the loss-spike
        failure mode).

    Example:
        >>> loss, m = diffusion_dpo_loss(torch.tensor([0.1]), torch.tensor([0.2]),
        ...                              torch.tensor([0.15]), torch.tensor([0.15]), beta=10.0)
        >>> float(m["reward_margin"])   # −5·((0.1 − 0.2) − 0) = 0.5
        0.5
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}; got {loss_type!r}.")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
        raise ValueError(f"beta must be a positive number (the paper uses 2000-5000); got {beta!r}.")
    tensors = {"model_w": model_w, "model_l": model_l, "ref_w": ref_w, "ref_l": ref_l}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of per-sample MSEs, shape (B,); got {type(t).__name__}.")
        if t.ndim != 1:
            raise ValueError(
                f"{name} must be 1-D, one MSE per pair (B,); got shape {tuple(t.shape)}. "
                "Reduce the squared error over C, H, W first (per_sample_mse)."
            )
    if len({t.shape[0] for t in tensors.values()}) != 1:
        raise ValueError(f"model_w, model_l, ref_w, ref_l must have the same length; got { {k: t.shape[0] for k, t in tensors.items()} }.")
    model_w, model_l = model_w.float(), model_l.float()
    # The reference never receives gradient, whatever the caller passes.
    ref_w, ref_l = ref_w.detach().float(), ref_l.detach().float()

    logits = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(logits)
    elif loss_type == "hinge":
        losses = F.relu(1.0 - logits)
    else:
        # IPO's target belongs to the unscaled log-ratio difference h = logits / β; the β² factor
        # keeps its gradients clear of Adam's ε (see the docstring): β²·(h − 1/(2β))² = (logits − ½)².
        losses = (logits - 0.5) ** 2
    loss = losses.mean()

    with torch.no_grad():
        metrics = {
            "implicit_acc": (logits > 0).float().mean() + 0.5 * (logits == 0).float().mean(),
            "reward_margin": logits.mean(),
            "reward_w": (-0.5 * beta * (model_w - ref_w)).mean(),
            "reward_l": (-0.5 * beta * (model_l - ref_l)).mean(),
            "model_mse": 0.5 * (model_w + model_l).mean(),
            "ref_mse": 0.5 * (ref_w + ref_l).mean(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------
# 2. Reward fine-tuning
# ---------------------------------------------------------------------------------------------------

RWR_WEIGHTINGS = ("softmax", "exp", "raw", "topk")


def rwr_weights(
    rewards: torch.Tensor, temperature: float = 1.0, mode: str = "softmax", clip: float | None = 10.0,
    top_fraction: float = 0.25,
) -> torch.Tensor:
    """Per-sample weights for reward-weighted denoising losses, detached.

    ``raw``: the reward itself, ``max(r, 0)``, not normalised: Lee et al. 2023's reward-weighted likelihood
    (their rewards are probabilities in [0, 1]; negative rewards weigh nothing). ``softmax``:
    ``B · softmax(r / τ)`` over the batch, the exponentiated-reward weighting of reward-weighted regression
    (Peters & Schaal 2007) normalised within each batch. ``exp``: ``exp((r − mean(r)) / τ)`` clipped at
    `clip`, then divided by its mean: advantage-weighted regression (Peng et al. 2019) with the batch mean
    as the baseline. Neither batch-normalised form is Lee et al.'s; scaling them to a mean of 1 keeps the
    loss on the scale of the ordinary denoising loss, so learning rates carry over from plain fine-tuning.
    ``topk``: reward-ranked filtering, weight ``1 / top_fraction`` on the ``ceil(top_fraction · B)`` best
    samples of the batch and 0 on the rest (mean 1; ties broken by position), the hard-threshold limit of
    the exponential weights.

    Args:
        rewards: (B,) rewards, higher is better.
        temperature: τ > 0; smaller concentrates the weight on the best samples.
        mode: ``"raw"``, ``"softmax"``, ``"exp"`` or ``"topk"``.
        clip: upper bound on the unnormalised exponential weight (``exp`` mode; None: no clipping).
        top_fraction: ``topk`` mode, the fraction of the batch kept, in (0, 1].

    Example:
        >>> rwr_weights(torch.tensor([0.0, 1.0]), temperature=1.0)
        tensor([0.5379, 1.4621])
    """
    if mode not in RWR_WEIGHTINGS:
        raise ValueError(f"mode must be one of {RWR_WEIGHTINGS}; got {mode!r}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}.")
    if rewards.ndim != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty (B,) tensor; got shape {tuple(rewards.shape)}.")
    r = rewards.detach().float()
    if mode == "raw":
        return r.clamp(min=0)
    if mode == "topk":
        if not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1]; got {top_fraction}.")
        k = max(1, math.ceil(top_fraction * r.numel()))
        w = torch.zeros_like(r)
        w[torch.topk(r, k, sorted=False).indices] = r.numel() / k
        return w
    if mode == "softmax":
        return torch.softmax(r / temperature, dim=0) * r.numel()
    w = torch.exp((r - r.mean()) / temperature)
    if clip is not None:
        if not clip > 0:
            raise ValueError(f"clip must be > 0 or None; got {clip}.")
        w = w.clamp(max=clip)
    return w / w.mean()


def rwr_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    prior_pred: torch.Tensor | None = None,
    prior_target: torch.Tensor | None = None,
    prior_weight: float = 0.0,
) -> torch.Tensor:
    """Reward-weighted denoising loss: ``mean_i(w_i · ‖pred_i − target_i‖²) + λ · mean_j ‖prior_j‖²``.

    The squared error is averaged over (C, H, W) per sample; the prior term is the unweighted
    denoising loss on prior samples (the regulariser of Lee et al.), skipped when `prior_weight` is 0.

    Args:
        pred: (B, C, H, W) UNet predictions.
        target: (B, C, H, W) the noise (epsilon) or velocity targets.
        weights: (B,) per-sample weights (see `rwr_weights`); treated as constants.
        prior_pred, prior_target: predictions and targets on prior data.
        prior_weight: λ ≥ 0.

    Example:
        >>> loss = rwr_loss(eps_pred, noise, rwr_weights(rewards, 0.5))
    """
    mse = per_sample_mse(pred, target)
    if weights.shape != (pred.shape[0],):
        raise ValueError(f"weights must have shape ({pred.shape[0]},), one per sample; got {tuple(weights.shape)}.")
    loss = (weights.detach().float() * mse).mean()
    if prior_weight:
        if prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0; got {prior_weight}.")
        if prior_pred is None or prior_target is None:
            raise ValueError("prior_weight > 0 needs prior_pred and prior_target (the denoising loss on prior data).")
        loss = loss + prior_weight * F.mse_loss(prior_pred.float(), prior_target.float())
    return loss


def draft_loss(rewards: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DRaFT / AlignProp objective: ``−scale · mean(r)`` (gradients flow through the rewards).

    Example:
        >>> draft_loss(reward(images, prompts).scores).backward()
    """
    return -scale * rewards.float().mean()


def refl_loss(rewards: torch.Tensor, target: float = 2.0, scale: float = 1e-3) -> torch.Tensor:
    """ReFL (ImageReward): ``relu(target − r).mean() · scale``; samples already above `target` give no gradient.

    Example:
        >>> refl_loss(torch.tensor([1.0, 3.0]), target=2.0, scale=1.0)
        tensor(0.5000)
    """
    return F.relu(target - rewards.float()).mean() * scale


def anchor_l2(pred: torch.Tensor, base_pred: torch.Tensor) -> torch.Tensor:
    """L2 anchor to the base model: ``mean ‖ε_θ − ε_base‖²`` over the steps that keep gradients. It is not a
    KL: a deterministic sampler (DDIM η = 0) has no transition density to compare, and for a stochastic one
    the per-step Gaussian KL would weigh each step's distance by that step's own variance. `base_pred` is
    treated as a constant.

    Example:
        >>> anchor_l2(torch.ones(1, 4), torch.zeros(1, 4))
        tensor(1.)
    """
    return (pred.float() - base_pred.detach().float()).pow(2).mean()
