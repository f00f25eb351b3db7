"""Pieces every trainer shares: config sections, pipeline building, LoRA (peft), the accelerate setup,
checkpoints that resume exactly, and LoRA export in the format `pipe.load_lora_weights(dir)` reads.

A trainer (`dpo.py`, `reward_finetune.py`) composes these:

    >>> cfg_model = ModelSection(tiny="sd")
    >>> pipe = build_pipeline(cfg_model, "cpu", torch.float32)
    >>> params = add_lora(pipe.unet, LoraSection(rank=4))
    >>> with disabled_adapter(pipe.unet):
    ...     ref = pipe.unet(...)                 # the frozen reference: no second UNet in memory
    >>> accelerator = make_accelerator(TrainSection(), "out")
    >>> save_checkpoint(accelerator, "out", step=100)
    >>> latest_checkpoint("out")
    (PosixPath('out/checkpoints/checkpoint-0000100'), 100)
    >>> export_lora(pipe, pipe.unet, "out")      # out/pytorch_lora_weights.safetensors
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.configs import check_counts, count

PRECISIONS = ("no", "bf16", "fp16")
DISTRIBUTED = ("auto", "fsdp")
TINY_FAMILIES = ("sd", "sdxl", "sd3", "flux")  # alignment.tiny builds these in-process
PREDICTION_TYPES = ("epsilon", "v_prediction")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable_{i}.safetensors"


# ---------------------------------------------------------------------------------------------------
# Config sections
# ---------------------------------------------------------------------------------------------------


@dataclass
class ModelSection:
    """Which diffusers pipeline to train.

    Attributes:
        pipeline: a local dir written by `save_pretrained` or a hub id (e.g.
            ``stable-diffusion-v1-5/stable-diffusion-v1-5``). Ignored when `tiny` is set.
        tiny: ``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"`` builds a random tiny pipeline in-process
            (tests, offline demo).
        tiny_seed: seed of the tiny pipeline's random weights.
        resolution: training image size in pixels; None means the denoiser's native size.
        prediction_type: override the scheduler's ``epsilon`` / ``v_prediction`` (None keeps it; DDPM
            families only: flow models always predict the velocity).
        weighting_scheme: flow models' training timestep density (``logit_normal``, ``mode``, ``none``,
            ``sigma_sqrt``, ``cosmap``: the ``--weighting_scheme`` of diffusers' SD3/FLUX scripts); None is
            the family's script default (SD3: logit_normal, FLUX: none = uniform).
        logit_mean, logit_std, mode_scale: parameters of those densities (the scripts' defaults).
        guidance: FLUX-dev's distilled guidance embedding during training (None: 3.5, the script's).
        max_sequence_length: T5 tokens of SD3/FLUX prompts (None: the pipelines' defaults, 256 / 512).
    """

    pipeline: str | None = None
    tiny: str | None = None
    tiny_seed: int = 0
    resolution: int | None = count(None)
    prediction_type: str | None = None
    weighting_scheme: str | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance: float | None = None
    max_sequence_length: int | None = count(None)


@dataclass
class LoraSection:
    """LoRA adapter on the UNet (peft). ``enabled: false`` means full fine-tuning of the UNet.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha (scale alpha / r); None means alpha = rank (scale 1).
        target_modules: module names to adapt (the attention projections by default).
        dropout: LoRA dropout.
        enabled: False trains every UNet weight instead (the reference is then an explicit frozen copy).
    """

    rank: int = count(8)
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0
    enabled: bool = True


@dataclass
class TrainSection:
    """Optimisation and bookkeeping.

    Attributes:
        seed: seeds data order, noise, timesteps and VAE sampling (runs are reproducible and resume exactly).
        lr: peak learning rate (AdamW).
        max_steps: optimizer steps.
        batch_size: examples (pairs for DPO) per process per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (frozen weights are cast to it; trained weights stay fp32).
        gradient_checkpointing: recompute UNet activations in backward (less memory, ~30 % more compute).
        max_grad_norm: gradient clipping (0 or None disables).
        lr_warmup_steps: linear warm-up steps.
        lr_scheduler: a diffusers scheduler name (constant_with_warmup, cosine, linear, ...).
        adam_beta1, adam_beta2, adam_epsilon, weight_decay: AdamW settings.
        save_every: checkpoint every k optimizer steps (0 disables; a final one is always written).
        checkpoints_total_limit: keep only the newest n checkpoints (None keeps all).
        log_every: log scalars every k steps.
        validate_every: sample + score validation images every k steps (0 disables).
        output_dir: where checkpoints, logs, the LoRA and the config go.
        report_to: ``"tensorboard"`` or ``"none"``.
        num_workers: DataLoader worker processes.
        ema_decay: keep an exponential moving average of the trained weights (LoRA or full UNet) with this
            decay and use it for validation and the exported weights (0 disables). ImageReward's ReFL and
            diffusers' text-to-image scripts use 0.9999, with diffusers' warm-up (see `EMA`).
        distributed: how several processes share the work: ``auto`` (as launched: DDP, or accelerate's FSDP
            under ``accelerate launch --use_fsdp ...``) or ``fsdp`` (accelerate's FSDP2 whatever the launch:
            the denoiser's blocks, the family adapter's `fsdp_block_classes`, and its optimizer state are
            sharded across the processes; see `make_accelerator`). One process ignores it.
    """

    seed: int = 0
    lr: float = 1e-5
    max_steps: int = count(1000)
    batch_size: int = count(1)
    gradient_accumulation_steps: int = count(1)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = 1.0
    lr_warmup_steps: int = count(0, minimum=0)
    lr_scheduler: str = "constant_with_warmup"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    save_every: int = count(500, minimum=0)
    checkpoints_total_limit: int | None = count(3)
    log_every: int = count(10, minimum=0)
    validate_every: int = count(0, minimum=0)
    output_dir: str = "outputs/train"
    report_to: str = "tensorboard"
    num_workers: int = count(0, minimum=0)
    ema_decay: float = 0.0
    distributed: str = "auto"


def check_sections(model: ModelSection, lora: LoraSection, train: TrainSection, need_pipeline: bool = True) -> None:
    """Validate the shared sections before anything is built or written.

    Args:
        need_pipeline: False when the caller passes a ready pipeline (model.pipeline/tiny may be empty).

    Raises:
        ValueError: naming the key, the value received and what to use instead.
    """
    for name, section in (("model", model), ("lora", lora), ("train", train)):
        check_counts(section, name)
    if need_pipeline and model.tiny is None and not model.pipeline:
        raise ValueError(
            "model.pipeline is empty and model.tiny is not set; give a pipeline dir or hub id "
            "(model.pipeline=stable-diffusion-v1-5/stable-diffusion-v1-5) or model.tiny=sd for a tiny test model."
        )
    if model.tiny is not None and model.tiny not in TINY_FAMILIES:
        raise ValueError(f"model.tiny must be one of {TINY_FAMILIES} or null; got {model.tiny!r}.")
    if model.prediction_type is not None and model.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"model.prediction_type must be one of {PREDICTION_TYPES} or null; got {model.prediction_type!r}.")
    if model.resolution is not None and model.resolution <= 0:
        raise ValueError(f"model.resolution must be a positive number of pixels; got {model.resolution}.")
    from alignment.pipelines.flow import WEIGHTING_SCHEMES

    if model.weighting_scheme is not None and model.weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"model.weighting_scheme must be one of {WEIGHTING_SCHEMES} or null; got {model.weighting_scheme!r}.")
    if not model.logit_std > 0:
        raise ValueError(f"model.logit_std must be > 0; got {model.logit_std}.")
    if lora.enabled and lora.rank < 1:
        raise ValueError(f"lora.rank must be >= 1; got {lora.rank}.")
    if not lora.target_modules:
        raise ValueError("lora.target_modules is empty; use e.g. [to_q, to_k, to_v, to_out.0].")
    if train.mixed_precision is False:  # YAML 1.1 reads a bare `no` as false
        train.mixed_precision = "no"
    if train.mixed_precision not in PRECISIONS:
        raise ValueError(f"train.mixed_precision must be one of {PRECISIONS}; got {train.mixed_precision!r}.")
    for key in ("max_steps", "batch_size", "gradient_accumulation_steps"):
        if getattr(train, key) < 1:
            raise ValueError(f"train.{key} must be >= 1; got {getattr(train, key)}.")
    if train.lr <= 0:
        raise ValueError(f"train.lr must be > 0; got {train.lr}.")
    for key in ("save_every", "log_every", "validate_every", "lr_warmup_steps", "num_workers"):
        if getattr(train, key) < 0:
            raise ValueError(f"train.{key} must be >= 0; got {getattr(train, key)}.")
    if not 0 <= train.ema_decay < 1:
        raise ValueError(f"train.ema_decay must be in [0, 1) (0 disables the EMA; ReFL uses 0.9999); got {train.ema_decay}.")
    if train.report_to not in ("tensorboard", "none"):
        raise ValueError(f"train.report_to must be 'tensorboard' or 'none'; got {train.report_to!r}.")
    if train.distributed not in DISTRIBUTED:
        raise ValueError(f"train.distributed must be one of {DISTRIBUTED}; got {train.distributed!r}.")


# ---------------------------------------------------------------------------------------------------
# Pipelines and LoRA
# ---------------------------------------------------------------------------------------------------


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights are stored in under a mixed-precision setting."""
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def build_pipeline(model: ModelSection, device: str | torch.device, dtype: torch.dtype = torch.float32):
    """Load (or build tiny) the pipeline of `model`, frozen, on `device` in `dtype`.

    Every component gets ``requires_grad_(False)``; trainers then make their adapter or the UNet
    trainable. A `prediction_type` override replaces the scheduler's config value.

    Example:
        >>> pipe = build_pipeline(ModelSection(tiny="sdxl"), "cpu", torch.float32)
    """
    from alignment.pipelines import adapter_class
    from alignment.tiny import load_pipeline, tiny_pipeline

    if model.tiny is not None:
        if model.tiny not in TINY_FAMILIES:
            raise ValueError(f"model.tiny must be one of {TINY_FAMILIES}; got {model.tiny!r}.")
        if adapter_class(model.tiny).is_flow and model.prediction_type is not None:
            raise ValueError(
                f"model.prediction_type={model.prediction_type!r} does not apply to {model.tiny}: flow models "
                "predict the velocity; remove the key."
            )
        pipe = tiny_pipeline(model.tiny, seed=model.tiny_seed, prediction_type=model.prediction_type)
    else:
        if not model.pipeline:
            raise ValueError("model.pipeline is empty; give a pipeline dir or hub id, or set model.tiny.")
        # Loaded straight in the weight dtype: an fp32 SDXL on the host is ~14 GB per process.
        pipe = load_pipeline(model.pipeline, device="cpu", dtype=dtype)
    if model.prediction_type is not None and pipe.scheduler.config.get("prediction_type") != model.prediction_type:
        if model.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"model.prediction_type must be one of {PREDICTION_TYPES}; got {model.prediction_type!r}.")
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=model.prediction_type)
    freeze_pipeline(pipe)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if model.tiny is not None and dtype != torch.float32:  # tiny pipelines are built in fp32
        pipe.to(dtype=dtype)
    return pipe


