"""Diffusion-DPO (Wallace et al., CVPR 2024) on Pick-a-Pic-format preference pairs, with accelerate and peft.

Each step encodes the winner and loser images of a pair with the VAE, draws ONE noise and ONE timestep
for the pair, and compares the trained UNet's denoising error on both with the frozen reference's
(`alignment.losses.diffusion_dpo_loss`). With LoRA the reference is the same UNet with the adapter
disabled (no second UNet in memory); full fine-tuning keeps an explicit frozen copy.

Data: parquet files (or dirs of shards) or a `datasets` source with the Pick-a-Pic columns ``caption``,
``jpg_0``, ``jpg_1`` (encoded image bytes) and ``label_0`` (1 → image 0 wins, 0 → image 1 wins,
0.5 → tie). Ties carry no preference and are skipped (``data.ties: skip``, counted in the log) or
rejected (``data.ties: error``); other values are read as "image 0 wins when label_0 > 0.5".

Example:
    >>> from alignment.configs import load_config
    >>> cfg = load_config(DPOConfig, "configs/tiny/dpo.yaml", ["train.max_steps=20"])
    >>> result = train_dpo(cfg)
    >>> result.lora_path               # loads with pipe.load_lora_weights(result.output_dir)

Command line: ``reward-align train-dpo --config configs/sd15_lora_dpo.yaml [--resume]``; several GPUs:
``accelerate launch --num_processes 8 examples/train_dpo.py --config configs/sdxl_lora_dpo.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignment.configs import check_counts, count
from alignment.losses import DPO_LOSS_TYPES, diffusion_dpo_loss, guided_denoising_error, per_sample_mse
from alignment.monitor import MonitorHook, MonitorSection, check_monitor, image_embedder, weights_saver
from alignment.plots import plot_metrics
from alignment.trainers.common import (
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
    make_accelerator,
    make_ema,
    prepare_denoiser,
    progress_bar,
    register_trainable_state_hooks,
    resume_tracker_kwargs,
    save_checkpoint,
    trainable_parameters,
    unwrap,
    weight_dtype_for,
)
from alignment.trainers.dpo_data import (  # noqa: F401  (re-exported: the data API of the DPO trainer)
    IMAGE_COLUMNS,
    MICRO_MODES,
    PAIR_COLUMNS,
    RESIZE_FILTERS,
    PairDataset,
    PairIndex,
    PairSampler,
    PairSource,
    collate_pairs,
    index_pairs,
    make_synthetic_pairs,
    read_pair_source,
)

VALIDATE_MODES = ("header", "full", "none")
HFLIP_MODES = ("none", "image", "pair")


# Drawn into <output_dir>/curves.png (and the validation reward into val_reward.png) at the end of training.
CURVES = ("train/loss", "train/implicit_acc")


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


@dataclass
class DataSection:
    """Where the preference pairs come from.

    Attributes:
        path: parquet file(s) or dir(s) of ``*.parquet`` shards (searched recursively).
        dataset: a `datasets.load_dataset` source (hub id or local dir) with the same columns.
        split: the split of `dataset`.
        ties: ``"skip"`` pairs with label_0 == 0.5, or ``"error"`` on them.
        resize: resize (shorter side) and centre-crop every image to the training resolution; without
            it all images must already have one size (mixed sizes are an error).
        resize_filter: ``"bilinear"``: the official scripts' torchvision ``Resize(res)`` (bilinear) and
            ``CenterCrop(res)`` (offsets rounded); ``"bicubic"``: bicubic with floored offsets (this library's
            earlier default, kept so older runs resume alike).
        caption_dropout: the probability of training a pair on the empty caption (classifier-free guidance's
            unconditional branch): the official DiffusionDPO ``--proportion_empty_prompts``, 0.2 by default
            there; 0 disables. Seeded per micro-batch (exact resume).
        hflip: random horizontal flips, p = ½: ``"image"`` flips each image on its own (the official
            DiffusionDPO code, which transforms jpg_0 and jpg_1 separately), ``"pair"`` flips winner and
            loser together (diffusers' SDXL DPO script), ``"none"`` never.
        micro_conditioning: SDXL's (original size, crop) conditioning: ``"pair"`` gives both images jpg_0's
            (diffusers' SDXL DPO script), ``"constant"`` gives every image (res, res, 0, 0) (the official
            DiffusionDPO code), ``"image"`` gives each image its own, which lets the model tell winner from
            loser by size when pairs differ in size, a shortcut that does nothing at inference.
        validate: ``"header"`` reads every image header up front (size, format) before training starts,
            ``"full"`` decodes every image, ``"none"`` checks lazily (huge datasets).
        max_pairs: use only the first n usable pairs.
        synthetic_pairs: with no path/dataset, write this many synthetic pairs to
            ``<output_dir>/synthetic_pairs.parquet`` and train on them (tiny demo and tests).
    """

    path: str | list[str] | None = None
    dataset: str | None = None
    split: str = "train"
    ties: str = "skip"
    resize: bool = False
    validate: str = "header"
    max_pairs: int | None = count(None)
    synthetic_pairs: int = count(0, minimum=0)
    resize_filter: str = "bicubic"
    caption_dropout: float = 0.0
    hflip: str = "none"
    micro_conditioning: str = "pair"


@dataclass
class DPOSection:
    """The Diffusion-DPO objective.

    Attributes:
        beta: β, the KL strength, in this trainer's convention ``logits = −(β/2)·Δ`` (the official code
            and diffusers' SDXL script: 5000 for SDXL, 2000-5000 in the paper). diffusers' SD 1.5 script
            writes ``logits = −β·Δ`` without the ½, so its default β = 2500 is the same objective as 5000 here.
        loss_type: ``"sigmoid"`` (the paper), ``"hinge"`` or ``"ipo"`` (IPO's target 1/(2β) on the unscaled
            log-ratio difference logits/β, so its optimum is logits = ½; see `alignment.losses.diffusion_dpo_loss`).
        vae_sample: encode images with a sample of the VAE posterior (the paper and diffusers' example);
            False uses the posterior mean. Trained VAEs have a near-zero posterior std so this barely
            matters for them; random tiny VAEs have std ~1, which would drown the pair's difference.
        timestep_range: ``[lo, hi]``, fractions of the training timesteps: draw each pair's t uniformly from
            ``[lo·T, hi·T)`` instead of all of ``[0, T)`` (the paper and the official code). Uniform t spends
            most of the loss on low noise, where the denoising error is largest and winner and loser differ
            in detail; colour, layout and shape are set at high noise. DDPM-family models (SD, SDXL) only:
            flow models choose their σ density with ``model.weighting_scheme``. None: all timesteps.
        guidance_scale: train the preference of the classifier-free-guided sampler at this scale w (the one
            the model is sampled with) instead of the conditional model's: each error in the logits becomes
            ``w·mse_c − (w − 1)·mse_u`` (`alignment.losses.guided_denoising_error`, the log-density proxy of
            ``p(x|c)^w·p(x)^(1−w)``, whose score CFG follows), for the model and the reference, at the cost of
            a second (empty-caption) prediction per image. The paper's loss (None) trains ε(x_t, c) only,
            while a LoRA changes ε(x_t, ∅) too: measured on the toy world, the two changes point the same way
            (cosine 0.92-0.94) and CFG 7 passes on ``7·Δε_c − 6·Δε_u``, so the loss and the sampler weigh a
            change differently: a change shared by both branches counts once in the sampler but fully in the
            paper's loss, a change of the caption's effect counts 7 times in the sampler but once in the
            loss. Because such a change now counts w times in the logits, β scales down with w (the toy
            world: 1000 at w = 7 against 5000 without). CFG families only; None: the paper's loss.
    """

    beta: float = 5000.0
    loss_type: str = "sigmoid"
    vae_sample: bool = True
    timestep_range: list[float] | None = None
    guidance_scale: float | None = None


@dataclass
class ValidationSection:
    """Validation images sampled with the current policy and scored by a reward every `train.validate_every`.

    Attributes:
        prompts: prompts to sample (one image each).
        reward: a `reward_plugins.create_reward` name, e.g. ``pickscore`` or ``pickscore-tiny``.
        reward_kwargs: extra options for `create_reward` (``checkpoint``, ``backbone``, ...).
        reward_dtype: the reward's dtype (``fp32``, ``bf16``, ``fp16``).
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale.
        seed: sampling seed (the same images every time, so the curve shows the policy changing).
        save_images: also write PNGs and scores under ``<output_dir>/validation/step-<n>/``.
    """

    prompts: list[str] = field(default_factory=list)
    reward: str | None = None
    reward_kwargs: dict = field(default_factory=dict)
    reward_dtype: str = "fp32"
    num_inference_steps: int = count(20)
    guidance_scale: float = 7.5
    seed: int = 0
    save_images: bool = True


@dataclass
class OnlineSection:
    """Online DPO: alternate mining pairs with the current policy and training on them.

    Round r mines pairs with `alignment.pairs.mine_pairs(pipe, prompts, reward, n, <output_dir>/online/
    round-<r>, **mine_kwargs)` and then trains `steps_per_round` optimizer steps on them.

    Attributes:
        enabled: turn online mode on (then `data` is not read).
        prompts: prompts to mine on (or `prompts_file`, one per line).
        prompts_file: a text file of prompts.
        reward: the reward that labels the pairs (a `create_reward` name).
        reward_kwargs: extra options for `create_reward`.
        images_per_prompt: n images sampled per prompt.
        steps_per_round: optimizer steps on each round's pairs.
        mine_kwargs: extra keyword arguments for `mine_pairs` (sampler steps, margin, dimension ...).
    """

    enabled: bool = False
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    reward: str = "pickscore"
    reward_kwargs: dict = field(default_factory=dict)
    images_per_prompt: int = count(4, minimum=2)
    steps_per_round: int = count(100)
    mine_kwargs: dict = field(default_factory=dict)


@dataclass
class DPOConfig:
    """Everything a Diffusion-DPO run needs (YAML: configs/tiny/dpo.yaml, configs/sd15_lora_dpo.yaml)."""

    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    online: OnlineSection = field(default_factory=OnlineSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)


def check_config(cfg: DPOConfig, need_pipeline: bool = True) -> None:
    """Validate `cfg` before anything is loaded or written. Raises ValueError naming the key and the fix."""
    check_counts(cfg)
    check_sections(cfg.model, cfg.lora, cfg.train, need_pipeline=need_pipeline)
    check_monitor(cfg.monitor)
    if cfg.dpo.loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo.loss_type must be one of {DPO_LOSS_TYPES}; got {cfg.dpo.loss_type!r}.")
    if not cfg.dpo.beta > 0:
        raise ValueError(f"dpo.beta must be > 0 (the paper uses 2000-5000); got {cfg.dpo.beta}.")
    tr = cfg.dpo.timestep_range
    if tr is not None and not (isinstance(tr, (list, tuple)) and len(tr) == 2 and all(isinstance(v, (int, float)) for v in tr)
                               and 0 <= tr[0] < tr[1] <= 1):
        raise ValueError(f"dpo.timestep_range must be [lo, hi] with 0 <= lo < hi <= 1 (fractions of the training "
                         f"timesteps, e.g. [0.3, 1.0]) or null; got {tr!r}.")
    w = cfg.dpo.guidance_scale
    if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 1):
        raise ValueError(f"dpo.guidance_scale must be a number >= 1 (the classifier-free guidance scale the model is "
                         f"sampled with, e.g. 7.5) or null for the paper's conditional loss; got {w!r}.")
    if cfg.data.ties not in ("skip", "error"):
        raise ValueError(f"data.ties must be 'skip' or 'error'; got {cfg.data.ties!r}.")
    if cfg.data.validate not in VALIDATE_MODES:
        raise ValueError(f"data.validate must be one of {VALIDATE_MODES}; got {cfg.data.validate!r}.")
    if cfg.data.micro_conditioning not in MICRO_MODES:
        raise ValueError(f"data.micro_conditioning must be one of {MICRO_MODES}; got {cfg.data.micro_conditioning!r}.")
    if cfg.data.resize_filter not in RESIZE_FILTERS:
        raise ValueError(f"data.resize_filter must be one of {RESIZE_FILTERS}; got {cfg.data.resize_filter!r}.")
    if cfg.data.hflip not in HFLIP_MODES:
        raise ValueError(f"data.hflip must be one of {HFLIP_MODES} (a string, not true/false); got {cfg.data.hflip!r}.")
    if not 0 <= cfg.data.caption_dropout < 1:
        raise ValueError(f"data.caption_dropout must be in [0, 1) (the official recipes use 0.2); got {cfg.data.caption_dropout}.")
    if cfg.online.enabled:
        if cfg.online.steps_per_round < 1 or cfg.online.images_per_prompt < 2:
            raise ValueError(
                f"online.steps_per_round must be >= 1 and online.images_per_prompt >= 2; got "
                f"{cfg.online.steps_per_round} and {cfg.online.images_per_prompt}."
            )
        if not cfg.online.prompts and not cfg.online.prompts_file:
            raise ValueError("online mode needs prompts: set online.prompts (a list) or online.prompts_file.")
    elif not cfg.data.path and not cfg.data.dataset and cfg.data.synthetic_pairs <= 0:
        raise ValueError(
            "no training pairs: set data.path (parquet file(s) or shard dir(s)), data.dataset (a `datasets` "
            "source), data.synthetic_pairs=N for a synthetic set, or online.enabled=true."
        )
    if cfg.train.validate_every and cfg.validation.prompts and not cfg.validation.reward:
        raise ValueError("validation.prompts are set but validation.reward is empty; name a reward, e.g. pickscore.")


# ---------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------


@dataclass
class DPOResult:
    """What a run leaves behind."""

    output_dir: Path
    lora_path: Path | None
    unet_path: Path | None
    steps: int
    last_metrics: dict = field(default_factory=dict)
    monitor: dict = field(default_factory=dict)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def check_sharding(cfg: DPOConfig) -> None:
    """What ``train.distributed: fsdp`` supports here (every denoiser call is a collective under FSDP).

    Raises:
        ValueError: an EMA, full fine-tuning or online mining (its prompts split unevenly) under FSDP.
    """
    check_fsdp_sections(cfg.train, cfg.lora)
    if cfg.online.enabled:
        raise ValueError("online.enabled with train.distributed=fsdp is not supported (pair mining splits prompts "
                         "unevenly over processes, and each sampling call is a collective); mine pairs first.")


class DPOTrainer:
    """Diffusion-DPO with accelerate (mixed precision, accumulation, multi-GPU) and a peft LoRA.

    Args:
        cfg: the run's `DPOConfig`.
        output_dir: overrides ``cfg.train.output_dir``.
        resume: continue from the newest complete checkpoint in `output_dir` (a fresh start if none).
        dataset: a `datasets.Dataset` or pyarrow Table of pairs instead of ``cfg.data``.
        pipe: an already built pipeline (its UNet is trained in place) instead of ``cfg.model``.

    Example:
        >>> trainer = DPOTrainer(cfg, output_dir="runs/dpo")
        >>> result = trainer.train()
        >>> trainer.evaluate(num_batches=8)["implicit_acc"]
    """

    def __init__(self, cfg: DPOConfig, output_dir: str | os.PathLike | None = None, resume: bool = False, dataset=None, pipe=None) -> None:
        check_config(cfg, need_pipeline=pipe is None)
        self.cfg = cfg
        self.output_dir = Path(output_dir or cfg.train.output_dir)
        self.resume = resume
        existing = latest_checkpoint(self.output_dir)
        if existing is not None and not resume:
            raise ValueError(
                f"{str(self.output_dir)!r} already holds a run (checkpoint at step {existing[1]}); pass --resume "
                "(resume=True) to continue it or choose another --output-dir. Nothing was changed."
            )
        # Read and check the pairs before anything is built or written, so bad data leaves no trace.
        self.source = self.index = None
        if not cfg.online.enabled and (dataset is not None or cfg.data.path or cfg.data.dataset):
            self.source = read_pair_source(cfg.data, dataset)
            self.index = index_pairs(self.source, cfg.data)

        train = cfg.train
        self.accelerator = make_accelerator(train, self.output_dir)
        self.weight_dtype = weight_dtype_for(self.accelerator.mixed_precision)
        if pipe is None:
            pipe = build_pipeline(cfg.model, self.accelerator.device, self.weight_dtype)
        else:  # a caller's pipeline: keep its dtype, move it, freeze what is not trained
            freeze_pipeline(pipe)
            pipe.to(self.accelerator.device)
        self.pipe = pipe
        self.adapter = build_adapter(self.pipe, cfg.model)
        check_guidance_settings(self.adapter, {"validation.guidance_scale": cfg.validation.guidance_scale,
                                               "data.caption_dropout": getattr(cfg.data, "caption_dropout", None)})
        # Under fp16 the VAE runs in fp32: SDXL's VAE overflows in fp16 (bf16 has fp32's range and is fine).
        if self.weight_dtype == torch.float16 and self.pipe.vae.dtype != torch.float32:
            self.pipe.vae.to(dtype=torch.float32)
        self.resolution = self._resolution()
        if cfg.dpo.guidance_scale is not None and not self.adapter.uses_cfg:
            raise ValueError(f"dpo.guidance_scale={cfg.dpo.guidance_scale}: {self.adapter.family} samples without "
                             "classifier-free guidance, so there is no guided sampler to train; remove dpo.guidance_scale.")
        if cfg.dpo.timestep_range is not None and self.adapter.is_flow:
            raise ValueError("dpo.timestep_range applies to DDPM-family models (SD, SDXL); flow models choose their "
                             "sigma density with model.weighting_scheme. Remove dpo.timestep_range.")

        unet = self.adapter.denoiser  # the UNet, or the transformer of flow models
        if cfg.lora.enabled:
            params = add_lora(unet, cfg.lora, seed=train.seed)
            self.ref_unet = None
        else:
            self.ref_unet = copy.deepcopy(unet).requires_grad_(False).eval()
            unet.to(dtype=torch.float32).requires_grad_(True)
            params = list(unet.parameters())
        self.sharded = is_sharded(self.accelerator)
        if self.sharded:
            check_sharding(cfg)
        if train.gradient_checkpointing and not self.sharded:  # FSDP: accelerate's per-block checkpoints instead
            unet.enable_gradient_checkpointing()
        unet.train()

        from diffusers.optimization import get_scheduler

        optimizer = torch.optim.AdamW(
            params, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon, weight_decay=train.weight_decay
        )
        n_proc = self.accelerator.num_processes
        # accelerate steps a prepared scheduler once per process per optimizer step.
        scheduler = get_scheduler(
            train.lr_scheduler, optimizer, num_warmup_steps=train.lr_warmup_steps * n_proc, num_training_steps=train.max_steps * n_proc
        )
        self.model, self.optimizer, self.lr_scheduler = prepare_denoiser(
            self.accelerator, self.adapter, unet, optimizer, scheduler, activation_checkpointing=train.gradient_checkpointing)
        self.params = trainable_parameters(self.model)  # FSDP replaces them with sharded ones (the same under DDP)
        register_trainable_state_hooks(self.accelerator)
        self.ema = make_ema(self.accelerator, self.params, train)  # None unless train.ema_decay > 0
        self.global_step = 0
        self._rewards: dict[str, Any] = {}
        self.log_file = JsonlLogger(self.output_dir / "metrics.jsonl", enabled=self.accelerator.is_main_process)
        # DPO has no training reward: the validation reward is the held-out score that picks best/.
        mon = cfg.monitor if cfg.monitor.best_key else dataclasses.replace(cfg.monitor, best_key="val/reward_mean")
        self.monitor = MonitorHook(mon, self.output_dir, self.accelerator)

    # -- setup helpers ---------------------------------------------------------------------------------

    def _resolution(self) -> int:
        ad, cfg = self.adapter, self.cfg
        if cfg.model.resolution:
            res = cfg.model.resolution
        elif self.index is not None and len(self.index.sizes) == 1 and not cfg.data.resize:
            w, h = next(iter(self.index.sizes))
            if w != h:
                raise ValueError(f"the pair images are {w}x{h}; training needs square images: set data.resize=true.")
            res = w
        else:
            res = ad.default_resolution
        if self.index is not None and not cfg.data.resize:
            wrong = sorted(size for size in self.index.sizes if size != (res, res))
            if wrong:
                raise ValueError(
                    f"the pair images are {wrong[0][0]}x{wrong[0][1]} but training runs at {res}x{res} "
                    f"(model.resolution); set data.resize=true or model.resolution={wrong[0][0]}."
                )
        multiple = ad.resolution_multiple
        if res % multiple:
            raise ValueError(f"training resolution {res} must be a multiple of {multiple} for this UNet/VAE; set model.resolution.")
        return res

    def _dataset(self, source: PairSource, index: PairIndex) -> PairDataset:
        d = self.cfg.data
        return PairDataset(source, index, self.resolution, d.resize, d.micro_conditioning, d.resize_filter)

    def _loader(self, dataset: PairDataset):
        train = self.cfg.train
        global_batch = train.batch_size * self.accelerator.num_processes
        if len(dataset) < global_batch:
            raise ValueError(
                f"only {len(dataset)} usable pairs, fewer than one global batch ({train.batch_size} per process x "
                f"{self.accelerator.num_processes} processes); lower train.batch_size or add pairs."
            )
        sampler = PairSampler(len(dataset), train.seed, global_batch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=train.batch_size, sampler=sampler, collate_fn=collate_pairs, drop_last=True,
            num_workers=train.num_workers,
        )
        return sampler, self.accelerator.prepare(loader)

    def _batches(self, dataset: PairDataset, start_micro: int) -> Iterator[dict]:
        """Micro-batches forever, starting at this process's micro-batch number `start_micro`."""
        sampler, loader = self._loader(dataset)
        per_epoch = len(dataset) // (self.cfg.train.batch_size * self.accelerator.num_processes)
        epoch, offset = divmod(start_micro, per_epoch)
        global_batch = self.cfg.train.batch_size * self.accelerator.num_processes
        while True:
            sampler.set_position(epoch, offset * global_batch)
            yield from loader
            epoch, offset = epoch + 1, 0

    def _seed(self, micro: int) -> int:
        # Noise, timesteps and VAE samples depend only on (seed, micro-batch, process): exact resume.
        return ((self.cfg.train.seed * 1_000_003 + micro) * 1009 + self.accelerator.process_index) % (2**63 - 1)

    # -- the step ------------------------------------------------------------------------------------

    def _timesteps(self, b: int, generator: torch.Generator) -> torch.Tensor:
        """One training timestep per pair: the family's distribution, or uniform in `dpo.timestep_range`."""
        ad, tr = self.adapter, self.cfg.dpo.timestep_range
        if tr is None:
            return ad.sample_timesteps(b, generator, device=self.accelerator.device)
        n = ad.num_train_timesteps
        lo, hi = int(round(tr[0] * n)), max(int(round(tr[1] * n)), int(round(tr[0] * n)) + 1)
        return torch.randint(lo, hi, (b,), generator=generator).to(self.accelerator.device)

    def augment(self, batch: dict, generator: torch.Generator) -> dict:
        """Caption dropout and horizontal flips of a micro-batch as `data.caption_dropout` / `data.hflip` say.

        Draws from `generator` only when one is on, so runs without them see the same noise as before.
        """
        d = self.cfg.data
        if not d.caption_dropout and d.hflip == "none":
            return batch
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        b = len(batch["caption"])
        out = dict(batch)
        if d.caption_dropout:
            drop = (torch.rand(b, generator=g) < d.caption_dropout).tolist()
            out["caption"] = ["" if x else c for x, c in zip(drop, batch["caption"])]
        if d.hflip != "none":
            flip_w = torch.rand(b, generator=g) < 0.5
            flip_l = flip_w if d.hflip == "pair" else torch.rand(b, generator=g) < 0.5
            for key, flip in (("pixel_w", flip_w), ("pixel_l", flip_l)):
                x = batch[key]
                out[key] = torch.where(flip.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
        return out

    def pair_losses(self, batch: dict, generator: torch.Generator, model=None, augment: bool = True) -> tuple[torch.Tensor, dict]:
        """The DPO loss and metrics for one micro-batch of pairs (gradients reach the trained weights).

        `augment` applies `augment` (caption dropout, flips) first; `evaluate` turns it off.
        """
        if augment:
            batch = self.augment(batch, generator)
        ad, dev = self.adapter, self.accelerator.device
        model = model if model is not None else self.model
        pix = torch.cat([batch["pixel_w"], batch["pixel_l"]]).to(dev)
        b = batch["pixel_w"].shape[0]
        with torch.no_grad():
            latents = ad.encode_images(pix, generator=generator, sample=self.cfg.dpo.vae_sample)
            # Noising and the target stay fp32 (beta ~ 5000 multiplies MSE differences); autocast casts the
            # UNet's inputs to the compute dtype.
            latents = latents.float()
            noise = torch.randn(latents[:b].shape, generator=generator, dtype=torch.float32).to(dev)
            # the family's training distribution: uniform DDPM steps, or σ from the flow scripts' density
            t = self._timesteps(b, generator)
            noise, t = torch.cat([noise, noise]), torch.cat([t, t])  # one noise and one timestep (σ) per pair
            noisy = ad.add_noise(latents, noise, t)
            target = ad.target(latents, noise, t)
            cond = ad.encode_prompts(batch["caption"], resolution=self.resolution)
            cond = cond.cat(cond)
            if cond.time_ids is not None and "micro_w" in batch:
                # SDXL micro-conditioning per image: (original h, w, crop top, left, target h, w).
                micro = torch.cat([batch["micro_w"], batch["micro_l"]]).to(dev)
                target_size = micro.new_full((micro.shape[0], 2), float(self.resolution))
                cond.time_ids = torch.cat([micro, target_size], dim=1).to(cond.time_ids.dtype)
            w = self.cfg.dpo.guidance_scale
            if w is not None:  # the empty caption's prediction on the same latents, in the same forward
                cond = cond.cat(ad.negative_embeds(cond))
                noisy, t, target = torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([target, target])
        with self.accelerator.autocast():
            pred = ad.unet(noisy, t, cond, unet=model)
        with torch.no_grad(), self.accelerator.autocast():
            if self.ref_unet is not None:
                ref_pred = ad.unet(noisy, t, cond, unet=self.ref_unet)
            else:
                with disabled_adapter(model) as base:
                    ref_pred = ad.unet(noisy, t, cond, unet=base)
        mse, ref = per_sample_mse(pred, target), per_sample_mse(ref_pred, target)
        if w is None:
            return diffusion_dpo_loss(*mse.chunk(2), *ref.chunk(2), beta=self.cfg.dpo.beta, loss_type=self.cfg.dpo.loss_type)
        (mse_c, mse_u), (ref_c, ref_u) = mse.chunk(2), ref.chunk(2)
        loss, metrics = diffusion_dpo_loss(*guided_denoising_error(mse_c, mse_u, w).chunk(2),
                                           *guided_denoising_error(ref_c, ref_u, w).chunk(2),
                                           beta=self.cfg.dpo.beta, loss_type=self.cfg.dpo.loss_type)
        # model_mse / ref_mse stay the conditional errors (the loss-spike flag); the empty caption's beside them
        metrics.update(model_mse=mse_c.detach().mean(), ref_mse=ref_c.detach().mean(),
                       model_mse_uncond=mse_u.detach().mean(), ref_mse_uncond=ref_u.detach().mean())
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, num_batches: int = 4, seed: int = 12345, dataset: PairDataset | None = None) -> dict[str, float]:
        """Mean DPO metrics (implicit_acc, reward_margin, ...) on fixed noise draws; touches no training state."""
        if dataset is None:
            if self.source is None:
                raise ValueError("evaluate() needs pairs: pass dataset=, or build the trainer with data.path / dataset=.")
            dataset = self._dataset(self.source, self.index)
        g = torch.Generator().manual_seed(seed)
        sums: dict[str, float] = {}
        bs = self.cfg.train.batch_size
        inner = unwrap(self.model)
        for _ in range(num_batches):
            idx = torch.randint(0, len(dataset), (bs,), generator=g).tolist()
            batch = collate_pairs([dataset[i] for i in idx])
            loss, m = self.pair_losses(batch, g, model=inner, augment=False)
            for name, v in {"loss": loss, **m}.items():
                sums[name] = sums.get(name, 0.0) + float(v)
        return {k: v / num_batches for k, v in sums.items()}

    def _train_steps(self, dataset: PairDataset, start: int, end: int, data_start: int, bar) -> dict:
        """Optimizer steps start..end-1 on `dataset`, whose data position starts at step `data_start`."""
        acc, train = self.accelerator, self.cfg.train
        accum = train.gradient_accumulation_steps
        batches = self._batches(dataset, (start - data_start) * accum)
        names: list[str] = []
        window = None  # running sums on the device: one host sync per log, not per metric per micro-batch
        grad_norms: list[torch.Tensor] = []
        n_window, t0, last = 0, time.perf_counter(), {}
        for step in range(start, end):
            for k in range(accum):
                micro = step * accum + k
                batch = next(batches)
                with acc.accumulate(self.model):
                    loss, metrics = self.pair_losses(batch, torch.Generator().manual_seed(self._seed(micro)))
                    acc.backward(loss)
                    if acc.sync_gradients and train.max_grad_norm:
                        norm = acc.clip_grad_norm_(self.params, train.max_grad_norm)
                        if norm is not None:
                            grad_norms.append(torch.as_tensor(norm).detach().float().reshape(()).to(acc.device))
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None and acc.sync_gradients:
                        self.ema.update()
                names = ["loss", *metrics]
                values = torch.stack([loss.detach().float().reshape(()), *(v.float().reshape(()) for v in metrics.values())])
                window = values if window is None else window + values
                n_window += 1
            self.global_step = step + 1
            bar.update(1)
            if (train.log_every and self.global_step % train.log_every == 0) or self.global_step == end:
                means = acc.reduce(window.to(acc.device), "mean").cpu() / n_window
                last = {f"train/{k}": float(v) for k, v in zip(names, means)}
                if grad_norms:
                    last["train/grad_norm"] = float(torch.stack(grad_norms).mean())
                last["train/lr"] = self.lr_scheduler.get_last_lr()[0]
                dt = time.perf_counter() - t0
                last["train/pairs_per_s"] = n_window * train.batch_size * acc.num_processes / max(dt, 1e-9)
                acc.log(last, step=self.global_step)
                self.log_file.log(last, self.global_step)
                bar.set_postfix(loss=f"{last['train/loss']:.4f}", acc=f"{last['train/implicit_acc']:.2f}")
                window, grad_norms, n_window, t0 = None, [], 0, time.perf_counter()
            if train.save_every and self.global_step % train.save_every == 0 and self.global_step < train.max_steps:
                save_checkpoint(acc, self.output_dir, self.global_step, train.checkpoints_total_limit)
            if train.validate_every and self.global_step % train.validate_every == 0:
                self.validate(self.global_step)
                if self.monitor.should_stop():  # on_alarm: stop ends the run at this validation
                    break
        return last

    # -- validation, online mining -----------------------------------------------------------------

    def _reward(self, name: str, kwargs: dict, dtype: str = "fp32"):
        key = json.dumps([name, kwargs, dtype], sort_keys=True, default=str)
        if key not in self._rewards:
            from reward_plugins import create_reward

            self._rewards[key] = create_reward(name, device=self.accelerator.device, dtype=dtype, **kwargs)
        return self._rewards[key]

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seed: int = 0, num_inference_steps: int = 20, guidance_scale: float = 7.5) -> torch.Tensor:
        """Images (B, 3, R, R) in [0, 1] from the current policy (LoRA on)."""
        g = torch.Generator().manual_seed(seed)
        with self.accelerator.autocast():
            out = self.pipe(
                list(prompts), height=self.resolution, width=self.resolution, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, generator=g, output_type="latent",
            )
        # Decoded outside autocast: under fp16 the VAE is fp32 and must not run its convolutions in fp16.
        with torch.no_grad():  # (FLUX returns packed tokens: the adapter unpacks them)
            return self.adapter.decode(self.adapter.pipeline_latents(out.images, self.resolution, self.resolution))

    def validate(self, step: int) -> dict[str, float]:
        """Sample the validation prompts, score them, log the mean reward and the images (main process)."""
        v = self.cfg.validation
        if not v.prompts or not v.reward:
            self.accelerator.wait_for_everyone()
            return {}
        state = None
        if self.sharded:  # FSDP: each denoiser call is a collective, so every process samples (the main one scores)
            images = self.sample(v.prompts, v.seed, v.num_inference_steps, v.guidance_scale)
            state = full_trainable_state(self.model) if self.monitor.enabled else None  # for best/, gathered here
        if not self.accelerator.is_main_process:  # joins the monitor's stop decision only
            self.monitor.on_validation(step, {}, None, [], gathered=True)
            self.accelerator.wait_for_everyone()
            return {}
        if not self.sharded:
            with ema_weights(self.ema):  # the averaged weights are what gets exported
                images = self.sample(v.prompts, v.seed, v.num_inference_steps, v.guidance_scale)
        reward = self._reward(v.reward, v.reward_kwargs, v.reward_dtype)
        with torch.no_grad():
            out = reward(images.to(self.accelerator.device), list(v.prompts))
        logs = {"val/reward_mean": float(out.scores.float().mean())}
        for dim, vals in out.per_dim.items():
            logs[f"val/{dim}_mean"] = float(vals.float().mean())
        if self.monitor.monitor.embed is None:  # the validation reward's image tower, when it has one
            self.monitor.monitor.embed = image_embedder(reward)
        save_best = (functools.partial(export_lora, self.pipe, self.model, state=state) if state is not None
                     else weights_saver(self.pipe, self.model, self.ema, lora=self.cfg.lora.enabled))
        logs.update(self.monitor.on_validation(step, logs, images, list(v.prompts), gathered=True, save_best=save_best))
        self.accelerator.log(logs, step=step)
        self.log_file.log(logs, step)
        try:
            tb = self.accelerator.get_tracker("tensorboard", unwrap=True)
            if hasattr(tb, "add_images"):
                tb.add_images("val/images", images.cpu(), step)
                tb.add_text("val/scores", " | ".join(f"{p}: {s:.4f}" for p, s in zip(v.prompts, out.scores.tolist())), step)
        except (ValueError, AttributeError):
            pass  # no tensorboard tracker: the JSONL log and PNGs still hold everything
        if v.save_images:
            from reward_plugins.preprocess import tensor_to_pil

            d = self.output_dir / "validation" / f"step-{step:07d}"
            d.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(images):
                tensor_to_pil(img).save(d / f"{i:03d}.png")
            (d / "scores.json").write_text(json.dumps(
                [{"prompt": p, **r} for p, r in zip(v.prompts, out.to_rows())], indent=2
            ))
        self.accelerator.wait_for_everyone()
        return logs

    def _online_prompts(self) -> list[str]:
        o = self.cfg.online
        prompts = list(o.prompts)
        if o.prompts_file:
            p = Path(o.prompts_file)
            if not p.is_file():
                raise FileNotFoundError(f"online.prompts_file {str(p)!r} does not exist.")
            prompts += [line.strip() for line in p.read_text().splitlines() if line.strip()]
        return prompts

    def mine_round(self, round_index: int) -> PairDataset:
        """Mine this round's pairs with the current policy (prompts split across processes) and load them.

        `mine_pairs` resumes an interrupted round itself; a finished round is marked and not mined again.
        """
        from alignment import pairs as pairs_module  # lazy: pair mining is only needed in online mode

        o, acc = self.cfg.online, self.accelerator
        out_dir = self.output_dir / "online" / f"round-{round_index:04d}"
        done = out_dir / "_ROUND_DONE.json"
        if not done.is_file():
            reward = self._reward(o.reward, o.reward_kwargs)
            kwargs = {"seed": self.cfg.train.seed * 1_000_003 + round_index, "height": self.resolution,
                      "width": self.resolution, "accelerator": acc, "progress": acc.is_main_process, **o.mine_kwargs}
            inner = unwrap(self.model)
            was_training = inner.training
            inner.eval()
            try:
                with acc.autocast():
                    pairs_module.mine_pairs(self.pipe, self._online_prompts(), reward, o.images_per_prompt, out_dir, **kwargs)
            finally:
                inner.train(was_training)
            acc.wait_for_everyone()
            if acc.is_main_process:
                done.write_text(json.dumps({"round": round_index, "policy_step": self.global_step}))
        acc.wait_for_everyone()
        data = dataclasses.replace(self.cfg.data, path=str(out_dir), dataset=None, max_pairs=None, synthetic_pairs=0)
        try:
            source = read_pair_source(data)
            index = index_pairs(source, data)
        except FileNotFoundError:
            index = None
        if index is None or not index.rows:
            raise ValueError(
                f"online round {round_index} mined no usable pairs in {str(out_dir)!r}; lower the margin in "
                "online.mine_kwargs, raise online.images_per_prompt or add prompts."
            )
        return self._dataset(source, index)

    # -- the run ---------------------------------------------------------------------------------------

    def train(self, stop_at: int | None = None) -> DPOResult:
        """Run (or resume) training to `train.max_steps`; export the LoRA (or UNet) and return paths.

        Args:
            stop_at: end this session after that global step (a checkpoint is written), e.g. to fit a
                job's time limit; a later ``resume=True`` run continues exactly where it stopped.
        """
        acc, cfg = self.accelerator, self.cfg
        final = cfg.train.max_steps if stop_at is None else min(stop_at, cfg.train.max_steps)
        start = 0
        if self.resume:
            found = latest_checkpoint(self.output_dir)
            if found is not None:
                acc.load_state(str(found[0]))
                start = found[1]
                self.monitor.resume(start)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            from alignment.configs import save_config

            save_config(cfg, self.output_dir / "config.yaml")
            if start > 0:  # rows the interrupted run logged after this checkpoint are logged again below
                drop_log_rows_after(self.log_file.path, start)
        acc.init_trackers("dpo", config={k: v for k, v in _flat(dataclasses.asdict(cfg)).items() if not isinstance(v, str) or len(v) < 200},
                          init_kwargs=resume_tracker_kwargs(start))
        self.global_step = start
        bar = progress_bar(acc, cfg.train.max_steps, initial=min(start, final), desc="dpo")
        last: dict = {}
        if start == 0 and cfg.train.validate_every:
            self.validate(0)
        if cfg.online.enabled:
            per = cfg.online.steps_per_round
            while self.global_step < final:
                r = self.global_step // per
                dataset = self.mine_round(r)
                end = min((r + 1) * per, final)
                last = self._train_steps(dataset, self.global_step, end, r * per, bar) or last
                if self.monitor.should_stop():
                    break
        else:
            if self.source is None:
                path = self.output_dir / "synthetic_pairs.parquet"
                if acc.is_main_process and not path.is_file():
                    make_synthetic_pairs(path, cfg.data.synthetic_pairs, resolution=self.resolution, seed=cfg.train.seed)
                acc.wait_for_everyone()
                data = dataclasses.replace(cfg.data, path=str(path))
                self.source = read_pair_source(data)
                self.index = index_pairs(self.source, data)
            if self.index.ties and acc.is_main_process and start == 0:
                self.log_file.log({"data/ties_skipped": self.index.ties, "data/pairs": len(self.index.rows)}, start)
            if start < final:
                last = self._train_steps(self._dataset(self.source, self.index), start, final, 0, bar)
        bar.close()
        done = latest_checkpoint(self.output_dir)
        if done is None or done[1] != self.global_step:
            save_checkpoint(acc, self.output_dir, self.global_step, cfg.train.checkpoints_total_limit)
        lora_path = unet_path = None
        state = full_trainable_state(self.model) if self.sharded else None  # FSDP: gathered on every process
        if acc.is_main_process:
            with ema_weights(self.ema):  # with train.ema_decay the exported model is the EMA
                if cfg.lora.enabled:
                    lora_path = export_lora(self.pipe, self.model, self.output_dir, state=state)
                else:
                    unet_path = self.output_dir / "unet"
                    unwrap(self.model).save_pretrained(unet_path)
            plot_metrics(self.log_file.path, CURVES, self.output_dir / "curves.png", title="Diffusion-DPO",
                         markers=self.monitor.markers())
            plot_metrics(self.log_file.path, ["val/reward_mean"], self.output_dir / "val_reward.png",
                         title="validation reward of the policy")
        monitor = self.monitor.finish()
        if acc.is_main_process:
            summary = {"steps": self.global_step, "lora": str(lora_path) if lora_path else None,
                       "unet": str(unet_path) if unet_path else None, "monitor": monitor}
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        acc.wait_for_everyone()
        acc.end_training()
        return DPOResult(self.output_dir, lora_path, unet_path, self.global_step, last, monitor)


def train_dpo(cfg: DPOConfig, output_dir: str | os.PathLike | None = None, resume: bool = False, dataset=None, pipe=None) -> DPOResult:
    """Build a `DPOTrainer` and run it. See `DPOTrainer` for the arguments.

    Example:
        >>> cfg = load_config(DPOConfig, "configs/tiny/dpo.yaml")
        >>> train_dpo(cfg, output_dir="runs/tiny-dpo").lora_path
    """
    return DPOTrainer(cfg, output_dir=output_dir, resume=resume, dataset=dataset, pipe=pipe).train()
