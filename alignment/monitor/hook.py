"""`MonitorHook`: what a trainer calls to run the reward-hacking monitor at its validations, so that DPO,
reward fine-tuning and policy gradient share one piece of code (gathering images across processes,
the best checkpoint, the stop decision on every process, the report at the end).

Example (inside a trainer):
    >>> hook = MonitorHook(cfg.monitor, output_dir, accelerator, embed=image_embedder(reward))
    >>> hook.resume(step)                                  # after accelerator.load_state
    >>> signals = hook.on_validation(step, val_scalars, images, prompts, index, save_best=export_to_dir)
    >>> if hook.should_stop(): break
    >>> summary["monitor"] = hook.finish(metrics_jsonl, curve_keys, "curves.png", title)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .monitor import HackingMonitor, MonitorSection, write_best
from .report import GRIDS_DIR, save_validation_grid, write_run_report

# Training-step scalars averaged between validations (ReFL's objective is its one-step x̂₀ reward).
TRAINING_KEYS = ("reward/mean", "x0/reward/mean")


class MonitorHook:
    """Runs a `HackingMonitor` on the main process of an accelerate run.

    Args:
        section: the trainer config's ``monitor`` section.
        output_dir: the run directory (``monitor.json``, ``best/``, ``monitor_grids/``, ``monitor_report.png``).
        accelerator: the run's `Accelerator` (None for a plain single-process loop).
        embed: optional image embedding for embedding-space diversity and drift.
    """

    def __init__(self, section: MonitorSection, output_dir: str | os.PathLike, accelerator=None,
                 embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.accelerator = accelerator
        self.main = accelerator is None or accelerator.is_main_process
        self.output_dir = Path(output_dir)
        self.monitor = HackingMonitor(section, self.output_dir if self.main else None, embed=embed)
        self.enabled = section.enabled
        self._stop = False
        self.seconds = 0.0  # wall time spent in the monitor (signals, rules, grids, best/), for its overhead
        self._window: dict[str, list[float]] = {}

    def resume(self, step: int) -> None:
        """Reload the monitor trimmed to `step` (after the trainer loaded that checkpoint)."""
        if self.enabled and self.main:
            self.monitor.resume(step)
            self._drop_grids(after=step)

    def _drop_grids(self, after: int) -> None:
        """Forget validation strips of steps > `after` (an earlier run in this directory, or past the checkpoint)."""
        folder = self.output_dir / GRIDS_DIR
        for p in folder.glob("step-*.png") if folder.is_dir() else []:
            if p.stem.split("-", 1)[1].isdigit() and int(p.stem.split("-", 1)[1]) > after:
                p.unlink()

    def _gather(self, images: torch.Tensor | None, prompts: Sequence[str], index: Sequence[int], gathered: bool):
        """All processes' validation images in validation order (the main process gets them; others None)."""
        acc = self.accelerator
        if gathered and not self.main:
            return None, None
        if gathered or acc is None or acc.num_processes == 1:
            order = sorted(range(len(index)), key=lambda i: index[i])
            return images[order], [prompts[i] for i in order]
        from accelerate.utils import gather_object

        mine = [(int(i), p, img.detach().cpu()) for i, p, img in zip(index, prompts, images)]
        everything = sorted(gather_object(mine), key=lambda x: x[0])
        if not self.main:
            return None, None
        return torch.stack([x[2] for x in everything]), [x[1] for x in everything]

    def record_training(self, scalars: dict) -> None:
        """Note one training step's scalars (already averaged over processes).

        At the next validation the mean of each ``TRAINING_KEYS`` value since the previous validation is
        added to the record as ``train/<key>/window_mean``: the reward the optimiser sees on the training
        prompts, which keeps rising while a hacked model gets worse on held-out prompts. A resumed run
        starts a new window at its checkpoint.
        """
        if not self.enabled:
            return
        for key in TRAINING_KEYS:
            v = scalars.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._window.setdefault(key, []).append(float(v))

    def on_validation(self, step: int, scalars: dict, images: torch.Tensor | None, prompts: Sequence[str],
                      index: Sequence[int] | None = None, save_best: Callable[[Path], None] | None = None,
                      gathered: bool = False) -> dict:
        """Observe one validation; returns the signals to log (empty on other processes).

        Args:
            scalars: the validation scalars, already reduced over processes.
            images, prompts: this process's validation images and their prompts.
            index: each image's position in the full validation set (default: 0..n-1, one process).
            save_best: writes the trained weights into a directory; called for ``best/`` when the
                held-out score improves (on the main process only), also at step 0 (then ``best/`` holds
                the base model until training beats it).
            gathered: the main process already holds every validation image (a trainer that validates on
                the main process only); the other processes pass None and only join the stop decision.
        """
        if not self.enabled:
            return {}
        tic = time.perf_counter()
        window = {f"train/{k}/window_mean": sum(v) / len(v) for k, v in self._window.items() if v}
        scalars = {**scalars, **window}
        self._window = {}
        index = list(range(len(prompts))) if index is None else list(index)
        local = images.float().clamp(0, 1) if images is not None else None
        all_images, all_prompts = self._gather(local, list(prompts), index, gathered)
        signals: dict = {}
        stop = 0.0
        if self.main:
            if step == 0:  # a fresh run: strips left by an earlier run in this directory are not ours
                self._drop_grids(after=0)
            signals, _, is_best = self.monitor.observe(step, scalars, all_images, groups=all_prompts)
            signals.update(window)  # logged beside the signals, so the curves show what the rule compared
            save_validation_grid(all_images, self.output_dir, step)
            if is_best and self.monitor.section.keep_best and save_best is not None:
                write_best(self.output_dir, self.monitor.best, save_best)
            stop = 1.0 if self.monitor.should_stop else 0.0
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            flag = torch.tensor([stop], device=self.accelerator.device)
            stop = float(self.accelerator.reduce(flag, reduction="sum").item())
        self._stop = stop > 0
        self.seconds += time.perf_counter() - tic
        return signals

    def should_stop(self) -> bool:
        """True on every process once a rule fired under ``on_alarm: stop``."""
        return self._stop

    def markers(self) -> list[tuple[int, str]]:
        """(step, rule) of every alarm, for the curves chart."""
        return [(a.step, a.rule) for a in self.monitor.alarms] if self.main else []

    def finish(self) -> dict:
        """Write ``monitor_report.png``; returns the monitor's summary (alarms, best step, stopped)."""
        if not (self.enabled and self.main):
            return {}
        tic = time.perf_counter()
        report = write_run_report(self.output_dir, self.monitor)
        self.seconds += time.perf_counter() - tic
        out = self.monitor.summary()
        out["report"] = str(report) if report else None
        out["seconds"] = self.seconds
        return out


def weights_saver(pipe, model: torch.nn.Module, ema=None, lora: bool = True,
                  full_dir: str = "unet") -> Callable[[Path], None]:
    """A ``save_best`` callback writing what a trainer exports at the end: the LoRA (`export_lora`) or the
    whole denoiser (``full_dir/``), with the EMA weights applied when the run keeps an EMA."""
    from alignment.trainers.common import ema_weights, export_lora, unwrap

    def save(directory: Path) -> None:
        with ema_weights(ema):
            if lora:
                export_lora(pipe, model, directory)
            else:
                unwrap(model).save_pretrained(Path(directory) / full_dir)

    return save
