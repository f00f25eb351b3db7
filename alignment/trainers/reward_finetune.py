"""Reward fine-tuning of a diffusers UNet (LoRA via peft, accelerate for precision, accumulation and
several GPUs): reward-weighted regression and reward-gradient methods.

Methods (``method.name``):

- ``rwr``: generate without gradients, score, then the ordinary denoising loss on the samples weighted per
  sample, with an optional unweighted prior term; any reward works, differentiable or not. Weightings
  (``method.rwr_weighting``, see `alignment.losses.rwr_weights`): ``raw`` is Lee et al. 2023's
  reward-weighted likelihood (the reward itself, in [0, 1], as the weight), used with ``rwr_samples: base``
  (samples of the frozen base model, standing in for their offline set generated once by the pretrained
  model) and ``prior_weight`` > 0 (their pre-training term: ``prior_source: data`` fits real, correctly
  captioned images from ``prior_data``; ``base`` stands in with base-model samples); ``softmax``
  (batch-normalised exp(r/τ)) and ``exp`` (clipped exp((r − mean)/τ), advantage-weighted regression,
  Peng et al. 2019) are online variants on the policy's own samples that
  Lee et al. do not use. ``rwr_samples: pool`` is the offline recipe of Lee et al. and RAFT (Dong et al.
  2023): the frozen base model's images of every training prompt drawn and scored once before training
  (``rwr_pool_size`` per prompt), weighted within each prompt's images (``topk``: keep the best
  ``rwr_top_fraction``, reward-ranked filtering), then fitted for ``train.max_steps`` steps.
  ``rwr_reencode`` fits the VAE encoding of the sampled images instead of the sampler's latents: the
  denoiser was trained on encoder latents, and sampled latents are not such (on the toy world fitting
  them loses accuracy even with uniform weights; their re-encoding does not).
- ``draft``: DRaFT-K, backpropagate the reward through the last K sampling steps (K = 1 is often best).
- ``draft-lv``: DRaFT-LV, K = 1 but the finished sample is re-noised n times (n = 2) and the last step
  redone each time; the reward is averaged over the n copies (lower-variance gradient).
- ``alignprop``: random truncation (per-step checkpointing keeps memory flat in K), K drawn once per
  generation call: ``method.truncation: gaussian`` as the current official AlignProp code (cut-off step
  t = int(x), x ~ N(42, 5), redrawn until 1 <= t < N, K = N − t: about 9 ± 5 of 50, never full backprop; the
  AlignProp recipe's default) or ``uniform`` over ``truncation_range``. The first release's per-step
  redraw of the cut-off is not offered (the gradient window here is always the last K steps).
- ``refl``: ReFL, sample without gradients to a random step in [30, 39] of 40, one UNet call with
  gradients, decode its predicted x̂₀, loss ``relu(2 − r) · 1e-3``.

Every gradient method needs a differentiable reward; a reward with ``is_differentiable = False`` is
refused when the trainer is built. The reward may be any `RewardModel` or a `CompositeReward` of
several (``reward.terms: {"lescore:fidelity": 1.0, "lescore:alignment": 0.5}``), normalised per term on a
first batch (``reward.normalize``). An optional held-out evaluation reward is scored beside it, an L2
anchor to the base UNet (adapter disabled) limits drift, and gradients are clipped.

Logged scalars (tensorboard and ``metrics.jsonl``): ``loss``, ``reward/mean`` (the objective),
``rewards/<term>/mean`` (each training term), ``rewards/eval/<term>/mean`` (evaluation reward on the
same samples), ``val/...`` (the same on final images of fixed validation prompts and seeds: the numbers to
compare across methods), ``anchor_l2``, ``grad_norm``, ``lr``, ``samples/pixel_std_across_batch`` (pixel
spread across a micro-batch's samples, which have different prompts: not per-prompt diversity) and, with
``data.val_images_per_prompt`` >= 2, ``val/diversity/per_prompt_pixel_std`` (the pixel std across each
validation prompt's images, averaged: the diversity that collapses under reward hacking). ReFL's
training rewards score its one-step x̂₀, not a final image, so they are logged as ``x0/reward/mean``,
``x0/rewards/...`` and are not comparable with the other methods' ``reward/mean``.

Example:
    >>> cfg = load_config(RewardFinetuneConfig, "configs/tiny/reward_draft.yaml")
    >>> summary = RewardFinetuner(cfg).train()
    >>> summary["lora"]      # .../pytorch_lora_weights.safetensors, for pipe.load_lora_weights(dir)
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from reward_plugins.base import RewardModel
from reward_plugins.composite import CompositeReward, Term
from reward_plugins.registry import create_reward, parse_name, resolve_dtype

from .. import losses
from ..configs import check_counts, count, save_config
from ..monitor import MonitorHook, MonitorSection, check_monitor, image_embedder, weights_saver
from ..plots import plot_metrics
from ..sampling import decode, denoise, negative_embeds, renoise_final_step
from .common import (
    JsonlLogger,
    LoraSection,
    ModelSection,
    TrainSection,
    add_lora,
    build_adapter,
    build_pipeline,
    check_fsdp_sections,
    check_guidance_settings,
    check_sections,
    disabled_adapter,
    drop_log_rows_after,
    ema_weights,
    export_lora,
    freeze_pipeline,
    full_trainable_state,
    is_sharded,
    latest_checkpoint,
    log_scalars,
    make_accelerator,
    make_ema,
    mean_over_processes,
    prepare_denoiser,
    read_checkpoint_state,
    read_jsonl,
    register_trainable_state_hooks,
    resume_tracker_kwargs,
    save_checkpoint,
    trainable_parameters,
    unwrap,
    weight_dtype_for,
)

METHODS = ("rwr", "draft", "draft-lv", "alignprop", "refl")
TRUNCATIONS = ("uniform", "gaussian")
GRADIENT_METHODS = ("draft", "draft-lv", "alignprop", "refl")
PRIOR_SOURCES = ("base", "samples", "data")
RWR_SAMPLES = ("policy", "base", "pool")
RWR_TARGETS = ("conditional", "guided")
METRICS_FILE = "metrics.jsonl"
# Drawn into <output_dir>/curves.png at the end: the training reward per step, on the fixed validation
# prompts, and the held-out evaluation reward.
CURVES = ("reward/mean", "x0/reward/mean", "val/reward/mean", "rewards/eval/mean", "x0/rewards/eval/mean")


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


@dataclass
class RewardSection:
    """A reward: one or several weighted terms, each ``name[:dimension]``.

    Attributes:
        terms: ``{"name[:dim]": weight}``, e.g. ``{"lescore:fidelity": 1.0, "lescore:alignment": 0.5}``.
            Terms naming the same reward share one model (one forward pass per call).
        normalize: set each term's shift/scale to its mean/std on a first batch of base-model samples
            (`CompositeReward.calibrate`), so terms on different scales weigh as their weights say.
        calibration_images: images in that first batch (>= 2).
        calibration_file: a calibration JSON from `reward-align eval-reward --calibrate` (mean/std per reward
            and dimension on a reference set); when given, terms are normalised from it instead of a first batch.
        options: keyword arguments for `create_reward` per reward name, e.g.
            ``{"aesthetic": {"checkpoint": "sac+logos+ava1-l14-linearMSE.pth"}}``.
        dtype: the reward's parameter dtype (``fp32``, ``bf16``, ``fp16``).
    """

    terms: dict[str, float] = field(default_factory=lambda: {"aesthetic-tiny": 1.0})
    normalize: bool = False
    calibration_images: int = count(8, minimum=2)
    calibration_file: str | None = None
    options: dict[str, dict] = field(default_factory=dict)
    dtype: str = "fp32"


@dataclass
class MethodSection:
    """The fine-tuning method and its settings.

    Attributes:
        name: one of ``rwr``, ``draft``, ``draft-lv``, ``alignprop``, ``refl``.
        k: DRaFT-K, the last k sampling steps keep their graph.
        lv_n: DRaFT-LV, re-noised copies of each sample.
        truncation: AlignProp's draw of K, once per generation call: ``"uniform"`` over `truncation_range`,
            or ``"gaussian"``, the current official code's (`backprop_strategy='gaussian'`): the cut-off step
            t = int(x) with x ~ N(`truncation_mean`, `truncation_std`) redrawn until 1 <= t < num_steps, and
            K = num_steps − t.
        truncation_range: AlignProp ``uniform``, [lo, hi] for K (None: [1, num_steps]).
        truncation_mean, truncation_std: AlignProp ``gaussian``, the cut-off step's distribution in steps
            (official: 42 and 5 of 50).
        refl_step_range: ReFL, [lo, hi] for the step whose x̂₀ is scored (None: [round(0.75 N), N − 1],
            i.e. [30, 39] for N = 40 steps as in ImageReward's ReFL).
        refl_target: ReFL's hinge: loss = relu(target − r) · refl_scale.
        refl_scale: ReFL's gradient scale (1e-3 in the official script).
        reward_scale: DRaFT / AlignProp: loss = −reward_scale · r.
        rwr_weighting: ``raw`` (Lee et al. 2023: the reward as the weight), ``softmax`` (over the batch) or
            ``exp`` (clipped, AWR-style); see `alignment.losses.rwr_weights`.
        rwr_temperature: τ in ``softmax`` and ``exp``.
        rwr_clip: upper bound of the exponential weight (``exp``).
        rwr_samples: where RWR's samples come from: ``policy`` (the model being trained, online), ``base``
            (fresh samples of the frozen base model at every step) or ``pool`` (Lee et al.'s / RAFT's offline
            set: before the first step, `rwr_pool_size` images of every training prompt from the frozen base
            model, scored once; the weights are computed within each prompt's images, entries of weight 0
            (``topk``'s rejects, ``raw``'s negatives) are dropped, and each micro-batch draws `batch_size`
            of the kept entries uniformly, with their weights rescaled to mean 1 over the kept set: the
            same objective, up to a constant, as the weighted loss over the whole pool). The pool is
            held on the CPU and rebuilt from its seeds on resume (the base model does not change).
            ``rwr_group_size`` must be 1 with a pool (it is grouped by prompt already); the training
            reward logged per step is then that of the drawn pool entries (the ``val/`` numbers show
            the model's progress).
        rwr_pool_size: ``pool``, images per training prompt (>= 2; ``topk`` keeps
            ceil(rwr_top_fraction · rwr_pool_size) of each prompt's).
        rwr_reencode: fit the VAE encoding (the posterior mean) of the decoded samples instead of the
            sampler's latents, as a fine-tuning run on saved images would. The denoiser was trained on
            encoder latents; sampled latents are not on that manifold (toy world, 10 DDIM steps at CFG 7:
            std 1.15 and peak |z| 6.4 against 0.95 and 4.6 for encoded scenes), and fitting them teaches it
            to produce such latents: 30 steps of uniform weights on base samples took held-out exact accuracy
            0.188 -> 0.160 and the learned reward 8.52 -> 8.20; the same on their re-encodings 0.201 and
            8.49.
        rwr_target: which prediction RWR's denoising loss fits: ``conditional`` (Lee et al.: the
            text-conditional ε_c) or ``guided``, the classifier-free-guided ε_u + g·(ε_c − ε_u) that drew
            the samples (g = sampling.guidance_scale; both branches trained). Samples drawn at guidance g come
            from the guided model, not from ε_c, so fitting ε_c to them can distil the guidance into it and
            sampling with guidance on top compounds it; ``guided`` keeps the sampled model as the one fitted.
            On the toy world it was worse, not better (uniform weights, 30 steps: held-out exact 0.188 ->
            0.069, conditional 0.160): a change of ε_c moves the guided output g times as far. Families
            without classifier-free guidance (FLUX) always use the conditional.
        rwr_top_fraction: ``topk`` weighting, the fraction of each batch kept (reward-ranked filtering).
        rwr_timestep_range: [lo, hi] in training-timestep units: RWR's denoising loss only at timesteps in
            this range (the family's training density restricted to it; None: all). The steps that decide
            what a reward judges may be a few: fitting own samples at every noise level also fits their
            low-noise detail, which the weights say nothing about.
        rwr_group_size: G >= 1 samples per prompt: each micro-batch is batch_size / G prompts drawn G times,
            and the weights are computed (and normalised) within each prompt's group, so the baseline of
            ``exp`` is that prompt's mean reward: advantage-weighted regression's V(s) with the prompt as the
            state. With G = 1 the weights are normalised over the whole micro-batch of different prompts,
            whose mean is no baseline for any one of them: rewards that differ between prompts (the learned
            toy-world CLIP's do) then weight prompts rather than samples.
        prior_weight: RWR's unweighted prior term λ (0 disables).
        prior_source: ``base`` (fresh samples of the base model, adapter off), ``samples`` (the same
            samples, unweighted) or ``data``: Lee et al. 2023's pre-training term, the plain denoising loss on
            real, correctly captioned images (`prior_data`), each step `batch_size` of them drawn uniformly
            with their own captions (at the same training timesteps, `rwr_timestep_range` included).
        prior_data: ``prior_source: data``, the images: a folder of images with ``prompts.txt`` (one line
            per image in file-name order, or one shared line) or a JSON/JSONL file of ``{"image", "prompt"}``
            records (paths relative to its folder), as `alignment.evaluation.loaders.load_images_folder`
            reads. They are centre-cropped to squares, resized (bilinear) to the model's resolution and
            encoded once (the VAE posterior mean) when the trainer is built, and held on the CPU.
        anchor_weight: weight of an L2 anchor, the mean squared difference between the trained and the base
            model's predictions on the steps that keep gradients (0 disables), logged as ``anchor_l2``. It is
            not a KL: with DDIM η = 0 there is no transition density, and for stochastic samplers the per-step
            Gaussian KL would weigh each step by its own variance.
    """

    name: str = "draft"
    k: int = count(1)
    lv_n: int = count(2)
    truncation: str = "uniform"
    truncation_range: list[int] | None = None
    truncation_mean: float = 42.0
    truncation_std: float = 5.0
    refl_step_range: list[int] | None = None
    refl_target: float = 2.0
    refl_scale: float = 1e-3
    reward_scale: float = 1.0
    rwr_weighting: str = "softmax"
    rwr_temperature: float = 1.0
    rwr_clip: float | None = 10.0
    rwr_samples: str = "policy"
    rwr_pool_size: int = count(16, minimum=2)
    rwr_reencode: bool = False
    rwr_target: str = "conditional"
    rwr_top_fraction: float = 0.25
    rwr_group_size: int = count(1)
    rwr_timestep_range: list[float] | None = None
    prior_weight: float = 0.0
    prior_source: str = "base"
    prior_data: str | None = None
    anchor_weight: float = 0.0


@dataclass
class SamplingSection:
    """How training samples are drawn.

    Attributes:
        num_steps: denoising steps per sample (ReFL's recipe uses 40).
        guidance_scale: classifier-free guidance (<= 1 disables it).
        scheduler: ``ddim``, ``ddpm``, ``euler``, ``euler_ancestral`` or None (the pipeline's own).
        eta: DDIM eta.
        checkpoint_unet: gradient-checkpoint every UNet call that keeps its graph.
        checkpoint_vae: gradient-checkpoint the VAE decode.
    """

    num_steps: int = count(50)
    guidance_scale: float = 7.5
    scheduler: str | None = None
    eta: float = 0.0
    checkpoint_unet: bool = True
    checkpoint_vae: bool = True


@dataclass
class DataSection:
    """Prompts: inline lists and/or files (``.txt`` one per line, ``.tsv`` with a ``Prompt`` column).

    Attributes:
        prompts, prompts_file: training prompts (drawn uniformly, seeded per step).
        val_prompts, val_prompts_file: fixed validation prompts (default: the first 8 training prompts).
        val_images_per_prompt: validation images per prompt (fixed seeds, so runs compare).
    """

    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    val_prompts: list[str] = field(default_factory=list)
    val_prompts_file: str | None = None
    val_images_per_prompt: int = count(1)


@dataclass
class RewardFinetuneConfig:
    """Everything `RewardFinetuner` needs; YAML sections mirror the fields.

    Example:
        >>> cfg = load_config(RewardFinetuneConfig, "configs/tiny/reward_draft.yaml", ["method.k=2"])
    """

    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    method: MethodSection = field(default_factory=MethodSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    reward: RewardSection = field(default_factory=RewardSection)
    eval_reward: RewardSection | None = None
    data: DataSection = field(default_factory=DataSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)


def check_method(method: MethodSection, sampling: SamplingSection) -> None:
    """Validate the method and sampling sections.

    Raises:
        ValueError: naming the key, the value received and the fix.
    """
    if method.name not in METHODS:
        close = difflib.get_close_matches(str(method.name), METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {method.name!r} (method.name).{hint} Use one of {', '.join(METHODS)}.")
    n = sampling.num_steps
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"sampling.num_steps must be a positive int; got {n!r}.")
    if sampling.scheduler is not None:
        from ..sampling import SCHEDULERS

        if sampling.scheduler not in SCHEDULERS:
            raise ValueError(f"sampling.scheduler must be one of {sorted(SCHEDULERS)} or null; got {sampling.scheduler!r}.")
    if method.name == "draft" and not 1 <= method.k <= n:
        raise ValueError(f"method.k must be in [1, sampling.num_steps={n}]; got {method.k}.")
    if method.name == "draft-lv" and method.lv_n < 1:
        raise ValueError(f"method.lv_n must be >= 1 (re-noised copies per sample); got {method.lv_n}.")
    for key in ("truncation_range", "refl_step_range"):
        rng = getattr(method, key)
        if rng is not None and (len(rng) != 2 or not 0 <= rng[0] <= rng[1] or rng[1] >= n + (key == "truncation_range")):
            bound = f"1 <= lo <= hi <= {n}" if key == "truncation_range" else f"0 <= lo <= hi <= {n - 1}"
            raise ValueError(f"method.{key} must be [lo, hi] with {bound} (sampling.num_steps={n}); got {rng}.")
    if method.truncation not in TRUNCATIONS:
        raise ValueError(f"method.truncation must be one of {TRUNCATIONS}; got {method.truncation!r}.")
    if method.name == "alignprop" and method.truncation == "gaussian":
        if not method.truncation_std > 0:
            raise ValueError(f"method.truncation_std must be > 0; got {method.truncation_std}.")
        if not 1 <= method.truncation_mean < n:
            raise ValueError(
                f"method.truncation_mean={method.truncation_mean} is the mean cut-off step and must lie in [1, "
                f"sampling.num_steps={n}) (official: 42 of 50 steps); lower it or raise sampling.num_steps."
            )
    if method.truncation_range is not None and method.truncation_range[0] < 1:
        raise ValueError(f"method.truncation_range must start at >= 1 (K = 0 has no gradient); got {method.truncation_range}.")
    if method.rwr_weighting not in losses.RWR_WEIGHTINGS:
        raise ValueError(f"method.rwr_weighting must be one of {losses.RWR_WEIGHTINGS}; got {method.rwr_weighting!r}.")
    if not method.rwr_temperature > 0:
        raise ValueError(f"method.rwr_temperature must be > 0; got {method.rwr_temperature}.")
    rng = method.rwr_timestep_range
    if rng is not None and (len(rng) != 2 or not 0 <= rng[0] < rng[1]):
        raise ValueError(f"method.rwr_timestep_range must be [lo, hi] with 0 <= lo < hi (training timesteps); got {rng}.")
    if method.rwr_target not in RWR_TARGETS:
        raise ValueError(f"method.rwr_target must be one of {RWR_TARGETS}; got {method.rwr_target!r}.")
    if not 0 < method.rwr_top_fraction <= 1:
        raise ValueError(f"method.rwr_top_fraction must be in (0, 1] (the fraction of each batch kept); got {method.rwr_top_fraction}.")
    if method.rwr_samples not in RWR_SAMPLES:
        raise ValueError(f"method.rwr_samples must be one of {RWR_SAMPLES}; got {method.rwr_samples!r}.")
    if method.rwr_samples == "pool" and method.rwr_group_size != 1:
        raise ValueError(
            f"method.rwr_group_size={method.rwr_group_size} with method.rwr_samples=pool: the pool's weights are "
            "already computed per prompt (over its rwr_pool_size images); set rwr_group_size to 1."
        )
    if not isinstance(method.rwr_reencode, bool):
        raise ValueError(f"method.rwr_reencode must be true or false; got {method.rwr_reencode!r}.")
    if method.prior_source not in PRIOR_SOURCES:
        raise ValueError(f"method.prior_source must be one of {PRIOR_SOURCES}; got {method.prior_source!r}.")
    if method.prior_source == "data" and not method.prior_data:
        raise ValueError("method.prior_source=data needs method.prior_data (a folder of images with prompts.txt, or a "
                         "JSON/JSONL of {\"image\", \"prompt\"} records).")
    if method.prior_data and method.prior_source != "data":
        raise ValueError(f"method.prior_data is set but method.prior_source={method.prior_source!r}; set "
                         "prior_source to data (or drop prior_data).")
    if method.prior_source == "data" and not method.prior_weight > 0:
        raise ValueError("method.prior_source=data with method.prior_weight=0 never uses the data; set prior_weight > 0.")
    for key in ("prior_weight", "anchor_weight"):
        if getattr(method, key) < 0:
            raise ValueError(f"method.{key} must be >= 0; got {getattr(method, key)}.")


def draw_truncation_k(method: MethodSection, num_steps: int, generator: torch.Generator) -> int:
    """AlignProp's K (the last K of `num_steps` steps keep their graph), drawn as `method.truncation` says.

    Example:
        >>> draw_truncation_k(MethodSection(name="alignprop", truncation="gaussian"), 50, torch.Generator())
        9
    """
    if method.truncation == "gaussian":
        for _ in range(10_000):
            # int() truncates towards zero, as the official code's int(Normal(mean, std).sample())
            t = int(float(torch.normal(method.truncation_mean, method.truncation_std, (1,), generator=generator)))
            if 1 <= t < num_steps:
                return num_steps - t
        raise ValueError(f"no cut-off step in [1, {num_steps}) drawn from N({method.truncation_mean}, "
                         f"{method.truncation_std}); check method.truncation_mean against sampling.num_steps.")
    lo, hi = method.truncation_range or (1, num_steps)
    return int(torch.randint(lo, hi + 1, (1,), generator=generator))


def read_prompts(inline: Sequence[str], path: str | None, what: str) -> list[str]:
    """Inline prompts plus those in a ``.txt`` (one per line) or ``.tsv`` (``Prompt`` column) file."""
    prompts = [str(p) for p in inline]
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{what}_file not found: {str(p)!r}; give a .txt (one prompt per line) or .tsv file.")
        lines = p.read_text(encoding="utf-8").splitlines()
        if p.suffix == ".tsv":
            header = lines[0].split("\t")
            if "Prompt" not in header:
                raise ValueError(f"{what}_file {str(p)!r} is a .tsv without a 'Prompt' column (columns: {header}).")
            col = header.index("Prompt")
            prompts += [row.split("\t")[col] for row in lines[1:] if row.strip()]
        else:
            prompts += [line.strip() for line in lines if line.strip()]
    return prompts


def build_reward(section: RewardSection, device, dtype=None) -> CompositeReward:
    """A `CompositeReward` of the section's terms; one model per distinct reward name.

    Example:
        >>> r = build_reward(RewardSection(terms={"pickscore-tiny": 1.0, "aesthetic-tiny": 0.5}), "cpu")
    """
    if not section.terms:
        raise ValueError('reward.terms is empty; give e.g. {"pickscore": 1.0} or {"lescore:fidelity": 1.0, "lescore:alignment": 0.5}.')
    dtype = resolve_dtype(dtype or section.dtype)
    built: dict[str, RewardModel] = {}
    terms = []
    for spec, weight in section.terms.items():
        base, dim = parse_name(spec)
        if base not in built:
            built[base] = create_reward(base, device=device, dtype=dtype, **dict(section.options.get(base, {})))
        terms.append(Term(built[base], float(weight), dim, name=spec))
    unused = sorted(set(section.options) - set(built))
    if unused:
        raise ValueError(f"reward.options names {unused}, which no term uses (terms: {list(section.terms)}).")
    return CompositeReward(terms)


def as_composite(reward: RewardModel) -> CompositeReward:
    """Wrap a plain reward as a one-term composite so logging and normalisation are uniform."""
    return reward if isinstance(reward, CompositeReward) else CompositeReward([Term(reward, 1.0, None)])


# ---------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------


def _seed_for(*parts: int) -> int:
    """A 63-bit seed from several integers (base seed, step, process, micro-batch, purpose)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(_seed_for(*parts))


class RewardFinetuner:
    """Reward fine-tuning with accelerate + peft.

    Args:
        config: the full config.
        reward: a ready reward to train on instead of building ``config.reward`` (any `RewardModel`).
        eval_reward: a ready evaluation reward instead of ``config.eval_reward``.
        output_dir: overrides ``config.train.output_dir``.
        pipe: an already built SD / SDXL pipeline (its UNet is trained in place) instead of ``config.model``.

    Raises:
        ValueError: an unknown method, a non-differentiable reward with a gradient method, or an
            invalid setting (checked before any model is loaded).

    Example:
        >>> trainer = RewardFinetuner(load_config(RewardFinetuneConfig, "configs/tiny/reward_rwr.yaml"))
        >>> trainer.train(resume=False)
    """

    def __init__(
        self,
        config: RewardFinetuneConfig,
        reward: RewardModel | None = None,
        eval_reward: RewardModel | None = None,
        output_dir: str | None = None,
        pipe=None,
    ) -> None:
        self.cfg = config
        self.output_dir = Path(output_dir or config.train.output_dir)
        check_counts(config)
        check_method(config.method, config.sampling)
        check_monitor(config.monitor)
        if config.method.name == "rwr" and config.train.batch_size % config.method.rwr_group_size:
            raise ValueError(
                f"method.rwr_group_size={config.method.rwr_group_size} must divide train.batch_size="
                f"{config.train.batch_size} (each micro-batch is batch_size / G prompts, G samples each)."
            )
        if config.method.name == "rwr" and config.train.batch_size < 2:
            # The weights are normalised over each micro-batch: with one sample every weight is 1 and RWR
            # silently becomes plain fine-tuning on its own samples.
            raise ValueError(
                f"method rwr needs train.batch_size >= 2 (its weights are normalised over the batch); got "
                f"{config.train.batch_size}. Raise train.batch_size (and lower gradient_accumulation_steps)."
            )
        check_sections(config.model, config.lora, config.train, need_pipeline=pipe is None)
        self.prompts = read_prompts(config.data.prompts, config.data.prompts_file, "data.prompts")
        if not self.prompts:
            raise ValueError("no training prompts: set data.prompts (a list) or data.prompts_file.")
        self.val_prompts = read_prompts(config.data.val_prompts, config.data.val_prompts_file, "data.val_prompts") or self.prompts[:8]

        self.accelerator = make_accelerator(config.train, self.output_dir)
        device = self.accelerator.device
        self.reward = as_composite(reward) if reward is not None else build_reward(config.reward, device)
        self._check_differentiable(self.reward, "reward")
        self.eval_reward = None
        if eval_reward is not None or config.eval_reward is not None:
            self.eval_reward = as_composite(eval_reward) if eval_reward is not None else build_reward(config.eval_reward, device)
        self.reward.to(device)
        if self.eval_reward is not None:
            self.eval_reward.to(device)

        self.weight_dtype = weight_dtype_for(config.train.mixed_precision)
        if pipe is None:
            pipe = build_pipeline(config.model, device, self.weight_dtype)
        else:  # a caller's pipeline: keep its dtype, move it, freeze what is not trained
            freeze_pipeline(pipe)
            pipe.to(device)
        self.pipe = pipe
        self.adapter = build_adapter(self.pipe, config.model)
        check_guidance_settings(self.adapter, {"sampling.guidance_scale": config.sampling.guidance_scale})
        # Under fp16 the VAE decodes in fp32: SDXL's VAE overflows in fp16 (bf16 has fp32's range).
        if self.weight_dtype == torch.float16 and self.pipe.vae.dtype != torch.float32:
            self.pipe.vae.to(dtype=torch.float32)
        self.resolution = config.model.resolution or self.adapter.default_resolution
        unet = self.adapter.denoiser  # the UNet, or the transformer of flow models
        self.base_unet = None
        if config.lora.enabled:
            self.params = add_lora(unet, config.lora, seed=config.train.seed)
        else:
            unet.float().requires_grad_(True)
            self.params = [p for p in unet.parameters() if p.requires_grad]
            if config.method.anchor_weight > 0 or (config.method.name == "rwr" and config.method.prior_weight > 0
                                                   and config.method.prior_source == "base"):
                # Full fine-tuning has no adapter to switch off: the base model is an explicit frozen copy.
                self.base_unet = copy.deepcopy(unet).requires_grad_(False).to(self.weight_dtype)
        # Under FSDP a whole-denoiser checkpoint cannot recompute (the root's all-gathers differ in backward):
        # accelerate's per-block activation checkpointing, inside each FSDP unit, takes its place.
        self.sharded = is_sharded(self.accelerator)
        self._checkpoint_calls = config.sampling.checkpoint_unet and not self.sharded
        if config.method.name == "rwr" and config.train.gradient_checkpointing and not self.sharded:
            unet.enable_gradient_checkpointing()
        from diffusers.optimization import get_scheduler

        t = config.train
        self.optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay
        )
        self.lr_scheduler = get_scheduler(
            t.lr_scheduler, self.optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.max_steps
        )
        register_trainable_state_hooks(self.accelerator)
        if self.sharded:
            self._check_sharding(config)
        block_checkpoints = config.train.gradient_checkpointing if config.method.name == "rwr" else config.sampling.checkpoint_unet
        self.unet, self.optimizer = prepare_denoiser(self.accelerator, self.adapter, unet, self.optimizer,
                                                     activation_checkpointing=block_checkpoints)
        self.params = trainable_parameters(self.unet)  # FSDP replaces them with sharded ones (the same under DDP)
        # The lr scheduler is stepped once per optimizer step by hand (accelerate would step it once per
        # process); it is checkpointed as a custom object.
        self.accelerator.register_for_checkpointing(self.lr_scheduler)
        self.ema = make_ema(self.accelerator, self.params, t)  # None unless train.ema_decay > 0
        # `self.unet` is the prepared module (DDP/FSDP under several processes): every call with gradients goes
        # through it, so the engine reduces the gradients. `self.model` is the inner module, for calls without
        # gradients (sampling, validation, the adapter-disabled reference), state and export.
        self.model = unwrap(self.unet)
        self.logger = JsonlLogger(self.output_dir / METRICS_FILE, enabled=self.accelerator.is_main_process)
        self.step = 0
        # Reward-hacking monitor at every validation (embedding diversity in the reward's own image space).
        self.monitor = MonitorHook(config.monitor, self.output_dir, self.accelerator, embed=image_embedder(self.reward))
        self._val_batch: tuple[torch.Tensor, list[str], list[int]] | None = None
        self._rwr_pool: dict | None = None  # rwr_samples: pool, built before the first RWR step
        self._prior_data: dict | None = None  # prior_source: data, the encoded real images
        if config.method.name == "rwr" and config.method.prior_weight > 0 and config.method.prior_source == "data":
            self._prior_data = self._load_prior_data(config.method.prior_data)

    # -- checks --------------------------------------------------------------------------------------
    def _check_sharding(self, config: RewardFinetuneConfig) -> None:
        """What FSDP needs: every denoiser call all-gathers parameters, so all processes make the same calls."""
        n, world = len(self.val_prompts) * config.data.val_images_per_prompt, self.accelerator.num_processes
        if n % world:
            raise ValueError(
                f"train.distributed=fsdp: the {n} validation images (data.val_prompts x data.val_images_per_prompt) "
                f"must split evenly over the {world} processes (each sampling call is a collective); add prompts or "
                "images per prompt."
            )
        check_fsdp_sections(config.train, config.lora)

    def _check_differentiable(self, reward: CompositeReward, what: str) -> None:
        if self.cfg.method.name not in GRADIENT_METHODS:
            return
        bad = [t.name for t in reward.terms if not getattr(t.reward, "is_differentiable", False)]
        if bad:
            raise ValueError(
                f"method {self.cfg.method.name!r} backpropagates through the {what}, but {bad} "
                "is not differentiable (is_differentiable=False). Use method=rwr, which needs only reward "
                "values, or a differentiable reward (e.g. pickscore, hpsv2, imagereward, aesthetic, lescore)."
            )

    # -- pieces ------------------------------------------------------------------------------------------
    def _reference(self):
        """The base model's prediction for a UNet input (adapter disabled), for the anchor."""
        if self.base_unet is not None:
            base = self.base_unet
            return lambda x, t, emb: self.adapter.unet(x.to(self.weight_dtype), t, emb, unet=base)

        def ref(x, t, emb):
            with disabled_adapter(self.model):
                return self.adapter.unet(x.to(self.model.dtype), t, emb, unet=self.model)

        return ref

    def _encode(self, prompts: list[str]):
        cond = self.adapter.encode_prompts(prompts, self.resolution)
        g = self.cfg.sampling.guidance_scale
        # None for guidance-distilled families (FLUX): `denoise` puts g into the guidance embedding
        return cond, (negative_embeds(self.adapter, cond) if g > 1 else None)

    def _sample_kwargs(self) -> dict:
        s = self.cfg.sampling
        return dict(
            num_steps=s.num_steps, guidance_scale=s.guidance_scale, scheduler=s.scheduler, eta=s.eta,
            use_checkpoint=self._checkpoint_calls,
        )

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator, base: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and [0, 1] images for `prompts` without gradients (the current model, or the base)."""
        cond, uncond = self._encode(prompts)
        if base and self.base_unet is not None:
            out = denoise(self.adapter, cond, uncond, generator=generator, resolution=self.resolution,
                          unet=self.base_unet, **self._sample_kwargs())
        elif base and self.cfg.lora.enabled:
            with disabled_adapter(self.model):
                out = denoise(self.adapter, cond, uncond, generator=generator, resolution=self.resolution,
                              unet=self.model, **self._sample_kwargs())
        else:
            out = denoise(self.adapter, cond, uncond, generator=generator, resolution=self.resolution,
                          unet=self.model, **self._sample_kwargs())
        return out.latents, decode(self.adapter, out.latents)

    def _pick_prompts(self, step: int, micro: int) -> list[str]:
        g = _generator(self.cfg.train.seed, step, self.accelerator.process_index, micro, 1)
        group = self.cfg.method.rwr_group_size if self.cfg.method.name == "rwr" else 1
        idx = torch.randint(len(self.prompts), (self.cfg.train.batch_size // group,), generator=g)
        return [self.prompts[i] for i in idx.tolist() for _ in range(group)]

    def calibrate(self) -> dict:
        """Per-term normalisation of the training (and evaluation) reward on base-model samples."""
        stats = {}
        for what, reward, section in (("reward", self.reward, self.cfg.reward), ("eval_reward", self.eval_reward, self.cfg.eval_reward)):
            if reward is None or section is None or not (section.normalize or section.calibration_file):
                continue
            if section.calibration_file:  # statistics measured on a reference set beat one first batch
                stats[what] = {k: list(v) for k, v in reward.load_calibration(section.calibration_file).items()}
                continue
            n = max(2, section.calibration_images)
            # The same seed on every process: each computes identical statistics, no communication needed.
            g = _generator(self.cfg.train.seed, 0, 0, 0, 7)
            prompts = [self.prompts[i % len(self.prompts)] for i in range(n)]
            _, images = self.generate(prompts, g, base=True)
            stats[what] = {k: list(v) for k, v in reward.calibrate(images, prompts).items()}
        return stats

    def _apply_calibration(self, stats: dict) -> None:
        for what, reward in (("reward", self.reward), ("eval_reward", self.eval_reward)):
            for term in (reward.terms if reward is not None else []):
                if term.name in stats.get(what, {}):
                    term.shift, term.scale = stats[what][term.name]

    # -- one micro-batch ---------------------------------------------------------------------------------
    def _micro_step(self, step: int, micro: int) -> tuple[torch.Tensor, dict, torch.Tensor, list[str]]:
        """Loss for one micro-batch; returns (loss, scalars, images, prompts) with images detached."""
        m, s = self.cfg.method, self.cfg.sampling
        rank = self.accelerator.process_index
        prompts = self._pick_prompts(step, micro)
        gen = _generator(self.cfg.train.seed, step, rank, micro, 2)
        ref = self._reference() if m.anchor_weight > 0 else None
        stats: dict[str, float] = {}
        if m.name == "rwr":
            return self._rwr_step(prompts, gen, step, micro, ref)
        cond, uncond = self._encode(prompts)
        # Calls with gradients go through the prepared (DDP/FSDP) module, so its hooks reduce the gradients.
        kw = dict(generator=gen, resolution=self.resolution, reference=ref, unet=self.unet, **self._sample_kwargs())
        # Under FSDP each denoiser call is a collective: every process draws the same K / ReFL step.
        kgen = _generator(self.cfg.train.seed, step, 0, micro, 4) if self.sharded else gen
        if m.name == "draft":
            out = denoise(self.adapter, cond, uncond, grad_steps=m.k, **kw)
        elif m.name == "alignprop":
            k = draw_truncation_k(m, s.num_steps, kgen)
            stats["truncation_k"] = k
            out = denoise(self.adapter, cond, uncond, grad_steps=k, **kw)
        elif m.name == "refl":
            lo, hi = m.refl_step_range or (int(round(0.75 * s.num_steps)), s.num_steps - 1)
            lo = min(lo, hi)
            mid = int(torch.randint(lo, hi + 1, (1,), generator=kgen))
            stats["refl_step"] = mid
            out = denoise(self.adapter, cond, uncond, grad_steps=1, stop_at=mid, **kw)
        else:  # draft-lv
            with torch.no_grad():
                final = denoise(self.adapter, cond, uncond, generator=gen, resolution=self.resolution,
                                unet=self.model, **self._sample_kwargs()).latents
            out = renoise_final_step(self.adapter, final, cond, uncond, n=m.lv_n, generator=gen, reference=ref,
                                     unet=self.unet, num_steps=s.num_steps, guidance_scale=s.guidance_scale,
                                     scheduler=s.scheduler, eta=s.eta, use_checkpoint=self._checkpoint_calls)
            prompts = [p for p in prompts for _ in range(m.lv_n)]
        images = decode(self.adapter, out.latents, use_checkpoint=s.checkpoint_vae)
        r = self.reward(images, prompts)
        if m.name == "refl":
            loss = losses.refl_loss(r.scores, m.refl_target, m.refl_scale)
        else:
            loss = losses.draft_loss(r.scores, m.reward_scale)
        if out.anchor is not None:
            loss = loss + m.anchor_weight * out.anchor
            stats["anchor_l2"] = float(out.anchor.detach())
        # ReFL scores a one-step x̂0, not a final image: its numbers get their own names (see the docstring).
        stats.update(self._reward_stats(r.detach().per_dim, r.scores.detach(), self._train_prefix()))
        return loss, stats, images.detach(), prompts

    @torch.no_grad()
    def _reencode(self, images: torch.Tensor) -> torch.Tensor:
        """``rwr_reencode``: the VAE posterior mean of [0, 1] images, in the denoiser's latent space."""
        return self.adapter.encode_images(images, sample=False).float()

    @torch.no_grad()
    def _load_prior_data(self, path: str) -> dict:
        """``prior_source: data``: the images of `path` (see `MethodSection.prior_data`), centre-cropped, resized
        to the model's resolution and encoded (posterior mean), with their captions, on the CPU."""
        import torch.nn.functional as F

        from alignment.evaluation.loaders import load_images_folder
        from alignment.evaluation.scoring import decode_image
        from reward_plugins.preprocess import center_crop

        if not Path(path).exists():
            raise ValueError(f"method.prior_data={path!r} does not exist (a folder with prompts.txt, or a JSON/JSONL file).")
        ds = load_images_folder(path)
        if not ds.images:
            raise ValueError(f"method.prior_data={path!r} holds no image.")
        res, lats = self.resolution, []
        for i in range(0, len(ds.images), 64):
            batch = []
            for ref in ds.images[i : i + 64]:
                x = decode_image(ref).float() / 255.0
                side = min(x.shape[1:])
                x = center_crop(x, side)
                if side != res:
                    x = F.interpolate(x[None], size=(res, res), mode="bilinear", antialias=True, align_corners=False)[0]
                batch.append(x)
            images = torch.stack(batch).to(self.accelerator.device, self.pipe.vae.dtype)
            lats.append(self._reencode(images).cpu())
        return {"latents": torch.cat(lats), "prompts": [ds.prompt_of(i) for i in range(len(ds.images))]}

    @torch.no_grad()
    def _build_rwr_pool(self) -> dict:
        """``rwr_samples: pool``: every training prompt's `rwr_pool_size` base-model images, scored and weighted
        within the prompt; the kept entries (weight > 0) with their weights rescaled to mean 1, on the CPU."""
        m, chunk = self.cfg.method, self.cfg.train.batch_size
        kept_lat, kept_w, kept_prompts, kept_scores, kept_dims, all_scores = [], [], [], [], {}, []
        for i, prompt in enumerate(self.prompts):
            g = _generator(self.cfg.train.seed, i, 0, 0, 5)  # the same pool on every process and on resume
            lat, img = zip(*(self.generate([prompt] * min(chunk, m.rwr_pool_size - j), g, base=True)
                             for j in range(0, m.rwr_pool_size, chunk)))
            lat, img = torch.cat(lat), torch.cat(img)
            r = self.reward(img, [prompt] * len(img))
            w = losses.rwr_weights(r.scores, m.rwr_temperature, m.rwr_weighting, m.rwr_clip, m.rwr_top_fraction)
            keep = w > 0
            if bool(keep.any()):
                kept_lat.append((self._reencode(img[keep]) if m.rwr_reencode else lat[keep]).float().cpu())
                kept_w.append(w[keep].float().cpu())
                kept_scores.append(r.scores[keep].float().cpu())
                for k, v in r.per_dim.items():
                    kept_dims.setdefault(k, []).append(v[keep].float().cpu())
                kept_prompts += [prompt] * int(keep.sum())
            all_scores.append(r.scores.float().cpu())
        if not kept_prompts:
            raise ValueError(
                f"method.rwr_samples=pool kept no sample: every weight was 0 (rwr_weighting={m.rwr_weighting!r}; "
                "with 'raw' every reward was <= 0). Use a weighting that keeps samples, e.g. topk or exp."
            )
        w = torch.cat(kept_w)
        scores = torch.cat(kept_scores)
        stats = {"rwr/pool_size": float(sum(len(s) for s in all_scores)), "rwr/pool_kept": float(len(kept_prompts)),
                 "rwr/pool_reward_mean": float(torch.cat(all_scores).mean()), "rwr/pool_kept_reward_mean": float(scores.mean())}
        return {"latents": torch.cat(kept_lat), "weights": w / w.mean(), "prompts": kept_prompts, "scores": scores,
                "per_dim": {k: torch.cat(v) for k, v in kept_dims.items()}, "stats": stats}

    def _rwr_step(self, prompts, gen, step, micro, ref):
        m = self.cfg.method
        stats: dict[str, float] = {}
        if m.rwr_samples == "pool":
            if self._rwr_pool is None:
                self._rwr_pool = self._build_rwr_pool()
                stats.update(self._rwr_pool["stats"])
            pool, device = self._rwr_pool, self.accelerator.device
            idx = torch.randint(len(pool["prompts"]), (self.cfg.train.batch_size,),
                                generator=_generator(self.cfg.train.seed, step, self.accelerator.process_index, micro, 6))
            prompts = [pool["prompts"][i] for i in idx.tolist()]
            latents, weights = pool["latents"][idx].to(device), pool["weights"][idx].to(device)
            scores, per_dim = pool["scores"][idx].to(device), {k: v[idx].to(device) for k, v in pool["per_dim"].items()}
            with torch.no_grad():
                images = decode(self.adapter, latents.to(self.pipe.vae.dtype), use_checkpoint=False)
        else:
            latents, images = self.generate(prompts, gen, base=m.rwr_samples == "base")
            with torch.no_grad():
                r = self.reward(images, prompts)
            scores, per_dim = r.scores, r.per_dim
            # One weighting per prompt group (rows i*G .. i*G+G-1 share a prompt; G = 1: the whole micro-batch).
            groups = r.scores.view(-1, m.rwr_group_size) if m.rwr_group_size > 1 else r.scores.view(1, -1)
            weights = torch.cat([losses.rwr_weights(g, m.rwr_temperature, m.rwr_weighting, m.rwr_clip, m.rwr_top_fraction)
                                 for g in groups])
            if m.rwr_reencode:
                latents = self._reencode(images)
        cond, uncond = self._encode(prompts)
        # ``guided``: fit the guided prediction the samples were drawn with (see MethodSection.rwr_target).
        guided = uncond if (m.rwr_target == "guided" and uncond is not None and self.adapter.uses_cfg) else None
        pred, target, base_in, raw = self._denoising_pred(latents, cond, gen, guided)
        prior_pred = prior_target = None
        if m.prior_weight > 0:
            if m.prior_source == "samples":
                prior_pred, prior_target = pred, target
            elif m.prior_source == "data":  # Lee et al.'s pre-training term: real images, their own captions
                data = self._prior_data
                g2 = _generator(self.cfg.train.seed, step, self.accelerator.process_index, micro, 8)
                idx = torch.randint(len(data["prompts"]), (self.cfg.train.batch_size,), generator=g2)
                p_cond, p_uncond = self._encode([data["prompts"][i] for i in idx.tolist()])
                p_guided = p_uncond if guided is not None else None
                prior_pred, prior_target, _, _ = self._denoising_pred(data["latents"][idx].to(latents.device), p_cond, g2,
                                                                      p_guided)
            else:
                g2 = _generator(self.cfg.train.seed, step, self.accelerator.process_index, micro, 3)
                base_latents, base_images = self.generate(prompts, g2, base=True)
                if m.rwr_reencode:
                    base_latents = self._reencode(base_images)
                prior_pred, prior_target, _, _ = self._denoising_pred(base_latents, cond, g2, guided)
        loss = losses.rwr_loss(pred, target, weights, prior_pred, prior_target, m.prior_weight)
        stats["rwr/weight_max"] = float(weights.max())
        if ref is not None:
            with torch.no_grad():
                base_pred = ref(*base_in).float()
            anchor = losses.anchor_l2(raw, base_pred)
            loss = loss + m.anchor_weight * anchor
            stats["anchor_l2"] = float(anchor.detach())
        stats.update(self._reward_stats(per_dim, scores))
        return loss, stats, images, prompts

    def _denoising_pred(self, latents, cond, gen, uncond=None):
        """The UNet's prediction on q(x_t | x_0) at uniform training timesteps, and its target.

        With `uncond` (``method.rwr_target: guided``) the prediction is the classifier-free-guided one the
        sampler uses, ``ε_u + g·(ε_c − ε_u)``, with gradients through both branches; the third return value
        is the raw UNet input (doubled batch) and the second-to-last the raw output, for the anchor."""
        from diffusers.utils.torch_utils import randn_tensor

        # The family's training forward process, whatever the sampler: DDPM at uniform integer timesteps
        # (SD/SDXL), rectified flow at the scripts' σ density (SD3/FLUX).
        ad = self.adapter
        noise = randn_tensor(latents.shape, generator=gen, device=latents.device, dtype=torch.float32)
        t = ad.sample_timesteps(latents.shape[0], gen, device=latents.device)
        rng = self.cfg.method.rwr_timestep_range if self.cfg.method.name == "rwr" else None
        if rng is not None:  # the family's density restricted to [lo, hi], by rejection
            for _ in range(10_000):
                bad = (t < rng[0]) | (t > rng[1])
                if not bool(bad.any()):
                    break
                t[bad] = ad.sample_timesteps(int(bad.sum()), gen, device=latents.device)
            else:
                raise ValueError(f"method.rwr_timestep_range={rng} holds (almost) none of the family's training timesteps.")
        x = ad.add_noise(latents.float(), noise, t).to(self.model.dtype)
        target = ad.target(latents.float(), noise, t)
        if uncond is None:
            pred = ad.unet(x, t, cond, unet=self.unet).float()  # the prepared module: DDP/FSDP reduce its gradients
            return pred, target, (x, t, cond), pred
        x_in, t_in, emb = torch.cat([x, x]), torch.cat([t, t]), uncond.cat(cond)
        raw = ad.unet(x_in, t_in, emb, unet=self.unet).float()
        u, c = raw.chunk(2)
        return u + self.cfg.sampling.guidance_scale * (c - u), target, (x_in, t_in, emb), raw

    def _train_prefix(self) -> str:
        return "x0/" if self.cfg.method.name == "refl" else ""

    def _reward_stats(self, per_dim: dict, scores: torch.Tensor, prefix: str = "") -> dict:
        stats = {f"{prefix}reward/mean": float(scores.float().mean())}
        for name, v in per_dim.items():
            if name != "composite":
                stats[f"{prefix}rewards/{name}/mean"] = float(v.float().mean())
        return stats

    def _eval_stats(self, images: torch.Tensor, prompts: list[str], prefix: str = "") -> dict:
        if self.eval_reward is None:
            return {}
        out = self.eval_reward.score(images, prompts)
        stats = {f"{prefix}rewards/eval/{k}/mean": float(v.mean()) for k, v in out.per_dim.items() if k != "composite"}
        stats[f"{prefix}rewards/eval/mean"] = float(out.scores.mean())
        return stats

    # -- validation ----------------------------------------------------------------------------------------
    def validate(self) -> dict:
        """Training and evaluation rewards of final images on the fixed validation prompts and seeds (`val/...`
        tags), sampled with the EMA weights when ``train.ema_decay`` is set (they are what gets exported)."""
        with ema_weights(self.ema):
            return self._validate()

    @torch.no_grad()
    def _validate(self) -> dict:
        prompts = [p for p in self.val_prompts for _ in range(self.cfg.data.val_images_per_prompt)]
        # Each process takes a slice; seeds depend on the image index only, so results do not depend on
        # the number of processes.
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        was_training = self.model.training
        self.model.eval()
        # Every process reduces the same keys, also one whose slice of the prompts is empty.
        sums = {"val/reward/mean": 0.0, **{f"val/rewards/{t.name}/mean": 0.0 for t in self.reward.terms}}
        if self.eval_reward is not None:
            sums["val/rewards/eval/mean"] = 0.0
            sums.update({f"val/rewards/eval/{t.name}/mean": 0.0 for t in self.eval_reward.terms})
        count = 0
        bs = self.cfg.train.batch_size
        mine = list(range(rank, len(prompts), world))
        # Per-prompt diversity: the pixel std across each prompt's images (different seeds), averaged over
        # pixels and prompts; per-prompt sums are reduced across processes, whichever process drew an image.
        m = self.cfg.data.val_images_per_prompt
        shape = (len(self.val_prompts), 3, self.resolution, self.resolution)
        div = torch.zeros(2, *shape) if m >= 2 else None
        kept: list[torch.Tensor] = []  # this process's images, for the monitor
        for start in range(0, len(mine), bs):
            idx = mine[start:start + bs]
            chunk = [prompts[i] for i in idx]
            latents = torch.cat([
                torch.randn(1, self.adapter.latent_channels, self.resolution // self.adapter.vae_scale,
                            self.resolution // self.adapter.vae_scale, generator=_generator(self.cfg.train.seed, 10**6 + i))
                for i in idx
            ])
            cond, uncond = self._encode(chunk)
            out = denoise(self.adapter, cond, uncond, latents=latents, generator=_generator(self.cfg.train.seed, 10**6, idx[0]),
                          resolution=self.resolution, unet=self.model, **self._sample_kwargs())
            images = decode(self.adapter, out.latents)
            r = self.reward.score(images, chunk)
            stats = {**self._reward_stats(r.per_dim, r.scores, "val/"), **self._eval_stats(images, chunk, "val/")}
            for k, v in stats.items():
                sums[k] += v * len(idx)
            count += len(idx)
            kept.append(images.detach().float().cpu())
            if div is not None and tuple(images.shape[1:]) == shape[1:]:
                x = images.detach().float().cpu()
                for b, i in enumerate(idx):
                    div[0, i // m] += x[b]
                    div[1, i // m] += x[b] ** 2
        keys = sorted(sums)
        vec = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=self.accelerator.device)
        vec = self.accelerator.reduce(vec, reduction="sum")
        self.model.train(was_training)
        self._val_batch = (torch.cat(kept) if kept else torch.zeros(0, 3, self.resolution, self.resolution),
                           [prompts[i] for i in mine], mine)
        result = {k: float(vec[i] / vec[-1]) for i, k in enumerate(keys)}
        if div is not None:
            s, sq = self.accelerator.reduce(div.to(self.accelerator.device), reduction="sum").cpu()
            var = ((sq - s * s / m) / (m - 1)).clamp(min=0)
            result["val/diversity/per_prompt_pixel_std"] = float(var.sqrt().flatten(1).mean(1).mean())
        return result

    # -- the loop ------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step: the micro-batches, gradient averaging across processes, clipping, the
        update and the lr schedule. Returns this process's scalars (averaged over micro-batches)."""
        acc, t = self.accelerator, self.cfg.train
        tic = time.perf_counter()
        scalars: dict[str, float] = {}
        for micro in range(t.gradient_accumulation_steps):
            # Several denoiser calls per backward are fine under DDP: each leaf's gradient is accumulated once
            # per backward (checkpointing is non-reentrant), and the last micro-batch's backward all-reduces
            # the sum of all of them (DDP averages over processes); FSDP reduces in its own backward hooks.
            last = micro == t.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.unet):
                loss, stats, images, prompts = self._micro_step(self.step, micro)
                acc.backward(loss)  # divides by gradient_accumulation_steps
            stats["loss"] = float(loss.detach())
            # Spread across the micro-batch (different prompts), not per-prompt diversity: named for what it is.
            stats["samples/pixel_std_across_batch"] = float(images.float().std(0).mean()) if images.shape[0] > 1 else 0.0
            stats.update(self._eval_stats(images, prompts, self._train_prefix()))
            for k, v in stats.items():
                scalars[k] = scalars.get(k, 0.0) + v / t.gradient_accumulation_steps
        grad_norm = acc.clip_grad_norm_(self.params, t.max_grad_norm if t.max_grad_norm else math.inf)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        scalars.update(grad_norm=float(grad_norm), lr=self.lr_scheduler.get_last_lr()[0])
        scalars["time/step_s"] = time.perf_counter() - tic
        return scalars

    def train(self, resume: bool = False) -> dict:
        """Run to ``train.max_steps``; returns a summary (final step, LoRA path, first/last rewards).

        Args:
            resume: continue from the newest complete checkpoint under the output dir (exactly: the same
                data, noise and updates as an uninterrupted run).
        """
        acc, t = self.accelerator, self.cfg.train
        self.output_dir.mkdir(parents=True, exist_ok=True)
        found = latest_checkpoint(self.output_dir) if resume else None
        if found is not None:
            path, self.step = found
            acc.load_state(str(path))
            calibration = read_checkpoint_state(path).get("calibration", {})
            self._apply_calibration(calibration)
            if acc.is_main_process:  # drop log rows written after the checkpoint by the interrupted run
                drop_log_rows_after(self.logger.path, self.step)
            self.monitor.resume(self.step)
        else:
            if acc.is_main_process and self.logger.path.exists():
                self.logger.path.unlink()
            calibration = self.calibrate()
            if acc.is_main_process:
                save_config(self.cfg, self.output_dir / "config.yaml")
        if acc.is_main_process and t.report_to == "tensorboard" and acc.log_with:
            acc.init_trackers("reward_finetune", init_kwargs=resume_tracker_kwargs(self.step))
        if self.step == 0:
            val = self.validate()
            self._log({**val, **self._observe(val)}, 0)

        self.unet.train()
        while self.step < t.max_steps:
            scalars = self.train_step()
            scalars = self._mean_over_processes(scalars)
            self.monitor.record_training(scalars)
            if (t.validate_every and self.step % t.validate_every == 0) or self.step == t.max_steps:
                val = self.validate()
                scalars.update(val)
                scalars.update(self._observe(val))
            stop = self.monitor.should_stop()  # on_alarm: stop ends the run at this validation
            if t.log_every and (self.step % t.log_every == 0 or self.step == t.max_steps or stop or any(k.startswith("val/") for k in scalars)):
                self._log(scalars, self.step)
            if (t.save_every and self.step % t.save_every == 0) or self.step == t.max_steps or stop:
                save_checkpoint(acc, self.output_dir, self.step, t.checkpoints_total_limit, {"calibration": calibration})
            if stop:
                break
        lora_path = None
        acc.wait_for_everyone()
        state = full_trainable_state(self.model) if self.sharded else None  # FSDP: gathered on every process
        if acc.is_main_process:
            with ema_weights(self.ema):  # with train.ema_decay the exported model is the EMA
                if self.cfg.lora.enabled:
                    lora_path = export_lora(self.pipe, self.model, self.output_dir, state=state)
                else:
                    self.model.save_pretrained(self.output_dir / "unet")
        acc.end_training()
        if acc.is_main_process:
            plot_metrics(self.logger.path, CURVES, self.output_dir / "curves.png",
                         title=f"reward fine-tuning ({self.cfg.method.name})", markers=self.monitor.markers())
        rows = read_jsonl(self.logger.path)
        summary = {"step": self.step, "lora": str(lora_path) if lora_path else None, "output_dir": str(self.output_dir),
                   "metrics": str(self.logger.path), "first": rows[0] if rows else {}, "last": rows[-1] if rows else {},
                   "monitor": self.monitor.finish()}
        if acc.is_main_process:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _observe(self, val: dict) -> dict:
        """The monitor's signals for the validation just run (its images; `best/` when the held-out score improves)."""
        images, prompts, index = self._val_batch
        if self.sharded and self.monitor.enabled:  # FSDP: the LoRA is gathered on every process, one writes it
            save = functools.partial(export_lora, self.pipe, self.model, state=full_trainable_state(self.model))
        else:
            save = weights_saver(self.pipe, self.model, self.ema, lora=self.cfg.lora.enabled)
        return self.monitor.on_validation(self.step, val, images, prompts, index, save_best=save)

    def _mean_over_processes(self, scalars: dict) -> dict:
        return mean_over_processes(self.accelerator, scalars)

    def _log(self, scalars: dict, step: int) -> None:
        log_scalars(self.accelerator, self.logger, self.cfg.train.report_to, scalars, step)


def train_reward(config: RewardFinetuneConfig, output_dir: str | None = None, resume: bool = False, **kwargs) -> dict:
    """Build a `RewardFinetuner` and train; see its docstring.

    Example:
        >>> train_reward(load_config(RewardFinetuneConfig, "configs/tiny/reward_draft.yaml"), "outputs/draft")
    """
    return RewardFinetuner(config, output_dir=output_dir, **kwargs).train(resume=resume)
