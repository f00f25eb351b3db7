"""`reward-align train-reward`: reward fine-tuning (RWR, DRaFT-K, DRaFT-LV, AlignProp, ReFL) of a
diffusers UNet with LoRA; launch with `accelerate launch` for several GPUs.

Example:
    reward-align train-reward --method draft --config configs/tiny/reward_draft.yaml --output-dir outputs/draft
    reward-align train-reward --method draft --config configs/tiny/reward_draft.yaml --output-dir outputs/draft --resume
    reward-align train-reward --config configs/sd15_reward_draft.yaml method.k=2 train.lr=5e-4
"""

from __future__ import annotations

import argparse
import json

from ._training import add_training_args, method_overrides

METHOD_CHOICES = ("rwr", "draft", "draft-lv", "alignprop", "refl")


def run(args: argparse.Namespace) -> int:
    from ..configs import load_config
    from ..trainers.reward_finetune import RewardFinetuneConfig, RewardFinetuner

    cfg = load_config(RewardFinetuneConfig, args.config, method_overrides(args))
    trainer = RewardFinetuner(cfg)
    summary = trainer.train(resume=args.resume)
    if trainer.accelerator.is_main_process:
        first, last = summary["first"], summary["last"]
        print(json.dumps({
            "method": cfg.method.name, "steps": summary["step"], "lora": summary["lora"], "metrics": summary["metrics"],
            "val_reward_start": first.get("val/reward/mean"), "val_reward_end": last.get("val/reward/mean"),
        }, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train-reward", help="reward fine-tuning: rwr, draft, draft-lv, alignprop, refl",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", choices=METHOD_CHOICES, help="overrides method.name in the config")
    add_training_args(
        p, "YAML config (see configs/tiny/reward_*.yaml, configs/sd15_reward_*.yaml)", "train.lr=1e-4 method.k=2"
    )
    p.set_defaults(func=run)
