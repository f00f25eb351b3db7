"""`reward-align train-rl`: policy-gradient training for any reward, differentiable or not: DDPO (DDIM
eta > 0) on SD/SDXL and Flow-GRPO (the flow SDE, or CPS) on SD3/FLUX, with LoRA; launch with
`accelerate launch` for several GPUs (rollouts are split, advantages use the gathered groups).

Example:
    reward-align train-rl --method ddpo --config configs/tiny/rl_ddpo.yaml --output-dir outputs/ddpo
    reward-align train-rl --method ddpo --config configs/tiny/rl_ddpo.yaml --output-dir outputs/ddpo --resume
    reward-align train-rl --method grpo --config configs/sd35m_grpo_lescore.yaml method.kl_weight=0.04
"""

from __future__ import annotations

import argparse
import json

from ._training import add_training_args, method_overrides

METHOD_CHOICES = ("ddpo", "grpo")


def run(args: argparse.Namespace) -> int:
    from ..configs import load_config
    from ..trainers.policy_gradient import PolicyGradientConfig, PolicyGradientTrainer

    cfg = load_config(PolicyGradientConfig, args.config, method_overrides(args))
    trainer = PolicyGradientTrainer(cfg)
    summary = trainer.train(resume=args.resume)
    if trainer.accelerator.is_main_process:
        rows = summary["first"], summary["last"]
        print(json.dumps({
            "method": cfg.method.name, "epochs": summary["epochs"], "lora": summary["lora"],
            "metrics": summary["metrics"], "nan_rewards": summary["nan_rewards"],
            "reward_first": rows[0].get("reward/mean"), "reward_last": rows[1].get("reward/mean"),
            "val_reward_start": rows[0].get("val/reward/mean"), "val_reward_end": rows[1].get("val/reward/mean"),
        }, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train-rl", help="policy-gradient training for any reward: ddpo (SD/SDXL), grpo (SD3/FLUX)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", choices=METHOD_CHOICES, help="overrides method.name in the config")
    add_training_args(p, "YAML config (see configs/tiny/rl_*.yaml, configs/sd15_ddpo_aesthetic.yaml)",
                      "train.lr=1e-4 method.group_size=8")
    p.set_defaults(func=run)
