"""Efficacy benchmark on the toy world: does a method raise the exact oracle on held-out prompts and seeds?

Every method starts from the shipped toy pipeline, trains (or selects) with a reward — the learned
`toyworld-clip` or the soft oracle `toyworld` — on the 72 training captions and seeds below 1e6, and is
then judged by the exact oracle `toyworld-exact` (never trained on) on the 18 held-out captions with
the held-out seeds (`alignment.toyworld.world.EVAL_SEED`, 8 images per prompt). Best-of-N is evaluated
the same way, selecting among N fresh held-out candidates per evaluation slot by the learned reward.
The flow methods (``flow-*``, `efficacy_methods/flow.py`) start from the toy world's flow-matching twin
(`models.load_flow_pipeline()`) instead, and their rows compare against that base (``results.json``:
``bases.flow``).

    python examples/benchmarks/efficacy.py                          # every method
    python examples/benchmarks/efficacy.py --method draft --method rwr
    python examples/benchmarks/efficacy.py --list

Writes ``<out>/results.json`` after each method (a rerun skips methods already there; ``--force`` redoes
them), ``<out>/table.md`` and ``<out>/efficacy.png``. The methods live in `efficacy_methods/` (one module
per family: best_of_n, gradient, dpo, rwr, policy_gradient); another method is one `@method(...)`
function there returning the trained pipeline (or the selected scores) and the samples it used. Each row
records wall time and the process's CPU time (``cpu_s``): on a shared 2-core machine the CPU time is
the budget that compares across runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment.toyworld import models, world  # noqa: E402
from examples.benchmarks.efficacy_methods import (  # noqa: E402
    DIMS,
    METHODS,
    TARGET_GAIN,
    Context,
    MethodSpec,
    evaluate,
    load_base,
)
from examples.benchmarks.efficacy_methods.targeting import format_targeting, targeting_verdict  # noqa: E402


# -- driver ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    method: str
    reward: str
    reward_before: float
    reward_after: float
    exact_before: dict
    exact_after: dict
    samples: int
    wall_s: float
    cpu_s: float = 0.0
    passed: bool = field(default=False)
    base: str = "sd"


def meets_target(before: dict, after: dict) -> bool:
    """+`TARGET_GAIN` or more on every dimension and overall (a row passes only if none lags)."""
    return min(after[d] - before[d] for d in DIMS) >= TARGET_GAIN - 1e-9


def meets_overall(before: dict, after: dict) -> bool:
    """+`TARGET_GAIN` or more on overall accuracy (all three attributes right): the issue's literal bar.
    The table shows it beside the stricter every-dimension bar, which a base already near the ceiling on
    one dimension (the flow twin's position: 0.87) cannot meet however well the method works."""
    return after["overall"] - before["overall"] >= TARGET_GAIN - 1e-9


def run_method(spec: MethodSpec, base: dict, args, workdir: Path) -> Row:
    torch.manual_seed(args.seed)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(load_base(base=spec.base), workdir, args.steps, args.guidance, args.budget, args.seed, args.bon_slots,
                  spec.base)
    t0, c0 = time.perf_counter(), time.process_time()
    out = spec.run(ctx)
    if "pipe" in out:
        after = evaluate(out["pipe"], spec.reward, args.steps, args.guidance, base=spec.base)
    else:
        after = out
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    before_reward = base["rewards"].get(spec.reward)
    if before_reward is None:
        before_reward = evaluate(load_base(base=spec.base), spec.reward, args.steps, args.guidance, base=spec.base)["reward"]
        base["rewards"][spec.reward] = before_reward
    return Row(spec.name, spec.reward, before_reward, after["reward"], base["exact"], after["exact"],
               int(out["samples"]), wall, cpu, passed=meets_target(base["exact"], after["exact"]), base=spec.base)


def base_results(state: dict, name: str, args, results_path: Path) -> dict:
    """The held-out evaluation of base model `name` (``sd``: ``state["base"]``; others under
    ``state["bases"]``, measured once and saved): what that base's methods are compared against."""
    if name == "sd":
        return state["base"]
    bases = state.setdefault("bases", {})
    if name not in bases:
        t0 = time.perf_counter()
        ev = evaluate(load_base(base=name), "toyworld-clip", args.steps, args.guidance, base=name)
        bases[name] = {"exact": ev["exact"], "rewards": {"toyworld-clip": ev["reward"]}, "images": ev["images"],
                       "wall_s": time.perf_counter() - t0}
        results_path.write_text(json.dumps(state, indent=2))
        print(f"base model {name!r}, held-out exact oracle ({ev['images']} images): " +
              ", ".join(f"{d} {ev['exact'][d]:.3f}" for d in DIMS))
    return bases[name]


def format_table(rows: list[dict]) -> str:
    lines = ["| method | reward trained on | training reward before -> after | exact overall before -> after "
             "| color | shape | position | samples | wall s | CPU s | +10 overall | +10 every dim |", "|" + "---|" * 12]
    for r in rows:
        eb, ea = r["exact_before"], r["exact_after"]
        dims = " | ".join(f"{eb[d]:.2f} -> {ea[d]:.2f}" for d in ("color", "shape", "position"))
        lines.append(f"| {r['method']} | {r['reward']} | {r['reward_before']:.3f} -> {r['reward_after']:.3f} | "
                     f"{eb['overall']:.3f} -> {ea['overall']:.3f} | {dims} | {r['samples']} | {r['wall_s']:.0f} | "
                     f"{r.get('cpu_s', float('nan')):.0f} | {'yes' if meets_overall(eb, ea) else 'NO'} | "
                     f"{'yes' if meets_target(eb, ea) else 'NO'} |")
    return "\n".join(lines)


def chart(rows: list[dict], base: dict, path: Path) -> None:
    from alignment.plots import line_chart

    bon = sorted((int(r["method"].split("-")[-1]), r["exact_after"]["overall"]) for r in rows
                 if r["method"].startswith("best-of-"))
    series = {"best-of-N (exact overall)": bon} if bon else {}
    others = [r for r in rows if not r["method"].startswith("best-of-")]
    for r in others:
        series[r["method"]] = [(0, r["exact_before"]["overall"]), (1, r["exact_after"]["overall"])]
    series["base + 10 pts"] = [(0, base["exact"]["overall"] + TARGET_GAIN), (16, base["exact"]["overall"] + TARGET_GAIN)]
    line_chart(series, path, title="toy world: held-out exact oracle (overall)",
               xlabel="N (best-of-N); 0 = base, 1 = after training", ylabel="accuracy")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", action="append", help="a method name (repeatable; default: all)")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    p.add_argument("--out", default="outputs/efficacy")
    p.add_argument("--steps", type=int, default=models.DEFAULT_STEPS, help="sampler steps")
    p.add_argument("--guidance", type=float, default=models.DEFAULT_GUIDANCE)
    p.add_argument("--budget", type=float, default=1.0, help="multiplier on each method's training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bon-slots", type=int, default=world.EVAL_IMAGES_PER_PROMPT,
                   help="best-of-N: evaluation slots per held-out prompt (16 candidates each)")
    p.add_argument("--force", action="store_true", help="rerun methods already in results.json")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.list:
        for spec in METHODS.values():
            print(f"{spec.name:22s} trained on {spec.reward:14s} {spec.description}")
        return 0
    names = args.method or list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    state = json.loads(results_path.read_text()) if results_path.is_file() else {}
    settings = {"steps": args.steps, "guidance": args.guidance, "budget": args.budget, "seed": args.seed,
                "bon_slots": args.bon_slots}
    if state and state.get("settings") != settings:
        print(f"error: {results_path} was written with {state.get('settings')}, not {settings}; use another --out.",
              file=sys.stderr)
        return 2
    if "base" not in state:
        t0 = time.perf_counter()
        ev = evaluate(load_base(), "toyworld-clip", args.steps, args.guidance)
        state = {"settings": settings, "rows": {},
                 "base": {"exact": ev["exact"], "rewards": {"toyworld-clip": ev["reward"]}, "images": ev["images"],
                          "wall_s": time.perf_counter() - t0}}
        results_path.write_text(json.dumps(state, indent=2))
    base = state["base"]
    print(f"base model, held-out exact oracle ({base['images']} images): " +
          ", ".join(f"{d} {base['exact'][d]:.3f}" for d in DIMS))
    for name in names:
        if name in state["rows"] and not args.force:
            continue
        print(f"--- {name}: {METHODS[name].description}")
        row = run_method(METHODS[name], base_results(state, METHODS[name].base, args, results_path), args, out / "work")
        state["rows"][name] = row.__dict__
        results_path.write_text(json.dumps(state, indent=2))  # incrementally: an interrupted run keeps its rows
        print(format_table([row.__dict__]).splitlines()[-1])
    rows = [state["rows"][n] for n in METHODS if n in state["rows"]]
    table = format_table(rows)
    targeting = format_targeting(rows)  # rows trained on one dimension: that one up, the others within a tolerance
    (out / "table.md").write_text(table + "\n" + (f"\n{targeting}\n" if targeting else ""))
    print(table + (f"\n\n{targeting}" if targeting else ""))
    if rows:
        chart(rows, base, out / "efficacy.png")
    failed = [r["method"] for r in rows if not meets_target(r["exact_before"], r["exact_after"])
              and r["method"] != "best-of-1" and targeting_verdict(r) is None]
    if failed:
        print(f"below +{TARGET_GAIN * 100:.0f} points of held-out exact accuracy on some dimension: {', '.join(failed)}")
    missed = [r["method"] for r in rows if (v := targeting_verdict(r)) is not None and not v["passed"]]
    if missed:
        print(f"targeting rows that miss their check (see the targeting table): {', '.join(missed)}")
    print(f"wrote {results_path}, {out / 'table.md'}, {out / 'efficacy.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
