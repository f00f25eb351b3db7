"""Run one efficacy entry function with other arguments, judged exactly as `efficacy.py` judges an entry.

Sweeps call the entry functions of `efficacy_methods/` with changed settings; this runs one such call, an
expression of `ctx`, in a fresh `Context` (the base pipeline, seeding, `run_method` and `evaluate` of
efficacy.py), and appends a row to ``<out>/calls.jsonl``:

    python examples/benchmarks/efficacy_call.py --tag dpo_full 'dpo(ctx, "sigmoid", lora_kw={"enabled": False}, lr=1e-4)'
    python examples/benchmarks/efficacy_call.py --tag rwr_s1 --seed 1 'rwr(ctx)'
    python examples/benchmarks/efficacy_call.py --tag grpo --base flow --reward toyworld 'flow_grpo_soft(ctx)'

Names the expression can use: every public function of the `efficacy_methods` modules (``dpo``, ``rwr``,
``flow_grpo``, ``reward_finetune``, ...) and their constants (``SOFT_TERMS``, ``STEP0``, ``RWR_LORA_TARGETS``).
`--vae-state FILE` swaps a VAE state dict (e.g. `toyworld_vae_ceiling.py --save`) into the base pipeline for
the base evaluation, the training and the final evaluation alike.
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.benchmarks.efficacy import run_method  # noqa: E402
from examples.benchmarks.efficacy_methods import DIMS, MethodSpec, evaluate, load_base  # noqa: E402
from examples.benchmarks.efficacy_methods.registry import BASES  # noqa: E402

MODULES = [importlib.import_module(f"examples.benchmarks.efficacy_methods.{m}")
           for m in ("registry", "dpo", "flow", "gradient", "policy_gradient", "rwr")]


def namespace() -> dict:
    """The names an expression may use: the public attributes of every efficacy method module."""
    ns = {}
    for mod in MODULES:
        ns.update({k: v for k, v in vars(mod).items() if not k.startswith("_")})
    return ns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("call", help="an expression of ctx returning an entry's dict, e.g. 'dpo(ctx, \"hinge\", steps=100)'")
    p.add_argument("--tag", required=True, help="the row's name and its work dir under --out")
    p.add_argument("--base", default="sd", choices=sorted(BASES))
    p.add_argument("--reward", default="toyworld-clip", help="the training reward reported before -> after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=10, help="sampler steps")
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--vae-state", type=Path, help="a VAE state dict swapped into the base pipeline")
    p.add_argument("--out", type=Path, default=Path("outputs/efficacy_calls"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    ns = namespace()
    try:
        code = compile(args.call, "<call>", "eval")
    except SyntaxError as e:
        print(f"error: the call {args.call!r} is not a Python expression ({e.msg}); pass e.g. 'dpo(ctx, \"sigmoid\")'.",
              file=sys.stderr)
        return 2
    unknown = sorted(n for n in code.co_names if n != "ctx" and n not in ns and not hasattr(builtins, n))
    if unknown:
        print(f"error: the call uses unknown name(s) {unknown}; known: {', '.join(sorted(k for k in ns if callable(ns[k])))}.",
              file=sys.stderr)
        return 2
    if args.vae_state is not None and not args.vae_state.is_file():
        print(f"error: --vae-state {args.vae_state} is not a file; write one with toyworld_vae_ceiling.py --save.",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    vae_state = torch.load(args.vae_state) if args.vae_state else None

    def swap(pipe):
        if vae_state is not None:
            pipe.vae.load_state_dict(vae_state)
        return pipe

    before = evaluate(swap(load_base(base=args.base)), args.reward, args.steps, args.guidance, base=args.base)

    def call(ctx):
        swap(ctx.pipe)
        return eval(code, {**ns, "ctx": ctx})

    spec = MethodSpec(args.tag, args.reward, call, base=args.base)
    settings = argparse.Namespace(seed=args.seed, steps=args.steps, guidance=args.guidance, budget=1.0,
                                  bon_slots=8)
    row = run_method(spec, {"exact": before["exact"], "rewards": {args.reward: before["reward"]}}, settings,
                     args.out / args.tag)
    out = {"tag": args.tag, "call": args.call, "seed": args.seed, "base": args.base,
           "vae_state": str(args.vae_state) if args.vae_state else None, **row.__dict__,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "calls.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")
    fmt = lambda ex: ", ".join(f"{d} {ex[d]:.3f}" for d in DIMS)  # noqa: E731
    print(f"{args.tag}: held-out exact {fmt(row.exact_before)} -> {fmt(row.exact_after)}; {args.reward} "
          f"{row.reward_before:.3f} -> {row.reward_after:.3f}; {row.cpu_s:.0f} CPU s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
