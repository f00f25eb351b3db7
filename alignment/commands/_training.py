"""Options every training command shares (`train-dpo`, `train-reward`, `train-rl`)."""

from __future__ import annotations

import argparse


def add_training_args(p: argparse.ArgumentParser, config_help: str, overrides_example: str) -> None:
    """--config, --output-dir, --resume and trailing KEY=VALUE config overrides."""
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--output-dir", help="overrides train.output_dir")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"config overrides, e.g. {overrides_example}")


def method_overrides(args: argparse.Namespace) -> list[str]:
    """The KEY=VALUE overrides plus `--method` (method.name) and `--output-dir` (train.output_dir) as overrides."""
    overrides = list(args.overrides or [])
    if getattr(args, "method", None):
        overrides.append(f"method.name={args.method}")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    return overrides
