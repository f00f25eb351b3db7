"""Held-out exact oracle accuracy along one reward fine-tuning run on the toy world (the efficacy benchmark's
evaluation at several step counts of a single run).

The run is the efficacy benchmark's `reward_finetune` entry with the given trainer method and settings (same
LoRA, sampler and training captions, soft oracle `toyworld`), trained by hand step by step so that the model
is judged at each of ``--evals`` steps. With the default constant learning rate and per-step seeds, the model
at step s is exactly the model an s-step run would produce, so one run gives the step-count curve that
several benchmark runs would. Training CPU time is recorded apart from the evaluation's.

Example:
    OMP_NUM_THREADS=1 python examples/benchmarks/efficacy_curve.py --method refl \\
        --kw '{"refl_target": 1.0, "refl_scale": 1.0, "refl_step_range": [2, 5]}' --evals 100,200,300 \\
        --out outputs/curve/refl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment.toyworld import models  # noqa: E402
from examples.benchmarks.efficacy_methods.registry import (  # noqa: E402
    DIMS,
    Context,
    evaluate,
    load_base,
    reward_finetune_trainer,
)


def parse_evals(text: str) -> list[int]:
    """``"50,100,200"`` -> [50, 100, 200] (positive, increasing)."""
    try:
        steps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--evals must be comma-separated step counts like 50,100,200; got {text!r}") from None
    if not steps or any(s < 1 for s in steps) or steps != sorted(set(steps)):
        raise SystemExit(f"--evals must be increasing positive step counts like 50,100,200; got {text!r}")
    return steps


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True, help="trainer method: draft, draft-lv, alignprop, refl, rwr")
    p.add_argument("--kw", default="{}", help="MethodSection settings as JSON, e.g. '{\"lv_n\": 2}'")
    p.add_argument("--reward", default="toyworld", help="the reward trained on (differentiable for gradient methods)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--evals", default="50,100,200", help="step counts at which the held-out exact oracle is measured")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="output dir (evals.json, the trainer's work dir)")
    a = p.parse_args(argv)
    evals = parse_evals(a.evals)
    try:
        kw = json.loads(a.kw)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--kw must be a JSON object of MethodSection settings; got {a.kw!r} ({e})") from None
    if not isinstance(kw, dict):
        raise SystemExit(f"--kw must be a JSON object like '{{\"lv_n\": 2}}'; got {a.kw!r}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    steps, guidance = models.DEFAULT_STEPS, models.DEFAULT_GUIDANCE
    ctx = Context(load_base(), out / "work", steps, guidance, 1.0, a.seed)
    trainer = reward_finetune_trainer(ctx, a.method, a.reward, evals[-1], a.lr, a.batch, **kw)
    trainer.unet.train()
    rows: list[dict] = []
    train_cpu = 0.0
    while trainer.step < evals[-1]:
        c0 = time.process_time()
        scalars = trainer.train_step()
        train_cpu += time.process_time() - c0
        if trainer.step % 10 == 0:
            shown = {k: round(v, 4) for k, v in scalars.items() if k in ("reward/mean", "x0/reward/mean", "grad_norm")}
            print(f"step {trainer.step} {shown} train CPU {train_cpu:.0f} s", flush=True)
        if trainer.step in evals:
            trainer.model.eval()
            c0 = time.process_time()
            ev = evaluate(trainer.pipe, a.reward, steps, guidance)
            trainer.model.train()
            row = {"step": trainer.step, "exact": ev["exact"], "reward_heldout": ev["reward"], "train_cpu_s": train_cpu,
                   "eval_cpu_s": time.process_time() - c0}
            rows.append(row)
            print(f"step {trainer.step}: held-out exact " + ", ".join(f"{d} {ev['exact'][d]:.3f}" for d in DIMS)
                  + f"; {a.reward} {ev['reward']:.3f}; train CPU {train_cpu:.0f} s", flush=True)
            (out / "evals.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
