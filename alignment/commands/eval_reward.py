"""`reward-align eval-reward`: pairwise accuracy of rewards on preference sets (tie rule stated), with
calibration statistics and bias probes on request. Writes JSON, markdown tables and PNG charts."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def _options(items: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for it in items:
        name, dot, rest = it.partition(".")
        key, eq, value = rest.partition("=")
        if not (dot and eq and name and key):
            raise ValueError(f"--option must look like NAME.KEY=VALUE (e.g. pickscore.checkpoint=/models/pick); got {it!r}.")
        out.setdefault(name, {})[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    from ..evaluation import harness, loaders
    from ..evaluation.accuracy import RULES
    from ..evaluation.calibration import calibration_stats, calibration_table, save_calibration
    from ..evaluation.probes import probes_table, run_probes
    from ..evaluation.report import accuracy_charts, accuracy_table, lescore_table, probe_charts, write_json

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    rules = args.rule or list(RULES)
    rewards = harness.load_rewards(args.reward, cache_dir, args.device, args.dtype, _options(args.option))
    sets = []
    for ds in args.dataset:
        pset = loaders.load_preference_set(ds, args.layout, args.images)
        sets.append(pset.limit(args.limit) if args.limit else pset)
    thresholds = None
    if args.tune_ties_on:
        val = loaders.load_preference_set(args.tune_ties_on, args.layout, args.images)
        thresholds = harness.tune_tie_thresholds(val, rewards, args.reward, batch_size=args.batch_size,
                                                 workers=args.workers, progress=not args.no_progress)
        print("tie thresholds (softmax probability) tuned on " + args.tune_ties_on + ": "
              + ", ".join(f"{k} {v:g}" for k, v in thresholds.items()))
    results = []
    for pset in sets:
        if not len(pset.pairs):
            if args.calibrate or args.probes:
                continue  # a reference set without labels: used below for calibration / probes only
            raise ValueError(f"{pset.name} ({pset.layout}) has no labelled pairs; pass a preference set, or use it "
                             "with --calibrate / --probes only.")
        print(f"{pset.name}: {pset.layout}, {len(pset.groups)} prompts, {len(pset.images)} images, "
              f"{len(pset.pairs)} pairs, official protocol {pset.protocol}")
        for note in pset.notes:
            print(f"  note: {note}")
        res = harness.evaluate_set(
            pset, rewards, args.reward, rules, args.tie_threshold, args.tie_space, args.bootstrap, args.confidence,
            args.seed, args.batch_size, args.workers, not args.no_progress, args.strict, thresholds,
        )
        for what, items in (("missing", res.missing_images), ("unreadable", list(res.unreadable_images))):
            if items:
                print(f"  {len(items)} {what} image(s) left out with their pairs (e.g. {items[0]}); --strict makes this an error")
        results.append(res)
    multi = {s: len(getattr(rewards[harness.parse_spec(s)[0]].model, "dimensions", ())) > 1 for s in args.reward}
    if results:
        write_json({"results": [r.to_dict() for r in results]}, out / "results.json")
        md = ["# Pairwise accuracy", "", "Official protocol of each set, beside LeScore's published table:", "",
              lescore_table(results, multi), "", "Every rule (human ties excluded / counted as half / a 3-way "
              "prediction; a reward tie when |score difference| <= "
              f"{args.tie_threshold:g} on {args.tie_space}s"
              + (f"; the pickscore protocol's softmax threshold tuned per reward on {args.tune_ties_on}: {thresholds}"
                 if thresholds else "") + "):", "", accuracy_table(results), ""]
        (out / "accuracy.md").write_text("\n".join(md))
        accuracy_charts(results, out)
        print(lescore_table(results, multi, include_published=False))
    reference = loaders.load_preference_set(args.calibrate_on, None, args.images) if args.calibrate_on else (sets[0] if sets else None)
    if args.calibrate and reference is not None:
        stats = calibration_stats(reference, rewards, args.batch_size, args.workers, not args.no_progress, args.strict)
        path = save_calibration(stats, out / "calibration.json")
        (out / "calibration.md").write_text("# Calibration\n\n" + calibration_table(stats) + "\n")
        print(f"calibration of {len(rewards)} reward(s) on {stats['reference']['images']} images -> {path}")
    if args.probes and reference is not None:
        probes = run_probes(reference, rewards, args.reward, args.probe_images, args.probe or None, args.batch_size, args.seed)
        write_json(probes.to_dict(), out / "probes.json")
        (out / "probes.md").write_text("# Bias probes\n\n" + probes_table(probes) + "\n")
        probe_charts(probes, out)
        print(f"bias probes on {probes.images} images -> {out / 'probes.md'}")
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval-reward", help="pairwise accuracy, calibration and bias probes of rewards", description=__doc__)
    p.add_argument("--reward", action="append", required=True, help="NAME or NAME:DIMENSION (repeat for several)")
    p.add_argument("--dataset", action="append", required=True,
                   help="a local file, dir or parquet glob (pickapic parquet, HPD v2 / ImageReward test.json, MHP "
                        "pairs, `reward-align pairs` dir, image folder), a hub name (pickapic, hpdv2, imagereward) or "
                        "toyworld / toyworld-render (repeat)")
    p.add_argument("--layout", help="force the layout: pickapic, hpdv2, imagereward, mhp, pairs, images")
    p.add_argument("--images", help="image folder the set's relative paths start from (default: beside the file)")
    p.add_argument("--rule", action="append", choices=("exclude", "half", "predict", "imagereward", "hpsv2", "pickscore"),
                   help="tie rule(s) to report (default: exclude, half, predict); the set's official protocol is always added")
    p.add_argument("--tie-threshold", type=float, default=0.0, help="a reward tie when |difference| <= this (default 0)")
    p.add_argument("--tie-space", choices=("score", "prob"), default="score", help="difference of scores or of softmax probabilities")
    p.add_argument("--tune-ties-on", help="a validation set (e.g. Pick-a-Pic validation_unique): per reward, the softmax tie "
                                          "threshold (0, 0.1, ..., 1) with the best PickScore-protocol accuracy, as PickScore does")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of prompts for the CI (0: none)")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image decoding worker processes (default min(4, CPUs); 0: decode in the main process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    p.add_argument("--option", action="append", default=[], help="reward option NAME.KEY=VALUE, e.g. pickscore.checkpoint=DIR")
    p.add_argument("--output-dir", default="eval", help="where results, tables and charts go")
    p.add_argument("--cache-dir", help="score cache (default OUTPUT_DIR/cache); reruns score nothing twice")
    p.add_argument("--limit", type=int, help="only the first N prompts of each set (quick runs)")
    p.add_argument("--strict", action="store_true", help="a missing or unreadable image is an error")
    p.add_argument("--calibrate", action="store_true", help="write calibration.json (mean/std/quantiles per reward and dimension)")
    p.add_argument("--calibrate-on", help="reference set for --calibrate / --probes (default: the first --dataset)")
    p.add_argument("--probes", action="store_true", help="run the bias probes (image edits, prompt shuffle)")
    p.add_argument("--probe", action="append", default=[], help="only these edits (saturation, brightness, contrast, blur, sharpen, noise, jpeg)")
    p.add_argument("--probe-images", type=int, default=32, help="images the probes edit")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