PIPELINE_MODULES = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def freeze_pipeline(pipe) -> None:
    """`requires_grad_(False)` on every network of the pipeline (denoiser, VAE, all text encoders)."""
    for name in PIPELINE_MODULES:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)


def build_adapter(pipe, model: ModelSection):
    """The family adapter of `pipe`, with the model section's flow-training settings applied.

    Example:
        >>> ad = build_adapter(pipe, ModelSection(tiny="sd3", weighting_scheme="mode"))
    """
    from alignment.pipelines import PipelineAdapter

    ad = PipelineAdapter(pipe)
    if ad.is_flow:
        ad.configure_timesteps(model.weighting_scheme or ad.default_weighting_scheme, model.logit_mean,
                               model.logit_std, model.mode_scale)
        if model.guidance is not None and hasattr(ad, "train_guidance"):
            ad.train_guidance = float(model.guidance)
        if model.max_sequence_length is not None:
            ad.max_sequence_length = int(model.max_sequence_length)
    elif model.weighting_scheme is not None:
        raise ValueError(
            f"model.weighting_scheme applies to flow-matching models; {ad.family} trains on uniform DDPM "
            "timesteps. Remove the key."
        )
    return ad


def check_guidance_settings(adapter, settings: dict) -> None:
    """Refuse or flag classifier-free-guidance settings a guidance-distilled family (FLUX) would ignore.

    `settings` maps config keys to values: ``*guidance_scale`` keys (for FLUX-dev the value of the distilled
    guidance embedding, not a CFG weight: values above 5 are CFG habits and warn; FLUX-schnell has neither and
    any value other than 1 warns) and ``*caption_dropout*`` / ``*empty_prompt*`` keys (dropping captions trains
    the unconditional branch of CFG, which these models never run: an error when > 0).

    Raises:
        ValueError: a caption-dropout setting > 0 for a family without CFG.
    """
    import warnings

    if adapter.uses_cfg:
        return
    embeds = getattr(adapter, "has_guidance_embeds", False)
    for key, value in settings.items():
        if value is None:
            continue
        if "dropout" in key or "empty_prompt" in key:
            if value > 0:
                raise ValueError(
                    f"{key}={value}: {adapter.family} is guidance-distilled and samples without classifier-free "
                    "guidance, so dropping captions trains a branch it never uses; set it to 0."
                )
        elif not embeds and value != 1:
            warnings.warn(
                f"{key}={value} is ignored: this {adapter.family} transformer has no guidance embedding "
                "(FLUX-schnell) and the family samples without classifier-free guidance; set it to 1.",
                stacklevel=3,
            )
        elif embeds and value > 5:
            warnings.warn(
                f"{key}={value}: {adapter.family} (FLUX-dev) has no classifier-free guidance; the value goes "
                "into its distilled guidance embedding, which was trained around 3.5 (the pipeline's default). "
                f"Set {key}: 3.5 unless you mean it.",
                stacklevel=3,
            )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def add_lora(
    unet: torch.nn.Module, lora: LoraSection, adapter_name: str = "default", seed: int | None = None
) -> list[torch.nn.Parameter]:
    """Freeze `unet`, add a peft LoRA adapter and return its (fp32) trainable parameters.

    B starts at zero (peft's "gaussian" init), so the adapted UNet equals the base model at step 0.
    peft draws A from the global RNG: with `seed`, A is drawn from that seed without disturbing the
    caller's RNG, so two runs of one config (and resumed runs) start alike.

    Example:
        >>> params = add_lora(pipe.unet, LoraSection(rank=8))
        >>> torch.optim.AdamW(params, lr=1e-5)
    """
    from peft import LoraConfig

    if lora.rank < 1:
        raise ValueError(f"lora.rank must be >= 1; got {lora.rank}.")
    unet = unwrap(unet)
    unet.requires_grad_(False)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
        lora_dropout=lora.dropout,
        init_lora_weights="gaussian",
        target_modules=list(lora.target_modules),
    )
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            unet.add_adapter(config, adapter_name=adapter_name)
    except ValueError as e:
        raise ValueError(
            f"lora.target_modules {list(lora.target_modules)} did not match the UNet's modules ({e}). "
            "Use attention projection names such as to_q, to_k, to_v, to_out.0."
        ) from None
    params = [p for p in unet.parameters() if p.requires_grad]
    # Trained weights stay fp32 even when the frozen base is bf16/fp16: Adam updates of ~1e-5 vanish in bf16.
    for p in params:
        p.data = p.data.float()
    return params


