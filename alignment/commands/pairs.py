"""`reward-align pairs`: mine preference pairs (N images per prompt, ranked by a reward) into a Pick-a-Pic style
parquet dataset for Diffusion-DPO. A killed run resumes when started again with the same settings.

Example:
    reward-align pairs --config configs/sd15_pairs.yaml --output-dir data/pairs
    accelerate launch -m alignment.cli pairs --config configs/sd15_pairs.yaml     # one shard set per GPU
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from ..configs import count
from .best_of_n import (
    GenerationConfig,
    add_generation_args,
    build_pipeline,
    build_reward,
    config_from_args,
    read_prompts,
    resolve_device,
    resolve_dtype,
)


@dataclass
class PairsJobConfig(GenerationConfig):
    """`reward-align pairs`: see `alignment.pairs.mine_pairs` for `rule`, `dimension`, `margin`, `shard_size`,
    `pairs_per_prompt` (null = every qualifying pair) and `image_format` ('png' or 'jpeg')."""

    n: int = count(4, minimum=2)
    rule: str = "composite"
    dimension: str | None = None
    margin: float = 0.0
    shard_size: int = count(16)
    pairs_per_prompt: int | None = count(1)
    image_format: str = "png"
    output_dir: str = "outputs/pairs"


def _accelerator():
    """An accelerate `Accelerator` when launched on several processes (accelerate launch / torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        return Accelerator()
    return None


def run(args: argparse.Namespace) -> int:
    from ..configs import save_config
    from ..pairs import mine_pairs

    cfg = config_from_args(PairsJobConfig, args, ("rule", "dimension", "margin", "shard_size", "pairs_per_prompt",
                                                  "image_format"))
    prompts = read_prompts(cfg)
    accelerator = _accelerator()
    device = str(accelerator.device) if accelerator is not None else resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    pipe = build_pipeline(cfg.pipeline, device, dtype)
    reward = build_reward(cfg, device, dtype)
    res = mine_pairs(
        pipe, prompts, reward, cfg.n, cfg.output_dir, rule=cfg.rule, dimension=cfg.dimension, margin=cfg.margin,
        shard_size=cfg.shard_size, seed=cfg.seed, batch_size=cfg.batch_size,
        num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, height=cfg.height,
        width=cfg.width, pairs_per_prompt=cfg.pairs_per_prompt, image_format=cfg.image_format,
        accelerator=accelerator, progress=args.progress,
    )
    if accelerator is None or accelerator.is_main_process:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        resumed = f" ({len(res.skipped_blocks)} shard block(s) were already done)" if res.skipped_blocks else ""
        print(f"{res.num_pairs} pairs from {res.num_prompts} prompts in {len(res.files)} shard(s) under "
              f"{cfg.output_dir}{resumed}.")
        print(f"load them with: datasets.load_dataset({cfg.output_dir!r}, split='train')  "
              f"(columns caption, jpg_0, jpg_1, label_0, scores and seeds)")
        print(f"diffusers' Diffusion-DPO examples read them with --dataset_name {cfg.output_dir} "
              "--dataset_split_name train (there is only a train split); reward-align train-dpo with "
              f"data.path={cfg.output_dir}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pairs", help="mine preference pairs for Diffusion-DPO (parquet, resumable)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_args(p)
    p.add_argument("--rule", choices=("dimension", "composite", "dominance"))
    p.add_argument("--dimension", help="the dimension for --rule dimension (e.g. fidelity)")
    p.add_argument("--margin", type=float, help="minimum winning gap")
    p.add_argument("--shard-size", dest="shard_size", type=int, help="prompts per parquet shard")
    p.add_argument("--pairs-per-prompt", dest="pairs_per_prompt", type=int)
    p.add_argument("--image-format", dest="image_format", choices=("png", "jpeg"))
    p.set_defaults(func=run)
