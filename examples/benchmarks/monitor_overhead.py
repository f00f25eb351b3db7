"""Wall-time overhead of the reward-hacking monitor on a tiny training run at the default interval.

The same tiny DRaFT run (configs/tiny/reward_draft.yaml: 30 steps, a validation every 10) is trained with
``monitor.enabled`` false and true, alternating, `--repeats` times each; the overhead is the ratio of the
median wall times. Because the CPU may be shared, the monitor's own time inside the monitored runs
(`MonitorHook.seconds`: signals, rules, grids, ``best/`` exports, the report) is also given as a share of
their wall time, which load on the machine cannot fake.

    python examples/benchmarks/monitor_overhead.py                 # 3 repeats
    python examples/benchmarks/monitor_overhead.py --repeats 5 --max-steps 60
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment.configs import load_config  # noqa: E402
from alignment.trainers.reward_finetune import RewardFinetuneConfig, RewardFinetuner  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "reward_draft.yaml"


def one_run(out: Path, monitor: bool, max_steps: int) -> tuple[float, float]:
    """(wall seconds of train(), seconds spent in the monitor)."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(RewardFinetuneConfig, CONFIG, [
        f"train.output_dir={out}", "train.report_to=none", f"train.max_steps={max_steps}",
        f"monitor.enabled={'true' if monitor else 'false'}",
    ])
    trainer = RewardFinetuner(cfg)
    tic = time.perf_counter()
    summary = trainer.train()
    wall = time.perf_counter() - tic
    return wall, float(summary["monitor"].get("seconds", 0.0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.max_steps < 1:
        p.error(f"--repeats and --max-steps must be >= 1; got {args.repeats} and {args.max_steps}.")
    torch.set_num_threads(args.threads)
    walls: dict[bool, list[float]] = {False: [], True: []}
    inside: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        one_run(Path(tmp) / "warmup", False, 2)  # imports and first-call costs out of the comparison
        for r in range(args.repeats):
            for monitor in ((False, True) if r % 2 == 0 else (True, False)):
                wall, mon = one_run(Path(tmp) / f"run-{r}-{int(monitor)}", monitor, args.max_steps)
                walls[monitor].append(wall)
                if monitor:
                    inside.append(mon / wall)
                print(f"repeat {r}: monitor {'on ' if monitor else 'off'} {wall:7.2f} s"
                      + (f"  (monitor itself {mon:.2f} s)" if monitor else ""), flush=True)
    off, on = statistics.median(walls[False]), statistics.median(walls[True])
    res = {"config": str(CONFIG), "max_steps": args.max_steps, "validate_every": load_config(RewardFinetuneConfig, CONFIG).train.validate_every, "repeats": args.repeats,
           "median_wall_off_s": off, "median_wall_on_s": on, "wall_ratio_on_over_off": on / off,
           "monitor_share_of_wall_median": statistics.median(inside), "walls_off": walls[False], "walls_on": walls[True]}
    print(f"median wall: off {off:.2f} s, on {on:.2f} s, ratio {on / off:.3f}; the monitor's own time is "
          f"{100 * res['monitor_share_of_wall_median']:.2f} % of a monitored run's wall time (median)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