@contextlib.contextmanager
def disabled_adapter(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the base model: the LoRA adapter is off inside the block and back on after (even on error).

    Example:
        >>> with torch.no_grad(), disabled_adapter(unet):
        ...     ref_pred = unet(latents, t, encoder_hidden_states=emb).sample
    """
    inner = unwrap(unet)
    from torch.distributed.fsdp import FSDPModule

    if isinstance(inner, FSDPModule):
        # peft's disable/enable also flips the adapter weights' requires_grad, and FSDP2 keeps two tensors per
        # parameter (the sharded one and the gathered one the module holds between a forward and its reshard):
        # the flip lands on whichever is registered, and the root's LoRA (never resharded after a forward)
        # loses its gradient for good. Under FSDP only peft's per-layer switch is toggled; gradients never
        # reach a disabled adapter anyway, as its layers are skipped in the forward.
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in inner.modules() if isinstance(m, BaseTunerLayer)]
        before = [m._disable_adapters for m in layers]
        for m in layers:
            m._disable_adapters = True
        try:
            yield inner
        finally:
            for m, b in zip(layers, before):
                m._disable_adapters = b
        return
    inner.disable_adapters()
    try:
        yield inner
    finally:
        inner.enable_adapters()


def _pipeline_class(pipe_or_family):
    """(pipeline class, family adapter class) of a pipeline or a family name."""
    import diffusers

    from alignment.pipelines import adapter_class, families

    if isinstance(pipe_or_family, str):
        if pipe_or_family not in families():
            raise ValueError(f"pipe_or_family must be a pipeline or one of {sorted(families())}; got {pipe_or_family!r}.")
        cls = adapter_class(pipe_or_family)
        return getattr(diffusers, cls.pipeline_classes[0]), cls
    return type(pipe_or_family), adapter_class(pipe_or_family)


def export_lora(pipe_or_family, unet: torch.nn.Module, out_dir: str | os.PathLike, adapter_name: str = "default",
                state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the UNet's LoRA as ``out_dir/pytorch_lora_weights.safetensors`` for `pipe.load_lora_weights(out_dir)`.

    peft's state dict is converted to diffusers' key format and written by the pipeline class's own
    `save_lora_weights`, with the adapter config as metadata. The LoRA scale alpha/rank is baked into the
    saved up-projections (B·(alpha/r)) and the metadata says alpha = rank: loaders that ignore the metadata
    (`lora_state_dict` + `load_lora_into_unet`, `unet.load_lora_adapter(file)`) use scale 1, loaders that read
    it get 1 as well, so every loader rebuilds the trained model. The trained adapter itself is untouched.

    A sharded (FSDP) denoiser holds only a shard of each LoRA weight: gather them first on every process with
    `full_trainable_state` and pass the result as `state` (then one process writes).

    Example:
        >>> path = export_lora(pipe, pipe.unet, "out/lora")
        >>> fresh = StableDiffusionPipeline.from_pretrained(base); fresh.load_lora_weights("out/lora")
    """
    from peft.utils import get_peft_model_state_dict
    from torch.distributed.tensor import DTensor

    inner = unwrap(unet)
    if not getattr(inner, "peft_config", None) or adapter_name not in inner.peft_config:
        raise ValueError(
            f"the UNet has no LoRA adapter named {adapter_name!r}; add one with add_lora() first "
            "(full fine-tuning saves the UNet with unet.save_pretrained instead)."
        )
    cls, family = _pipeline_class(pipe_or_family)
    config = inner.peft_config[adapter_name]
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError("export_lora bakes one LoRA scale into the weights; adapters with per-module "
                         "rank_pattern/alpha_pattern are not supported (add_lora never makes them).")
    scale = config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r)
    if state is None and any(isinstance(p, DTensor) for p in inner.parameters() if p.requires_grad):
        raise ValueError("the denoiser is sharded (FSDP): gather its LoRA on every process with "
                         "full_trainable_state(model) and pass it as export_lora(..., state=...).")
    state = get_peft_model_state_dict(inner, state_dict=state, adapter_name=adapter_name)
    state = {k.replace(_AC_PREFIX, ""): (v.detach().float() * scale if "lora_B" in k else v.detach().float()).cpu().contiguous()
             for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = config.to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    metadata.update(lora_alpha=config.r, use_rslora=False)  # the scale now lives in the weights
    # the family knows the key format and keyword (SD/SDXL: diffusers keys as unet_lora_layers; SD3/FLUX:
    # peft keys as transformer_lora_layers, as each family's official diffusers training script saves them)
    family.save_lora(cls, out, state, metadata, LORA_WEIGHT_NAME)
    return out / LORA_WEIGHT_NAME


# ---------------------------------------------------------------------------------------------------
# accelerate: setup, checkpoints, progress
# ---------------------------------------------------------------------------------------------------


def make_accelerator(train: TrainSection, output_dir: str | os.PathLike | None = None):
    """An `Accelerator` with the section's mixed precision and accumulation, logging to tensorboard.

    Launch settings (`accelerate launch --num_processes N --cpu ...`) come through the environment.

    Example:
        >>> acc = make_accelerator(TrainSection(mixed_precision="bf16", gradient_accumulation_steps=4), "out")
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin, ProjectConfiguration

    precision = "no" if train.mixed_precision is False else train.mixed_precision  # YAML: bare `no` is false
    if precision not in PRECISIONS:
        raise ValueError(f"train.mixed_precision must be one of {PRECISIONS}; got {train.mixed_precision!r}.")
    out = Path(output_dir or train.output_dir)
    log_with = None
    if train.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            try:
                import tensorboardX  # noqa: F401

                log_with = "tensorboard"
            except ImportError:
                # Logs still go to the JSONL file every trainer writes; say how to get tensorboard's.
                warnings.warn(
                    "train.report_to is 'tensorboard' but tensorboard is not installed; logging to "
                    "metrics.jsonl only. Install it with `pip install reward-plugins[train]`.",
                    stacklevel=2,
                )
                log_with = None
    _reset_single_process_state(precision)
    # Step counting must not depend on where an epoch ends (trainers cycle epochs themselves), or a resumed
    # run would sync gradients at different micro-batches than an uninterrupted one.
    plugin = GradientAccumulationPlugin(num_steps=train.gradient_accumulation_steps, sync_with_dataloader=False)
    # DDP broadcasts buffers from rank 0 on every forward, a collective: processes that call the denoiser a
    # different number of times per step (AlignProp's random K) would deadlock. The trained networks' buffers
    # (position embeddings, frozen norms) are identical everywhere, so there is nothing to broadcast.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    fsdp = fsdp_plugin() if getattr(train, "distributed", "auto") == "fsdp" else None
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_plugin=plugin,
        kwargs_handlers=[ddp],
        fsdp_plugin=fsdp,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if fsdp is not None:
        _fsdp_on_cpu(accelerator, fsdp)
    return accelerator


def fsdp_plugin():
    """accelerate's FSDP2 plugin as the trainers use it (``train.distributed: fsdp``).

    Transformer-block auto-wrap (each block of the family adapter's `fsdp_block_classes` is one FSDP unit,
    set by `prepare_denoiser`; ``FSDP_TRANSFORMER_CLS_TO_WRAP`` in the environment overrides them), parameters
    resharded after every forward (ZeRO-3: only one block is gathered at a time, which the many denoiser calls
    of a sampling loop need to stay within memory) and sharded checkpoints (torch.distributed.checkpoint).
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(  # unset fields (FSDP_OFFLOAD_PARAMS, ...) come from the environment
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )


def _fsdp_on_cpu(accelerator, plugin) -> None:
    """Turn on FSDP for a multi-process CPU (gloo) run, which accelerate leaves on DDP.

    accelerate (1.15) sets ``DistributedType.FSDP`` only for accelerator backends and silently runs DDP on
    CPU, while torch's FSDP2 (`fully_shard` on a CPU device mesh) runs on gloo; the state is switched so
    that a CPU run goes through the same accelerate FSDP2 code (prepare, clipping, no_sync, checkpoints) as
    a GPU one. That is what the 2-process CPU tests check. bf16 gets accelerate's FSDP2 mixed-precision policy;
    fp16 is refused.
    """
    from accelerate.utils import DistributedType

    if accelerator.device.type != "cpu" or accelerator.num_processes < 2:
        return
    if accelerator.mixed_precision == "fp16":  # FSDP2 would need accelerate's sharded grad scaler, made at init
        raise ValueError("train.distributed=fsdp on CPU runs in fp32 or bf16; got train.mixed_precision='fp16'. "
                         "Use bf16 or no, or run FSDP on GPUs.")
    if accelerator.mixed_precision == "bf16":  # what accelerate does for FSDP on GPUs: bf16 all-gathers and compute
        plugin.set_mixed_precision("bf16")
    from accelerate.state import PartialState

    # Both shared states: every `AcceleratorState()` (the optimizer wrapper makes one) copies PartialState's over its own.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin  # this run's (a second trainer in the process gets its own)


def check_fsdp_sections(train: TrainSection, lora: LoraSection) -> None:
    """What every trainer needs under ``train.distributed: fsdp``: a LoRA (the export and the reference
    copy assume one) and no EMA (its average would be sharded and checkpointed by one process).

    Raises:
        ValueError: naming the setting to change.
    """
    if train.ema_decay:
        raise ValueError("train.ema_decay with train.distributed=fsdp is not supported (the average would be "
                         "sharded and checkpointed by one process); set train.ema_decay=0.")
    if not lora.enabled:
        raise ValueError("train.distributed=fsdp trains a LoRA (lora.enabled=true); full fine-tuning under FSDP "
                         "is not supported by the trainers' reference copy and export.")


def is_sharded(accelerator) -> bool:
    """True when the denoiser is (to be) sharded with FSDP: every process must then make the same denoiser
    calls (each call all-gathers the blocks' parameters), and state leaves the model only through collectives."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP and accelerator.num_processes > 1


def prepare_denoiser(accelerator, adapter, denoiser: torch.nn.Module, *objects, activation_checkpointing: bool = False):
    """`accelerator.prepare(denoiser, *objects)`, under FSDP with the family's block classes as FSDP units.

    Only the denoiser is prepared: text encoders, VAE and rewards stay whole on every process (frozen, used
    without gradients to the weights). Under FSDP the trainable parameters are replaced by sharded ones
    (DTensors): take them again from the returned module (`trainable_parameters`). `activation_checkpointing`
    (FSDP only) recomputes each block in backward (accelerate's checkpoint wrapper inside each FSDP unit); a
    checkpoint around the whole sharded denoiser does not recompute the same tensors, so callers turn theirs off.

    Example:
        >>> unet, opt = prepare_denoiser(accelerator, adapter, adapter.denoiser, optimizer)
        >>> params = trainable_parameters(unet)
    """
    if is_sharded(accelerator):
        plugin = accelerator.state.fsdp_plugin
        blocks = getattr(adapter, "fsdp_block_classes", ())
        if plugin.auto_wrap_policy is None and blocks:  # an FSDP launch config without an auto-wrap policy
            from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

            plugin.auto_wrap_policy = transformer_auto_wrap_policy
        if plugin.transformer_cls_names_to_wrap is None and blocks:
            plugin.transformer_cls_names_to_wrap = list(blocks)
        plugin.activation_checkpointing = plugin.activation_checkpointing or bool(activation_checkpointing)
    return accelerator.prepare(denoiser, *objects)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters with ``requires_grad`` of a (prepared) model, in module order."""
    return [p for p in unwrap(model).parameters() if p.requires_grad]


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: cpu tensor}`` of the trainable parameters, whole: sharded (FSDP) ones are all-gathered, so under
    FSDP every process must call this at the same point (a collective); unsharded ones are copied. Names are
    `named_parameters`' (with accelerate's activation checkpointing they hold ``_checkpoint_wrapped_module.``)."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            t = p.detach()
            state[name] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu().contiguous()
    return state


