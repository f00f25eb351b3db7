"""`reward-align`: the command line. Each subcommand lives in `alignment/commands/<name>.py` and
exposes `register(subparsers)`; every module there is discovered, so adding a command is adding a file."""

from __future__ import annotations

import argparse
import importlib
import logging
import pickle
import pkgutil
import sys

from . import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reward-align",
        description="Differentiable text-to-image rewards for diffusers: scoring, best-of-N, DPO pairs, training.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


class _NoTorchvisionFallbackNotice(logging.Filter):
    """transformers announces its PIL image-processor fallback when torchvision is absent; this project
    never installs torchvision (it breaks transformers under CPU torch), so the notice is only noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


class _NoEmptyFloat32CastNotice(logging.Filter):
    """diffusers warns on every `model.to(dtype)` that "modules ... should be kept in float32: []" even when
    that list is empty (every tiny pipeline, every dtype cast): only the non-empty warning means anything."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFloat32CastNotice())
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError, TypeError, pickle.UnpicklingError, ConnectionError) as e:
        # User errors (a remote reward server that is down included): one clear line, no traceback.
        # Programming errors still raise.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        msg = " ".join(str(msg).split())  # one line, whatever the message's own layout
        print(f"reward-align {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
