"""The efficacy benchmark's registry and shared machinery: what a method receives, how it is judged.

A method is one ``@method(name, reward)`` function ``fn(ctx) -> dict`` in one of this package's modules
(one module per family of methods, so each can be tuned on its own). It returns either the trained
pipeline (``{"pipe": ..., "samples": int}``) or, for selection methods, the measured scores
(``{"exact": {dim: acc}, "reward": float, "samples": int}``). A method names the base model it starts from
and is compared against (``base=``: ``sd``, the toy `StableDiffusionPipeline`, or ``flow``, its
flow-matching `StableDiffusion3Pipeline` twin; see `BASES`).

The measurements quoted in the method modules' comments were taken on the first toy VAE decoder (SD base
0.188, flow base 0.229) unless they say otherwise. On 2026-12-02 the decoder was fine-tuned
(`examples/toyworld/finetune_decoder.py`; SD base 0.236, flow base 0.271), and the README's standings table
has every entry re-measured on the shipped weights.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from alignment.best_of_n import best_of_n
from alignment.pipelines import SD3Adapter
from alignment.toyworld import models, world
from reward_plugins import create_reward

DIMS = ("color", "shape", "position", "overall")
TARGET_GAIN = 0.10  # the project's bar: +10 points of held-out exact accuracy, overall and on every dimension
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]


@dataclass(frozen=True)
class Base:
    """A base model: its loader, its shipped dir, the T5 length it is sampled and trained with (None: the
    pipeline's default), the gradient sampling loop's scheduler and the LoRA target modules."""

    load: Callable[..., object]
    path: Path
    max_sequence_length: int | None = None
    scheduler: str = "ddim"
    lora_targets: tuple[str, ...] = tuple(LORA_TARGETS)

    @property
    def pipeline_kwargs(self) -> dict:
        return {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}


BASES: dict[str, Base] = {
    "sd": Base(models.load_pipeline, models.PIPELINE_DIR),
    # The SD3 adapter's LoRA targets: both streams' joint-attention projections (diffusers' SD3 LoRA script).
    "flow": Base(models.load_flow_pipeline, models.FLOW_DIR, models.FLOW_MAX_SEQUENCE_LENGTH, "flow_euler",
                 SD3Adapter.lora_target_modules),
}


@dataclass
class Context:
    """What a method gets: a fresh base pipeline, a work dir, and the shared sampling settings."""

    pipe: object
    workdir: Path
    steps: int
    guidance: float
    scale: float  # budget multiplier (--budget): 1.0 is the default budget of each method
    seed: int = 0
    bon_slots: int = world.EVAL_IMAGES_PER_PROMPT
    base: str = "sd"

    def budget(self, n: int) -> int:
        return max(1, int(round(n * self.scale)))


@dataclass
class MethodSpec:
    name: str
    reward: str
    run: Callable[[Context], dict]
    description: str = ""
    base: str = "sd"


METHODS: dict[str, MethodSpec] = {}


def method(name: str, reward: str, description: str = "", base: str = "sd"):
    """Register a benchmark method trained on (or selecting by) the reward named `reward`, starting from and
    compared against the base model `base` (a key of `BASES`)."""
    if base not in BASES:
        raise ValueError(f"unknown base model {base!r} for method {name!r}; use one of {sorted(BASES)}.")

    def deco(fn: Callable[[Context], dict]) -> Callable[[Context], dict]:
        if name in METHODS:
            raise ValueError(f"benchmark method {name!r} is already registered.")
        METHODS[name] = MethodSpec(name, reward, fn, description or (fn.__doc__ or "").strip().split("\n")[0], base)
        return fn

    return deco


def evaluate(pipe, train_reward: str, steps: int, guidance: float, base: str = "sd") -> dict:
    """Held-out prompts x held-out seeds: exact oracle accuracy per dimension and the mean training reward
    (`base` names the model family's sampling arguments)."""
    exact = create_reward("toyworld-exact")
    res = best_of_n(pipe, world.heldout_prompts(), exact, world.EVAL_IMAGES_PER_PROMPT, k=1, batch_size=48,
                    seed=world.EVAL_SEED, num_inference_steps=steps, guidance_scale=guidance, progress=False,
                    pipeline_kwargs=BASES[base].pipeline_kwargs or None)
    images = res.images.flatten(0, 1)
    prompts = [p for p in res.prompts for _ in range(res.n)]
    reward = create_reward(train_reward)
    with torch.no_grad():
        r = torch.cat([reward.score(images[i : i + 48], prompts[i : i + 48]).scores for i in range(0, len(prompts), 48)])
    return {"exact": {d: float(res.per_dim[d].mean()) for d in DIMS}, "reward": float(r.mean()),
            "images": len(prompts)}


def load_base(device: str = "cpu", base: str = "sd"):
    return BASES[base].load(device=device)


def common_train(ctx: Context, name: str, steps: int, lr: float, batch: int, lora_kw: dict | None = None):
    """The model, LoRA and train sections every trainer method shares (LoRA rank 8 on the attention;
    `lora_kw`: other `LoraSection` fields, e.g. ``{"enabled": False}`` for full fine-tuning)."""
    from alignment.trainers.common import LoraSection, ModelSection, TrainSection

    # A method trains from scratch every time it runs (a finished one is skipped via results.json): a
    # training dir left by an interrupted or --force run would make the trainer refuse to start.
    shutil.rmtree(ctx.workdir / name, ignore_errors=True)
    b = BASES[ctx.base]
    model = ModelSection(pipeline=str(b.path), max_sequence_length=b.max_sequence_length)
    lora = LoraSection(**{"rank": 8, "target_modules": list(b.lora_targets), **(lora_kw or {})})
    train = TrainSection(seed=ctx.seed, lr=lr, max_steps=ctx.budget(steps), batch_size=batch, save_every=0,
                         log_every=1, validate_every=0, output_dir=str(ctx.workdir / name), report_to="none",
                         max_grad_norm=1.0, weight_decay=0.0)
    return model, lora, train


def reward_finetune_trainer(ctx: Context, name: str, reward: str | dict, steps: int, lr: float, batch: int = 8,
                            work_name: str | None = None, train_kw: dict | None = None, lora_kw: dict | None = None,
                            **method_kw):
    """The `RewardFinetuner` (built, not trained) with method `name` (draft, draft-lv, alignprop, refl, rwr) on
    reward `reward` (`train_kw` / `lora_kw`: other `TrainSection` / `LoraSection` fields than `common_train`'s,
    e.g. ``{"lr_scheduler": "cosine"}``, ``{"target_modules": [...]}``); probes that train step by step
    (efficacy_curve.py, rwr_probe.py) build theirs here so they run exactly the benchmark's setup."""
    from alignment.trainers.reward_finetune import (
        DataSection,
        MethodSection,
        RewardFinetuneConfig,
        RewardFinetuner,
        RewardSection,
        SamplingSection,
    )

    model, lora, train = common_train(ctx, work_name or name, steps, lr, batch, lora_kw)
    if train_kw:
        train = dataclasses.replace(train, **train_kw)
    cfg = RewardFinetuneConfig(
        model=model, lora=lora, train=train, method=MethodSection(name=name, **method_kw),
        sampling=SamplingSection(num_steps=ctx.steps, guidance_scale=ctx.guidance, scheduler=BASES[ctx.base].scheduler,
                                 checkpoint_unet=False, checkpoint_vae=False),
        reward=RewardSection(terms=reward if isinstance(reward, dict) else {reward: 1.0}, normalize=False),
        data=DataSection(prompts=world.train_prompts(), val_prompts=world.train_prompts()[:2]),
    )
    return RewardFinetuner(cfg, pipe=ctx.pipe)


def reward_finetune(ctx: Context, name: str, reward: str | dict, steps: int, lr: float, batch: int = 8,
                    work_name: str | None = None, train_kw: dict | None = None, lora_kw: dict | None = None,
                    **method_kw) -> dict:
    """Train `reward_finetune_trainer(...)` to its last step: the benchmark's reward fine-tuning entries."""
    trainer = reward_finetune_trainer(ctx, name, reward, steps, lr, batch, work_name, train_kw, lora_kw, **method_kw)
    summary = trainer.train()
    per_step = batch * (method_kw.get("lv_n", 1) if name == "draft-lv" else 1)
    return {"pipe": trainer.pipe, "samples": summary["step"] * per_step}