_AC_PREFIX = "_checkpoint_wrapped_module."  # torch's checkpoint_wrapper (accelerate's FSDP activation checkpointing)


def _reset_single_process_state(precision: str) -> None:
    """Let one process run several trainings with different precisions (notebooks, tests).

    accelerate keeps one process-wide `AcceleratorState` and refuses a second `Accelerator` with another
    mixed precision. Outside a distributed launch nothing else depends on that state, so it is reset.
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    if dist.is_available() and dist.is_initialized():
        return
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") not in (None, precision):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def register_trainable_state_hooks(accelerator) -> None:
    """Make `accelerator.save_state` store only trainable parameters of the prepared models.

    With LoRA that is a few MB instead of the whole UNet; with full fine-tuning it is every weight.
    Frozen weights come back from the base pipeline on resume. Optimizer, scheduler, grad scaler and
    RNG states are still saved by accelerate itself. Under FSDP accelerate writes the sharded model and
    optimizer itself (torch.distributed.checkpoint, frozen weights included: the FSDP2 path has no
    trainable-only option) and these hooks stand aside.
    """
    from accelerate.utils import DistributedType
    from safetensors.torch import save_file

    from reward_plugins.checkpoints import load_safetensors

    def save_hook(models, weights, output_dir):
        if accelerator.distributed_type == DistributedType.FSDP:
            return
        for i, model in enumerate(models):
            state = {n: p.detach().cpu().contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}
            if accelerator.is_main_process:
                save_file(state, os.path.join(output_dir, TRAINABLE_FILE.format(i=i)))
        weights.clear()  # accelerate would otherwise write the full (mostly frozen) state dicts

    def load_hook(models, input_dir):
        if accelerator.distributed_type == DistributedType.FSDP:
            return
        for i, model in enumerate(models):
            path = os.path.join(input_dir, TRAINABLE_FILE.format(i=i))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint {input_dir!r} lacks {os.path.basename(path)}; it is incomplete.")
            state = load_safetensors(path)  # a truncated file: one line naming it, not a Rust error
            params = dict(unwrap(model).named_parameters())
            unknown = sorted(set(state) - set(params))
            if unknown:
                raise ValueError(
                    f"checkpoint {input_dir!r} holds parameters the model lacks (e.g. {unknown[:3]}); "
                    "was it written with another model or LoRA config?"
                )
            with torch.no_grad():
                for name, tensor in state.items():
                    params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"{CHECKPOINT_PREFIX}{step:07d}"


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None = None, extra: dict | None = None) -> Path:
    """`accelerator.save_state` into ``output_dir/checkpoints/checkpoint-<step>`` plus ``trainer_state.json``.

    The JSON is written last: a checkpoint interrupted mid-write has none and `latest_checkpoint`
    ignores it. `total_limit` keeps the newest n complete checkpoints.
    """
    path = checkpoint_dir(output_dir, step)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        tmp = path / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({"step": int(step), **(extra or {})}, indent=2))
        os.replace(tmp, path / STATE_FILE)
        if total_limit:
            done = _complete_checkpoints(output_dir)
            for old, _ in done[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def _complete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[Path, int]]:
    root = Path(output_dir) / CHECKPOINT_DIR
    found = []
    if root.is_dir():
        for d in root.iterdir():
            state = d / STATE_FILE
            if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX) and state.is_file():
                try:
                    found.append((d, int(json.loads(state.read_text())["step"])))
                except (ValueError, KeyError, TypeError):
                    continue
    return sorted(found, key=lambda x: x[1])


def latest_checkpoint(output_dir: str | os.PathLike) -> tuple[Path, int] | None:
    """(path, step) of the newest complete checkpoint under `output_dir`, or None."""
    done = _complete_checkpoints(output_dir)
    return done[-1] if done else None


def read_checkpoint_state(path: str | os.PathLike) -> dict:
    """The JSON written beside a checkpoint (its step and any trainer extras)."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def progress_bar(accelerator, total: int, initial: int = 0, desc: str = "steps"):
    """A tqdm bar on the main process only (silent elsewhere)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True)


class EMA:
    """Exponential moving average of trained parameters, the same for every trainer.

    After each optimizer step, ``shadow ← d·shadow + (1 − d)·param`` with diffusers' `EMAModel` schedule
    (no power warm-up): update n uses ``d = min(decay, n / (n + 9))``, and 0 for the first update, so the
    average does not stay stuck at the initial weights. The shadow is fp32 on the parameters' device.

    Example:
        >>> ema = EMA(params, decay=0.9999)
        >>> optimizer.step(); ema.update()
        >>> with ema.applied():          # validate or export the averaged weights
        ...     export_lora(pipe, unet, out)
        >>> accelerator.register_for_checkpointing(ema)   # or make_ema(...), which does it
    """

    def __init__(self, params, decay: float) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1) (ReFL uses 0.9999); got {decay!r}.")
        self.params = list(params)
        self.decay = float(decay)
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.num_updates = 0

    def current_decay(self, n: int) -> float:
        """The decay of the n-th update (1-based)."""
        step = n - 1
        return 0.0 if step <= 0 else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        d = self.current_decay(self.num_updates)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - d)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the parameters inside the block, the trained ones back after (even on error)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.detach().cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("the checkpoint's EMA does not match the trained parameters (another model or LoRA config?).")
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        self.shadow = [s.to(p.device, torch.float32).clone() for s, p in zip(shadow, self.params)]


def make_ema(accelerator, params, train: TrainSection) -> EMA | None:
    """An `EMA` of `params` when ``train.ema_decay > 0`` (registered with `accelerator` so checkpoints carry
    it and resumes restore it), else None. Call ``ema.update()`` after every optimizer step."""
    if not train.ema_decay:
        return None
    ema = EMA(params, train.ema_decay)
    accelerator.register_for_checkpointing(ema)
    return ema


@contextlib.contextmanager
def ema_weights(ema: EMA | None) -> Iterator[None]:
    """`ema.applied()`, or nothing when there is no EMA: ``with ema_weights(self.ema): validate()``."""
    if ema is None:
        yield
    else:
        with ema.applied():
            yield


class JsonlLogger:
    """Append-only scalar log (``metrics.jsonl``) beside tensorboard, readable without tensorboard."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def log(self, values: dict, step: int) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": int(step), **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def drop_log_rows_after(path: str | os.PathLike, step: int) -> None:
    """Keep only the rows of a `JsonlLogger` file logged at steps <= `step` (a resumed run's checkpoint): rows
    an interrupted run wrote after its last checkpoint are logged again by the resumed run."""
    p = Path(path)
    if p.is_file():
        rows = [r for r in read_jsonl(p) if int(r.get("step", 0)) <= step]
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, p)


def resume_tracker_kwargs(step: int) -> dict:
    """`accelerator.init_trackers(..., init_kwargs=...)` for a run resumed at `step`: tensorboard purges the
    events at later steps that the interrupted run wrote (SummaryWriter's `purge_step`)."""
    return {"tensorboard": {"purge_step": int(step) + 1}} if step > 0 else {}


def mean_over_processes(accelerator, scalars: dict) -> dict:
    """Each scalar averaged over the processes (unchanged with one process); every process gets the result."""
    if accelerator.num_processes == 1:
        return scalars
    keys = sorted(scalars)
    vec = torch.tensor([scalars[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    vec = accelerator.reduce(vec, reduction="mean")
    return {k: float(v) for k, v in zip(keys, vec.tolist())}


def log_scalars(accelerator, logger: JsonlLogger, report_to: str, scalars: dict, step: int) -> None:
    """One row to ``metrics.jsonl`` and, when tensorboard is on, to accelerate's trackers."""
    logger.log(scalars, step)
    if accelerator.log_with and report_to == "tensorboard":
        accelerator.log(scalars, step=step)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []
