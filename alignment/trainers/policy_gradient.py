"""Policy-gradient training of a diffusers denoiser for any reward, differentiable or not: DDPO (Black
et al. 2023) on ε/v families (SD 1.x/2.x, SDXL) and Flow-GRPO (Liu et al. 2025) on flow families
(SD3/3.5, FLUX.1). LoRA via peft, accelerate for precision, accumulation and several processes.

One **epoch** (``train.max_steps`` counts epochs; checkpoints and validation are per epoch):

1. Rollout: `method.prompts_per_epoch` prompts, each sampled `method.group_size` (G) times with a
   stochastic sampler that records every transition's log-prob (`sampling_logprob.py`: DDIM η > 0 for
   ``ddpo``, the flow SDE or CPS for ``grpo``; ``sampling.noise_block`` f > 1 makes each step's noise
   block-constant over f x f latent blocks and scores the block means, a lower-variance option). Samples are
   split across processes.
2. Rewards: any `RewardModel` / `CompositeReward`, scored in batches on the decoded images. A NaN or
   infinite reward marks its sample invalid: it is dropped from the statistics and from training and
   counted (``reward/nan_count``), never propagated.
3. Advantages over the gathered group of every process: group-relative (r − mean_G)/max(std, floor),
   Flow-GRPO's global std as an option, or DDPO's per-prompt running statistics
   (``method.advantage: running``).
4. `method.inner_epochs` passes over the rollout buffer: for each trained step the log-prob of the
   recorded transition under the current policy, PPO's clipped ratio objective, optionally β·KL to the
   reference (the LoRA adapter disabled). Trained steps: ``all``, a random ``timestep_fraction`` per
   sample (DDPO), or a ``window`` that slides every epoch (MixGRPO / Flow-GRPO-Fast; with
   ``ode_outside_window`` the steps outside it are sampled deterministically). CFG is used in
   training exactly as in sampling (``method.train_cfg``), so the first ratio is exactly 1.

Logged (tensorboard and ``metrics.jsonl``): ``reward/mean``, ``reward/std``, ``reward/nan_count``,
``rewards/<term>/mean``, ``rewards/eval/mean`` (the held-out reward on the same rollouts),
``val/...`` (deterministic samples of fixed validation prompts and seeds), ``advantage/abs_mean``,
``policy/ratio_dev_first`` (max |ρ − 1| before the epoch's first update: 0), ``policy/logprob_recompute_err``
(max |recomputed − recorded log-prob| before that update: float noise, ~1e-7, if recomputation matches
sampling), ``policy/clipfrac``, ``policy/approx_kl``, ``kl``, ``loss``, ``grad_norm``, ``lr``,
``time/rollout_s``, ``time/train_s``, ``rollout/images_per_s``. Contact sheets of a few groups go to
``samples/`` every `method.contact_sheet_every` epochs.

Example:
    >>> cfg = load_config(PolicyGradientConfig, "configs/tiny/rl_ddpo.yaml")
    >>> summary = PolicyGradientTrainer(cfg).train()
    >>> summary["lora"]      # .../pytorch_lora_weights.safetensors, for pipe.load_lora_weights(dir)
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reward_plugins.base import RewardModel

from ..configs import save_config
from ..monitor import MonitorHook, MonitorSection, check_monitor, image_embedder, weights_saver
from ..pipelines import PromptEmbeds
from ..plots import plot_metrics
from ..policy_losses import PerPromptStatTracker, group_advantages, ppo_clip_loss
from ..sampling_logprob import (
    Trajectory,
    check_noise_block,
    denoiser_predictor,
    gaussian_kl,
    make_sampler,
    rollout,
    transition,
)
from .common import (
    JsonlLogger,
    LoraSection,
    ModelSection,
    TrainSection,
    add_lora,
    build_adapter,
    build_pipeline,
    check_guidance_settings,
    check_sections,
    disabled_adapter,
    drop_log_rows_after,
    ema_weights,
    export_lora,
    freeze_pipeline,
    latest_checkpoint,
    log_scalars,
    make_accelerator,
    make_ema,
    mean_over_processes,
    progress_bar,
    read_checkpoint_state,
    read_jsonl,
    register_trainable_state_hooks,
    resume_tracker_kwargs,
    save_checkpoint,
    unwrap,
    weight_dtype_for,
)
from .reward_finetune import DataSection, RewardSection, _generator, as_composite, build_reward, read_prompts

METHODS = ("ddpo", "grpo")
ADVANTAGES = ("group", "running")
TRAIN_STEPS = ("all", "random", "window")
FLOW_KINDS = ("sde", "cps")
METRICS_FILE = "metrics.jsonl"
CURVES = ("reward/mean", "val/reward/mean", "rewards/eval/mean", "val/rewards/eval/mean")


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


@dataclass
class PolicySection:
    """The policy-gradient method.

    Attributes:
        name: ``ddpo`` (DDIM η > 0; SD 1.x/2.x, SDXL) or ``grpo`` (Flow-GRPO's SDE; SD3, FLUX).
        group_size: G, images per prompt per epoch (>= 2 for group advantages).
        prompts_per_epoch: prompts drawn (without replacement) per epoch, over all processes.
        advantage: ``group`` (GRPO: normalised within each prompt's G samples) or ``running`` (DDPO's
            per-prompt running statistics, `running_buffer_size` past rewards, batch statistics until
            a prompt has `running_min_count`).
        std_floor: advantages divide by max(std, std_floor).
        global_std: ``group`` advantages divide by the std of the whole epoch (Flow-GRPO's default).
        adv_clip_max: advantages are clipped to ±this (DDPO and Flow-GRPO: 5).
        clip_range: PPO's ε on the ratio (DDPO and Flow-GRPO: 1e-4).
        kl_weight: β of the KL to the reference policy (adapter disabled); 0 disables (Flow-GRPO: 0.04).
        inner_epochs: passes over each rollout buffer.
        train_steps: ``all``, ``random`` (a `timestep_fraction` of the steps per sample) or ``window``.
        timestep_fraction: share of the steps trained with ``random``.
        window_size, window_shift: ``window``: `window_size` consecutive steps starting at
            (epoch · window_shift) mod (N − window_size + 1).
        ode_outside_window: ``window``: sample the other steps deterministically (MixGRPO).
        train_cfg: classifier-free guidance in training as in sampling (False: conditional only).
        shared_noise: the G samples of a group start from the same noise and differ only by the sampler's
            step noise (DanceGRPO): the group's reward spread then comes from the steps the policy gradient
            credits, not from the starting noise, which no transition's log-prob explains.
        contact_sheet_every: write contact sheets every k epochs (0 disables).
        contact_sheet_prompts: groups per contact sheet round.
    """

    name: str = "ddpo"
    group_size: int = 8
    prompts_per_epoch: int = 4
    advantage: str = "group"
    std_floor: float = 1e-4
    global_std: bool = False
    running_buffer_size: int = 32
    running_min_count: int = 16
    adv_clip_max: float = 5.0
    clip_range: float = 1e-4
    kl_weight: float = 0.0
    inner_epochs: int = 1
    train_steps: str = "all"
    timestep_fraction: float = 1.0
    window_size: int = 2
    window_shift: int = 1
    ode_outside_window: bool = True
    train_cfg: bool = True
    shared_noise: bool = False
    contact_sheet_every: int = 0
    contact_sheet_prompts: int = 2


@dataclass
class PGSamplingSection:
    """How rollouts are drawn.

    Attributes:
        num_steps: sampling steps N (DDPO: 50; Flow-GRPO trains with 10).
        eval_num_steps: steps of the deterministic validation samples (None: `num_steps`;
            Flow-GRPO evaluates with 40).
        guidance_scale: classifier-free guidance (<= 1 disables it; FLUX-dev: its distilled guidance).
        eta: DDIM's η for ``ddpo`` (1.0 = DDPM's variance).
        noise_level: the flow SDE's `a` (Flow-GRPO: 0.7) or CPS's η.
        flow_kind: ``sde`` (Flow-GRPO) or ``cps`` (coefficients-preserving sampling).
        noise_block: block exploration noise, an opt-in variance reduction (both methods, every step
            rule): f > 1 draws each stochastic step's noise at latent resolution h/f x w/f and
            nearest-upsamples it, so every element keeps its std but the noise has k = C·h·w/f² dimensions,
            and the log-probs (rollout, ratio, KL) are those of the f x f block means. It lowers the D in the
            score-function ceiling 1/(1 + D/G) by f²; its bias: the within-block detail of the transition
            mean gets no gradient. 1 (default) is the ordinary per-element noise. Must divide the latent
            height and width.
        batch_size: rollout images per process per denoising batch.
        reward_batch_size: images per reward call.
    """

    num_steps: int = 50
    eval_num_steps: int | None = None
    guidance_scale: float = 5.0
    eta: float = 1.0
    noise_level: float = 0.7
    flow_kind: str = "sde"
    noise_block: int = 1
    batch_size: int = 8
    reward_batch_size: int = 16


@dataclass
class PolicyGradientConfig:
    """Everything `PolicyGradientTrainer` needs; YAML sections mirror the fields.

    Example:
        >>> cfg = load_config(PolicyGradientConfig, "configs/tiny/rl_ddpo.yaml", ["method.group_size=4"])
    """

    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    method: PolicySection = field(default_factory=PolicySection)
    sampling: PGSamplingSection = field(default_factory=PGSamplingSection)
    reward: RewardSection = field(default_factory=RewardSection)
    eval_reward: RewardSection | None = None
    data: DataSection = field(default_factory=DataSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)


def _choice(value, options, key: str) -> None:
    if value not in options:
        raise ValueError(f"{key} must be one of {options}; got {value!r}.")


def check_policy(method: PolicySection, sampling: PGSamplingSection, num_prompts: int | None = None) -> None:
    """Validate the method and sampling sections (and the prompt count) before anything is built.

    Raises:
        ValueError: naming the key, the value received and the fix.
    """
    _choice(method.name, METHODS, "method.name")
    _choice(method.advantage, ADVANTAGES, "method.advantage")
    _choice(method.train_steps, TRAIN_STEPS, "method.train_steps")
    _choice(sampling.flow_kind, FLOW_KINDS, "sampling.flow_kind")
    for key, sec in (("method.group_size", method), ("method.prompts_per_epoch", method),
                     ("method.inner_epochs", method), ("sampling.num_steps", sampling),
                     ("sampling.batch_size", sampling), ("sampling.reward_batch_size", sampling)):
        v = getattr(sec, key.split(".")[1])
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{key} must be a positive integer; got {v!r}.")
    check_noise_block(sampling.noise_block, key="sampling.noise_block")
    if method.group_size == 1 and method.advantage == "group":
        raise ValueError(
            "method.group_size is 1: a group-relative advantage compares the G samples of one prompt, so a "
            "group of 1 always gives 0 and nothing is learned. Use method.group_size >= 2 (Flow-GRPO: 24), "
            "or method.advantage=running (DDPO's per-prompt running statistics) to keep one sample per prompt."
        )
    if not method.clip_range > 0:
        raise ValueError(f"method.clip_range must be > 0 (PPO's ε; DDPO uses 1e-4); got {method.clip_range}.")
    if not method.adv_clip_max > 0:
        raise ValueError(f"method.adv_clip_max must be > 0; got {method.adv_clip_max}.")
    if not method.std_floor > 0:
        raise ValueError(f"method.std_floor must be > 0; got {method.std_floor}.")
    if method.kl_weight < 0:
        raise ValueError(f"method.kl_weight must be >= 0; got {method.kl_weight}.")
    if not 0 < method.timestep_fraction <= 1:
        raise ValueError(f"method.timestep_fraction must be in (0, 1]; got {method.timestep_fraction}.")
    n = sampling.num_steps
    if method.train_steps == "window" and not 1 <= method.window_size <= n:
        raise ValueError(f"method.window_size must be in [1, sampling.num_steps={n}]; got {method.window_size}.")
    if method.window_shift < 0:
        raise ValueError(f"method.window_shift must be >= 0; got {method.window_shift}.")
    if method.running_buffer_size < 1 or method.running_min_count < 1:
        raise ValueError("method.running_buffer_size and method.running_min_count must be >= 1.")
    if method.contact_sheet_every < 0 or method.contact_sheet_prompts < 0:
        raise ValueError("method.contact_sheet_every and method.contact_sheet_prompts must be >= 0.")
    if sampling.eval_num_steps is not None and sampling.eval_num_steps < 1:
        raise ValueError(f"sampling.eval_num_steps must be >= 1 or null; got {sampling.eval_num_steps}.")
    if method.name == "ddpo" and not sampling.eta > 0:
        raise ValueError(f"sampling.eta must be > 0 for ddpo (a deterministic DDIM step has no log-prob); got {sampling.eta}.")
    if method.name == "grpo" and not sampling.noise_level > 0:
        raise ValueError(f"sampling.noise_level must be > 0 for grpo (Flow-GRPO: 0.7); got {sampling.noise_level}.")
    if method.name == "grpo" and sampling.flow_kind == "cps" and sampling.noise_level > 1:
        raise ValueError(f"sampling.noise_level is CPS's η in (0, 1]; got {sampling.noise_level}.")
    if num_prompts is not None and num_prompts < method.prompts_per_epoch:
        raise ValueError(
            f"the prompt list has {num_prompts} prompt(s) but method.prompts_per_epoch={method.prompts_per_epoch} "
            "distinct prompts are drawn per epoch (each sampled method.group_size times). Add prompts or lower "
            f"method.prompts_per_epoch to <= {num_prompts}."
        )


# ---------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """This process's share of one epoch's samples."""

    traj: Trajectory
    prompt_ids: torch.Tensor  # (n,) index into the trainer's prompt list
    groups: torch.Tensor  # (n,) group index within the epoch
    rewards: torch.Tensor  # (n,) (NaN where the reward failed)
    images: torch.Tensor  # (n, 3, H, W) on CPU, for contact sheets
    stats: dict


class PolicyGradientTrainer:
    """DDPO / Flow-GRPO with accelerate + peft.

    Args:
        config: the full config.
        reward: a ready reward instead of building ``config.reward`` (any `RewardModel`, differentiable or not).
        eval_reward: a ready held-out evaluation reward instead of ``config.eval_reward``.
        output_dir: overrides ``config.train.output_dir``.
        pipe: an already built pipeline of a supported family (its denoiser is trained in place).

    Raises:
        ValueError: an invalid setting, a method that does not fit the pipeline family, or too few prompts.

    Example:
        >>> trainer = PolicyGradientTrainer(load_config(PolicyGradientConfig, "configs/tiny/rl_ddpo.yaml"))
        >>> trainer.train(resume=False)
    """

    def __init__(
        self,
        config: PolicyGradientConfig,
        reward: RewardModel | None = None,
        eval_reward: RewardModel | None = None,
        output_dir: str | None = None,
        pipe=None,
    ) -> None:
        self.cfg = config
        m, s = config.method, config.sampling
        self.output_dir = Path(output_dir or config.train.output_dir)
        check_sections(config.model, config.lora, config.train, need_pipeline=pipe is None)
        self.prompts = read_prompts(config.data.prompts, config.data.prompts_file, "data.prompts")
        if not self.prompts:
            raise ValueError("no training prompts: set data.prompts (a list) or data.prompts_file.")
        check_policy(m, s, len(self.prompts))
        check_monitor(config.monitor)
        self.val_prompts = read_prompts(config.data.val_prompts, config.data.val_prompts_file, "data.val_prompts") or self.prompts[:8]

        self.accelerator = make_accelerator(config.train, self.output_dir)
        from accelerate.utils import DistributedType

        if getattr(config.train, "distributed", "auto") == "fsdp" or self.accelerator.distributed_type == DistributedType.FSDP:
            # Rollouts call the denoiser outside the prepared module, which a sharded (FSDP) one does not allow.
            raise ValueError("the policy-gradient trainer runs several processes with DDP only; got FSDP "
                             "(train.distributed=fsdp or accelerate launch --use_fsdp). Use train.distributed=auto "
                             "and launch without --use_fsdp.")
        acc = self.accelerator
        total = m.prompts_per_epoch * m.group_size
        if total % acc.num_processes:
            raise ValueError(
                f"method.prompts_per_epoch * method.group_size = {total} samples per epoch do not split evenly over "
                f"{acc.num_processes} processes; make it a multiple of the process count."
            )
        self.per_process = total // acc.num_processes
        device = acc.device
        self.reward = as_composite(reward) if reward is not None else build_reward(config.reward, device)
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
        self.adapter = build_adapter(pipe, config.model)
        check_guidance_settings(self.adapter, {"sampling.guidance_scale": s.guidance_scale})
        is_flow = bool(getattr(self.adapter, "is_flow", False))
        if m.name == "ddpo" and is_flow:
            raise ValueError(
                f"method ddpo samples with DDIM, which needs an epsilon/v-prediction model; {self.adapter.family} is a "
                "flow-matching family: use method.name=grpo (Flow-GRPO's SDE)."
            )
        if m.name == "grpo" and not is_flow:
            raise ValueError(
                f"method grpo uses the flow SDE of rectified-flow models; {self.adapter.family} predicts epsilon/v: "
                "use method.name=ddpo (DDIM with eta > 0)."
            )
        if self.weight_dtype == torch.float16 and pipe.vae.dtype != torch.float32:
            pipe.vae.to(dtype=torch.float32)
        self.resolution = config.model.resolution or self.adapter.default_resolution
        noise = s.eta if m.name == "ddpo" else s.noise_level
        check_noise_block(s.noise_block, self._latent_shape(), "sampling.noise_block")
        # rollouts and the ratio's recomputation both go through self.sampler, so both use the block rule
        self.sampler = make_sampler(self.adapter, s.num_steps, noise, s.flow_kind, self.resolution, s.noise_block)
        self.eval_sampler = make_sampler(self.adapter, s.eval_num_steps or s.num_steps, noise, s.flow_kind, self.resolution)
        self.has_noise = self._noisy_steps(self.sampler)
        if not bool(self.has_noise.any()):
            raise ValueError("no sampling step is stochastic with these settings; raise sampling.eta / noise_level.")

        denoiser = self.adapter.denoiser
        self.base_model = None
        if config.lora.enabled:
            self.params = add_lora(denoiser, config.lora, seed=config.train.seed)
        else:
            denoiser.float().requires_grad_(True)
            self.params = [p for p in denoiser.parameters() if p.requires_grad]
            if m.kl_weight > 0:  # full fine-tuning has no adapter to switch off: an explicit frozen copy
                self.base_model = copy.deepcopy(denoiser).requires_grad_(False).to(self.weight_dtype)
        if config.train.gradient_checkpointing and hasattr(denoiser, "enable_gradient_checkpointing"):
            denoiser.enable_gradient_checkpointing()
        from diffusers.optimization import get_scheduler

        t = config.train
        self.optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay
        )
        micro = math.ceil(self.per_process / t.batch_size)
        self.updates_per_epoch = m.inner_epochs * math.ceil(micro / t.gradient_accumulation_steps)
        self.lr_scheduler = get_scheduler(
            t.lr_scheduler, self.optimizer, num_warmup_steps=t.lr_warmup_steps,
            num_training_steps=t.max_steps * self.updates_per_epoch,
        )
        register_trainable_state_hooks(acc)
        self.wrapped, self.optimizer = acc.prepare(denoiser, self.optimizer)
        acc.register_for_checkpointing(self.lr_scheduler)
        # train.ema_decay > 0: an EMA of the trained weights for validation and the export; rollouts and the
        # ratio always use the current policy (Flow-GRPO evaluates its EMA the same way)
        self.ema = make_ema(acc, self.params, t)
        # `self.wrapped` is the prepared module (DDP under several processes): the training calls go through it,
        # so DDP reduces the gradients in each update's one synchronised backward. `self.model` is the inner
        # module, for calls without gradients (rollouts, validation, the adapter-disabled reference) and export.
        self.model = unwrap(self.wrapped)
        self.tracker = PerPromptStatTracker(m.running_buffer_size, m.running_min_count, m.std_floor)
        self.logger = JsonlLogger(self.output_dir / METRICS_FILE, enabled=acc.is_main_process)
        # Reward-hacking monitor at every validation (embedding diversity in the reward's own image space).
        self.monitor = MonitorHook(config.monitor, self.output_dir, acc, embed=image_embedder(self.reward))
        self._val_batch: tuple[torch.Tensor, list[str], list[int]] | None = None
        self.epoch = 0
        self.nan_total = 0

    # -- pieces ------------------------------------------------------------------------------------------
    @staticmethod
    def _noisy_steps(sampler) -> torch.Tensor:
        """(N,) bool: steps whose transition has a positive std (CPS's and some DDIM last steps have none)."""
        f = getattr(sampler, "noise_block", 1)
        x = torch.zeros(1, 1, f, f)
        out = []
        for i in range(sampler.num_steps):
            st = sampler.step(torch.zeros_like(x), torch.tensor([i]), x, sampler.noise, prev_sample=x)
            out.append(bool((st.std > 0).all()))
        return torch.tensor(out)

    def _encode(self, prompts: list[str]) -> tuple[PromptEmbeds, PromptEmbeds | None]:
        cond = self.adapter.encode_prompts(prompts, self.resolution)
        g = self.cfg.sampling.guidance_scale
        cond = self.adapter.with_guidance(cond, g)
        uncond = self.adapter.negative_embeds(cond) if (g > 1 and self.adapter.uses_cfg) else None
        return cond, uncond

    def _predictor(self, model, cond, uncond, cfg: bool = True):
        g = self.cfg.sampling.guidance_scale if cfg else 1.0
        return denoiser_predictor(self.adapter, model, cond, uncond if cfg else None, g, self.accelerator.autocast)

    def _latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.adapter.vae_scale
        return self.adapter.latent_channels, side, side

    def _stochastic_mask(self, epoch: int) -> torch.Tensor:
        m, n = self.cfg.method, self.sampler.num_steps
        mask = self.has_noise.clone()
        if m.train_steps == "window" and m.ode_outside_window:
            window = torch.zeros(n, dtype=torch.bool)
            start = self._window_start(epoch)
            window[start:start + m.window_size] = True
            mask &= window
        return mask

    def _window_start(self, epoch: int) -> int:
        m, n = self.cfg.method, self.sampler.num_steps
        return (epoch * m.window_shift) % (n - m.window_size + 1)

    def _trained_steps(self, epoch: int, count: int, gen: torch.Generator) -> torch.Tensor:
        """(count, K) step indices trained per sample this epoch."""
        m = self.cfg.method
        usable = torch.nonzero(self._stochastic_mask(epoch)).flatten()
        if m.train_steps == "window":
            start = self._window_start(epoch)
            usable = usable[(usable >= start) & (usable < start + m.window_size)]
        if usable.numel() == 0:
            raise ValueError(
                f"epoch {epoch}: no stochastic step to train in the chosen steps (method.train_steps={m.train_steps}); "
                "widen the window or use train_steps=all."
            )
        if m.train_steps != "random":
            return usable.expand(count, -1).clone()
        k = max(1, int(m.timestep_fraction * usable.numel()))
        return torch.stack([usable[torch.randperm(usable.numel(), generator=gen)[:k]] for _ in range(count)])

    def _start_seed(self, epoch: int, k: int) -> torch.Generator:
        """The generator of sample `k`'s starting noise in `epoch` (its group's with ``method.shared_noise``)."""
        if self.cfg.method.shared_noise:
            return _generator(self.cfg.train.seed, epoch, k // self.cfg.method.group_size, 1, 2)
        return _generator(self.cfg.train.seed, epoch, k, 0, 2)

    def _epoch_prompts(self, epoch: int) -> list[int]:
        g = _generator(self.cfg.train.seed, epoch, 0, 0, 1)  # the same on every process
        return torch.randperm(len(self.prompts), generator=g)[: self.cfg.method.prompts_per_epoch].tolist()

    @torch.no_grad()
    def _score(self, images: torch.Tensor, prompts: list[str], reward) -> tuple[torch.Tensor, dict]:
        """Scores in batches; a failing batch or a non-finite score becomes NaN for those samples only."""
        bs = self.cfg.sampling.reward_batch_size
        scores, per_dim = [], {}
        for i in range(0, images.shape[0], bs):
            out = reward.score(images[i:i + bs], prompts[i:i + bs])
            scores.append(out.scores.float().cpu())
            for k, v in out.per_dim.items():
                per_dim.setdefault(k, []).append(v.float().cpu())
        return torch.cat(scores), {k: torch.cat(v) for k, v in per_dim.items()}

    # -- rollout -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_epoch(self, epoch: int) -> Rollout:
        """This process's share of the epoch's rollouts, scored."""
        acc, s, m = self.accelerator, self.cfg.sampling, self.cfg.method
        tic = time.perf_counter()
        chosen = self._epoch_prompts(epoch)
        start = acc.process_index * self.per_process
        flat = list(range(start, start + self.per_process))
        groups = torch.tensor([k // m.group_size for k in flat])
        prompt_ids = torch.tensor([chosen[k // m.group_size] for k in flat])
        mask = self._stochastic_mask(epoch)
        trajs, images = [], []
        self.model.eval()
        for b0 in range(0, len(flat), s.batch_size):
            idx = flat[b0:b0 + s.batch_size]
            prompts = [self.prompts[chosen[k // m.group_size]] for k in idx]
            cond, uncond = self._encode(prompts)
            # starting noise per sample index (or per group with shared_noise): the same samples whatever the
            # batch split
            x0 = torch.cat([torch.randn(1, *self._latent_shape(), generator=self._start_seed(epoch, k))
                            for k in idx]).to(acc.device)
            # step noise seeded by the batch's first global sample index: with batches that align, the rollouts
            # do not depend on the number of processes
            gen = _generator(self.cfg.train.seed, epoch, idx[0], 0, 3)
            traj = rollout(self.sampler, self._predictor(self.model, cond, uncond), x0, gen, stochastic=mask)
            trajs.append(traj)
            images.append(self.adapter.decode(traj.final).float())
        traj = Trajectory(torch.cat([t.latents for t in trajs]), torch.cat([t.log_probs for t in trajs]), mask)
        images = torch.cat(images)
        prompts = [self.prompts[i] for i in prompt_ids.tolist()]
        rollout_s = time.perf_counter() - tic
        rewards, per_dim = self._score(images, prompts, self.reward)
        stats = {f"rewards/{k}/mean": float(v[torch.isfinite(v)].mean()) for k, v in per_dim.items()
                 if k != "composite" and bool(torch.isfinite(v).any())}
        if self.eval_reward is not None:
            ev, ev_dims = self._score(images, prompts, self.eval_reward)
            if bool(torch.isfinite(ev).any()):
                stats["rewards/eval/mean"] = float(ev[torch.isfinite(ev)].mean())
        stats["time/rollout_s"] = rollout_s
        stats["rollout/images_per_s"] = len(flat) / max(rollout_s, 1e-9)
        stats["diversity/pixel_std"] = float(images.std(0).mean()) if images.shape[0] > 1 else 0.0
        return Rollout(traj, prompt_ids, groups, rewards, images.cpu(), stats)

    def advantages(self, ro: Rollout) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """(advantages, scalars, valid) of this process's samples, the advantages computed over the samples
        of every process (gathered), so a group split across processes is normalised as one."""
        acc, m = self.accelerator, self.cfg.method
        dev = acc.device
        rewards = acc.gather(ro.rewards.to(dev).float()).cpu()
        groups = acc.gather(ro.groups.to(dev)).cpu()
        pids = acc.gather(ro.prompt_ids.to(dev)).cpu()
        valid = torch.isfinite(rewards)
        if m.advantage == "group":
            adv = group_advantages(rewards, groups, valid, m.std_floor, m.global_std)
        else:
            adv = self.tracker.update([self.prompts[i] for i in pids.tolist()], rewards, valid)
        nan = int((~valid).sum())
        ok = rewards[valid]
        stats = {
            "reward/mean": float(ok.mean()) if ok.numel() else float("nan"),
            "reward/std": float(ok.std(unbiased=False)) if ok.numel() else float("nan"),
            "reward/nan_count": nan,
            "advantage/abs_mean": float(adv[valid].abs().mean()) if ok.numel() else 0.0,
        }
        stds = [float(rewards[(groups == g) & valid].std(unbiased=False)) for g in torch.unique(groups)
                if int(((groups == g) & valid).sum()) >= 2]
        stats["reward/zero_std_groups"] = sum(sd < m.std_floor for sd in stds) / max(len(stds), 1)
        lo = acc.process_index * self.per_process
        return adv[lo:lo + self.per_process], stats, valid[lo:lo + self.per_process]

    # -- training ----------------------------------------------------------------------------------------
    def _reference_mean(self, x, nxt, step, cond, uncond, cfg):
        with torch.no_grad():
            if self.base_model is not None:
                return transition(self.sampler, self._predictor(self.base_model, cond, uncond, cfg), x, nxt, step).mean
            with disabled_adapter(self.model):
                return transition(self.sampler, self._predictor(self.model, cond, uncond, cfg), x, nxt, step).mean

    def _update(self) -> float:
        """Clip, step, schedule and EMA after an update's backwards (DDP reduced the gradients in the last one)."""
        t = self.cfg.train
        grad_norm = self.accelerator.clip_grad_norm_(self.params, t.max_grad_norm if t.max_grad_norm else math.inf)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return float(grad_norm)

    def train_on(self, ro: Rollout, adv: torch.Tensor, valid: torch.Tensor, epoch: int) -> dict:
        """The inner epochs over one rollout buffer; returns this process's scalars.

        Every process walks all its samples in the same number of micro-batches and updates (samples whose
        reward failed stay in the batches with weight 0), so each update is one synchronised backward on every
        process: the update's other backwards (one per trained step per micro-batch) run under `no_sync`, and
        the last one, through the prepared (DDP) module, all-reduces the accumulated sum. The gradient is the
        mean over the trained steps and over the valid samples of each micro-batch, averaged over processes.
        """
        acc, t, m = self.accelerator, self.cfg.train, self.cfg.method
        tic = time.perf_counter()
        n = valid.numel()
        sums: dict[str, float] = {}
        n_terms = 0
        first_dev = first_err = 0.0
        updated = False
        grad_norms = []
        self.wrapped.train()
        gen = _generator(t.seed, epoch, acc.process_index, 0, 4)
        for _inner in range(m.inner_epochs):
            order = torch.randperm(n, generator=gen)
            steps_all = self._trained_steps(epoch, n, gen)
            batches = [order[i:i + t.batch_size] for i in range(0, n, t.batch_size)]
            for a0 in range(0, len(batches), t.gradient_accumulation_steps):
                group = batches[a0:a0 + t.gradient_accumulation_steps]
                total = len(group) * steps_all.shape[1]  # backwards in this update; the last one syncs
                done = 0
                for bi, rows in enumerate(group):
                    pos = a0 + bi
                    steps = steps_all[pos * t.batch_size: pos * t.batch_size + rows.numel()]
                    prompts = [self.prompts[i] for i in ro.prompt_ids[rows].tolist()]
                    cond, uncond = self._encode(prompts)
                    # calls with gradients go through the prepared module, so DDP's hooks reduce them
                    predict = self._predictor(self.wrapped, cond, uncond, m.train_cfg)
                    rows_d = rows.to(acc.device)
                    weight = valid[rows].to(acc.device).float()
                    weight = weight / weight.sum().clamp(min=1.0)  # mean over the micro-batch's valid samples
                    a = torch.where(valid[rows], adv[rows], torch.zeros_like(adv[rows])).to(acc.device)
                    scale = 1.0 / (len(group) * steps.shape[1])
                    for j in range(steps.shape[1]):
                        done += 1
                        sync = contextlib.nullcontext() if done == total else acc.no_sync(self.wrapped)
                        with sync:
                            st = steps[:, j].to(acc.device)
                            x = ro.traj.latents[rows_d, st]
                            nxt = ro.traj.latents[rows_d, st + 1]
                            old = ro.traj.log_probs[rows_d, st]
                            out = transition(self.sampler, predict, x, nxt, st)
                            if not updated:
                                # The policy has not changed since sampling, so its log-prob is the old one: the
                                # ratio is exactly 1 (the recorded value differs only by float noise of other
                                # batch layouts, ~1e-7, which is logged as a check of the recomputation).
                                first_err = max(first_err, float((out.log_prob.detach() - old).abs().max()))
                                old = out.log_prob.detach()
                            loss, pst = ppo_clip_loss(out.log_prob, old, a, m.clip_range, m.adv_clip_max,
                                                      weights=weight)
                            if m.kl_weight > 0:
                                ref = self._reference_mean(x, nxt, st, cond, uncond, m.train_cfg)
                                kl = (gaussian_kl(out.mean, ref, out.std, self.sampler.noise_block) * weight).sum()
                                loss = loss + m.kl_weight * kl
                                sums["kl"] = sums.get("kl", 0.0) + float(kl.detach())
                            acc.backward(loss * scale * t.gradient_accumulation_steps)  # accelerate divides by it
                        if not updated:
                            first_dev = max(first_dev, float((pst["ratio"] - 1).abs().max()))
                        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                        sums["policy/clipfrac"] = sums.get("policy/clipfrac", 0.0) + float(pst["clipfrac"])
                        sums["policy/approx_kl"] = sums.get("policy/approx_kl", 0.0) + float(pst["approx_kl"])
                        sums["policy/ratio_mean"] = sums.get("policy/ratio_mean", 0.0) + float(pst["ratio"].mean())
                        n_terms += 1
                grad_norms.append(self._update())
                updated = True
        stats = {k: v / max(n_terms, 1) for k, v in sums.items()}
        stats["policy/ratio_dev_first"] = first_dev
        stats["policy/logprob_recompute_err"] = first_err
        stats["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        stats["lr"] = self.lr_scheduler.get_last_lr()[0]
        stats["time/train_s"] = time.perf_counter() - tic
        return stats

    # -- validation and pictures ------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Training and evaluation rewards of deterministic samples (η = 0 / the ODE) of the validation
        prompts with fixed seeds (`val/...`), with the EMA weights when ``train.ema_decay`` is set."""
        with ema_weights(self.ema):
            return self._validate()

    def _validate(self) -> dict:
        acc = self.accelerator
        rank, world = acc.process_index, acc.num_processes
        mine = list(range(rank, len(self.val_prompts), world))
        sums = {"val/reward/mean": 0.0}
        if self.eval_reward is not None:
            sums["val/rewards/eval/mean"] = 0.0
        count = 0
        was = self.model.training
        self.model.eval()
        bs = self.cfg.sampling.batch_size
        kept: list[torch.Tensor] = []  # this process's images, for the monitor
        for b0 in range(0, len(mine), bs):
            idx = mine[b0:b0 + bs]
            prompts = [self.val_prompts[i] for i in idx]
            cond, uncond = self._encode(prompts)
            x0 = torch.cat([torch.randn(1, *self._latent_shape(), generator=_generator(self.cfg.train.seed, 10**6 + i))
                            for i in idx]).to(acc.device)
            off = torch.zeros(self.eval_sampler.num_steps, dtype=torch.bool)
            traj = rollout(self.eval_sampler, self._predictor(self.model, cond, uncond), x0, stochastic=off)
            images = self.adapter.decode(traj.final).float()
            r, _ = self._score(images, prompts, self.reward)
            sums["val/reward/mean"] += float(torch.nan_to_num(r).sum())
            if self.eval_reward is not None:
                e, _ = self._score(images, prompts, self.eval_reward)
                sums["val/rewards/eval/mean"] += float(torch.nan_to_num(e).sum())
            count += len(idx)
            kept.append(images.detach().float().cpu())
        keys = sorted(sums)
        vec = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=acc.device)
        vec = acc.reduce(vec, reduction="sum")
        self.model.train(was)
        self._val_batch = (torch.cat(kept) if kept else torch.zeros(0, 3, 1, 1), [self.val_prompts[i] for i in mine], mine)
        return {k: float(vec[i] / max(float(vec[-1]), 1)) for i, k in enumerate(keys)}

    def _contact_sheets(self, ro: Rollout, adv: torch.Tensor, epoch: int) -> None:
        from ..report import contact_sheet

        m = self.cfg.method
        out = self.output_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        for g in torch.unique(ro.groups)[: m.contact_sheet_prompts].tolist():
            rows = torch.nonzero(ro.groups == g).flatten()
            prompt = self.prompts[int(ro.prompt_ids[rows[0]])]
            sheet = contact_sheet(
                ro.images[rows], prompt,
                {"reward": ro.rewards[rows].tolist(), "advantage": adv[rows].tolist()},
                header=f"{m.name} epoch {epoch}, group {g} (G={m.group_size})",
                selected=[int(torch.nan_to_num(ro.rewards[rows], nan=-math.inf).argmax())], cell=128,
            )
            sheet.save(out / f"epoch-{epoch:05d}-group-{g}.png")

    # -- the loop ----------------------------------------------------------------------------------------
    def train_epoch(self) -> dict:
        """One epoch: rollout, rewards, advantages, inner epochs. Returns the scalars (mean over processes)."""
        m = self.cfg.method
        epoch = self.epoch
        ro = self.sample_epoch(epoch)
        adv, adv_stats, valid = self.advantages(ro)
        self.nan_total += int(adv_stats["reward/nan_count"])
        if m.contact_sheet_every and epoch % m.contact_sheet_every == 0 and self.accelerator.is_main_process:
            self._contact_sheets(ro, adv, epoch)
        if int(valid.sum()) == 0:
            raise RuntimeError(
                f"epoch {epoch}: every reward of this process was NaN or infinite; nothing to train on. "
                "Check the reward (reward/nan_count counts the failures)."
            )
        scalars = {**ro.stats, **self.train_on(ro, adv, valid, epoch)}
        scalars = self._mean_over_processes(scalars)
        scalars.update(adv_stats)  # already over every process
        scalars["reward/nan_total"] = self.nan_total
        self.epoch += 1
        return scalars

    def train(self, resume: bool = False) -> dict:
        """Run to ``train.max_steps`` epochs; returns a summary (epochs, LoRA path, first/last log rows).

        Args:
            resume: continue from the newest complete checkpoint under the output dir, exactly: the same
                prompts, noise, advantages (running statistics included) and updates as an uninterrupted run.
        """
        acc, t = self.accelerator, self.cfg.train
        self.output_dir.mkdir(parents=True, exist_ok=True)
        found = latest_checkpoint(self.output_dir) if resume else None
        if found is not None:
            path, self.epoch = found
            acc.load_state(str(path))
            state = read_checkpoint_state(path)
            self.tracker.load_state_dict(state.get("tracker", {}))
            self.nan_total = int(state.get("nan_total", 0))
            if acc.is_main_process:  # rows the interrupted run logged after its checkpoint are logged again
                drop_log_rows_after(self.logger.path, self.epoch)
            self.monitor.resume(self.epoch)
        else:
            if acc.is_main_process:
                if self.logger.path.exists():
                    self.logger.path.unlink()
                save_config(self.cfg, self.output_dir / "config.yaml")
        if acc.is_main_process and t.report_to == "tensorboard" and acc.log_with:
            acc.init_trackers("policy_gradient", init_kwargs=resume_tracker_kwargs(self.epoch))
        if self.epoch == 0 and t.validate_every:
            val = self.validate()
            self._log({**val, **self._observe(val)}, 0)
        bar = progress_bar(acc, t.max_steps, self.epoch, desc=f"{self.cfg.method.name} epochs")
        while self.epoch < t.max_steps:
            scalars = self.train_epoch()
            self.monitor.record_training(scalars)
            if (t.validate_every and self.epoch % t.validate_every == 0) or (t.validate_every and self.epoch == t.max_steps):
                val = self.validate()
                scalars.update(val)
                scalars.update(self._observe(val))
            stop = self.monitor.should_stop()  # on_alarm: stop ends the run at this validation
            if t.log_every and (self.epoch % t.log_every == 0 or self.epoch == t.max_steps or stop):
                self._log(scalars, self.epoch)
            if (t.save_every and self.epoch % t.save_every == 0) or self.epoch == t.max_steps or stop:
                save_checkpoint(acc, self.output_dir, self.epoch, t.checkpoints_total_limit,
                                {"tracker": self.tracker.state_dict(), "nan_total": self.nan_total})
            bar.update(1)
            bar.set_postfix(reward=f"{scalars.get('reward/mean', float('nan')):.3f}")
            if stop:
                break
        bar.close()
        lora_path = None
        acc.wait_for_everyone()
        if acc.is_main_process:
            with ema_weights(self.ema):  # with train.ema_decay the exported model is the EMA
                if self.cfg.lora.enabled:
                    lora_path = export_lora(self.pipe, self.model, self.output_dir)
                else:
                    self.model.save_pretrained(self.output_dir / self.adapter.denoiser_attr)
        acc.end_training()
        if acc.is_main_process:
            plot_metrics(self.logger.path, CURVES, self.output_dir / "curves.png", title=f"policy gradient ({self.cfg.method.name})",
                        markers=self.monitor.markers())
        rows = read_jsonl(self.logger.path)
        summary = {"epochs": self.epoch, "lora": str(lora_path) if lora_path else None, "output_dir": str(self.output_dir),
                   "metrics": str(self.logger.path), "nan_rewards": self.nan_total,
                   "first": rows[0] if rows else {}, "last": rows[-1] if rows else {}, "monitor": self.monitor.finish()}
        if acc.is_main_process:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _observe(self, val: dict) -> dict:
        """The monitor's signals for the validation just run (its images; `best/` when the held-out score improves)."""
        images, prompts, index = self._val_batch
        save = weights_saver(self.pipe, self.model, self.ema, lora=self.cfg.lora.enabled, full_dir=self.adapter.denoiser_attr)
        return self.monitor.on_validation(self.epoch, val, images, prompts, index, save_best=save)

    def _mean_over_processes(self, scalars: dict) -> dict:
        return mean_over_processes(self.accelerator, scalars)

    def _log(self, scalars: dict, step: int) -> None:
        log_scalars(self.accelerator, self.logger, self.cfg.train.report_to, scalars, step)


def train_rl(config: PolicyGradientConfig, output_dir: str | None = None, resume: bool = False, **kwargs) -> dict:
    """Build a `PolicyGradientTrainer` and train; see its docstring.

    Example:
        >>> train_rl(load_config(PolicyGradientConfig, "configs/tiny/rl_ddpo.yaml"), "outputs/ddpo")
    """
    return PolicyGradientTrainer(config, output_dir=output_dir, **kwargs).train(resume=resume)
