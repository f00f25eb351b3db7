"""`HackingMonitor`: the reward-hacking monitor every trainer runs at its validation intervals.

At each validation the trainer hands over its scalars (training and evaluation rewards on the fixed
validation prompts and seeds) and the validation images; the monitor adds the signals (image statistics,
per-prompt diversity, drift from the base model's images of the same seeds, rewards relative to the base),
applies the rules, says which fired, and tracks the best held-out evaluation score so the trainer can keep
that checkpoint in ``best/``. The first observation (step 0, before any update) is the base model.

Example:
    >>> mon = HackingMonitor(MonitorSection(on_alarm="stop"), "runs/a")
    >>> signals, alarms, is_best = mon.observe(step, scalars, images, groups=prompts)
    >>> if is_best: save_best(...)
    >>> if mon.should_stop: break
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..configs import count
from . import rules, stats

ON_ALARM = ("warn", "stop")
STATE_FILE = "monitor.json"
BASE_IMAGES_FILE = "monitor_base.safetensors"
BEST_DIR = "best"


@dataclass
class MonitorSection:
    """Reward-hacking monitor settings (the `monitor:` section of every trainer config).

    Attributes:
        enabled: run the monitor at every validation (it needs ``validate_every > 0`` to see anything).
        on_alarm: ``"warn"`` logs the alarm and goes on; ``"stop"`` ends the run at the validation where
            a rule fired (the last and the best checkpoints are both kept).
        train_key: the training reward the divergence rule watches: ``val/reward/mean`` (the training
            reward on the held-out validation prompts and seeds) or ``train/reward/mean/window_mean`` (the
            training-prompt reward the optimiser saw, averaged since the previous validation; reward
            fine-tuning and policy gradient record it, DPO has no such reward).
        eval_keys: held-out evaluation rewards to watch; empty means every ``val/rewards/eval/...`` mean
            the trainer logs.
        best_key: the score that picks ``best/``; None means the first evaluation key, or the training
            reward when there is no evaluation reward.
        keep_best: write the best checkpoint so far to ``best/`` (LoRA or UNet + ``best.json``).
        divergence: rule on; ``divergence_tolerance`` is the fall of an evaluation reward from its peak,
            relative to its base value, that counts while the training reward is still above its value at
            that peak; it must hold for ``divergence_patience`` validations in a row.
        diversity_floor: alarm when per-prompt pixel (or embedding) diversity falls below this fraction of
            the base model's; 0 disables.
        statistics: image statistics whose band is watched (see `stats.STATISTICS`); empty disables.
        stat_rel_band, stat_abs_band: a statistic fires when it leaves base ± max(abs, rel·|base|).
    """

    enabled: bool = True
    on_alarm: str = "warn"
    train_key: str = "val/reward/mean"
    eval_keys: list[str] = field(default_factory=list)
    best_key: str | None = None
    keep_best: bool = True
    divergence: bool = True
    divergence_tolerance: float = 0.05
    divergence_patience: int = count(1)
    diversity_floor: float = 0.5
    statistics: list[str] = field(default_factory=lambda: ["saturation", "dark_fraction", "bright_fraction"])
    stat_rel_band: float = 0.5
    stat_abs_band: float = 0.1


def check_monitor(section: MonitorSection) -> None:
    """Validate a monitor section at config load."""
    if section.on_alarm not in ON_ALARM:
        raise ValueError(f"monitor.on_alarm must be one of {ON_ALARM}; got {section.on_alarm!r}.")
    unknown = sorted(set(section.statistics) - set(stats.STATISTICS))
    if unknown:
        raise ValueError(f"monitor.statistics has unknown names {unknown}; known: {list(stats.STATISTICS)}.")
    if section.divergence_tolerance < 0 or section.divergence_patience < 1:
        raise ValueError(
            "monitor.divergence_tolerance must be >= 0 and monitor.divergence_patience >= 1; got "
            f"{section.divergence_tolerance} and {section.divergence_patience}."
        )
    if not 0 <= section.diversity_floor <= 1:
        raise ValueError(f"monitor.diversity_floor must be a fraction in [0, 1]; got {section.diversity_floor}.")
    if section.stat_rel_band < 0 or section.stat_abs_band < 0:
        raise ValueError(f"monitor.stat_*_band must be >= 0; got {section.stat_rel_band}, {section.stat_abs_band}.")


def image_embedder(reward) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The reward's own image tower as ``images -> (B, D)`` (CLIP-family rewards), or None.

    A `CompositeReward` offers its first term that has one. Diversity and drift are then also measured in
    the embedding space the run already pays for.
    """
    candidates = [reward] + [t.reward for t in getattr(reward, "terms", [])]
    for r in candidates:
        fn = getattr(r, "image_embedding", None)
        if callable(fn):
            return fn
    return None


class HackingMonitor:
    """Signals, rules and best-checkpoint tracking over a run's validations (see the module docstring).

    Args:
        section: the settings.
        output_dir: where ``monitor.json`` (history and alarms, rewritten at every observation) and the
            base model's validation images (for drift after a resume) go; None keeps everything in memory.
        embed: optional ``images -> (B, D)`` image embedding (e.g. `image_embedder(reward)`).
    """

    def __init__(self, section: MonitorSection, output_dir: str | os.PathLike | None = None,
                 embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        check_monitor(section)
        self.section = section
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.embed = embed
        self.history: list[dict] = []
        self.alarms: list[rules.Alarm] = []
        self.best: dict | None = None  # {"step", "key", "value"}
        self._base_images: torch.Tensor | None = None
        self._base_embeddings: torch.Tensor | None = None

    # -- state ---------------------------------------------------------------------------------------
    @property
    def should_stop(self) -> bool:
        """True once a rule fired under ``on_alarm: stop``."""
        return self.section.enabled and self.section.on_alarm == "stop" and bool(self.alarms)

    def state_dict(self) -> dict:
        return {"history": self.history, "alarms": [a.to_dict() for a in self.alarms], "best": self.best}

    def load_state_dict(self, state: dict, up_to_step: int | None = None) -> None:
        """Restore history, alarms and best; with `up_to_step`, forget what an interrupted run saw later."""
        keep = lambda s: up_to_step is None or s <= up_to_step  # noqa: E731
        self.history = [r for r in state.get("history", []) if keep(r["step"])]
        self.alarms = [rules.Alarm(**a) for a in state.get("alarms", []) if keep(a["step"])]
        best = state.get("best")
        self.best = best if best and keep(best["step"]) else None
        if self.best is None and self.history:  # re-derive from the kept history
            key = self._best_key(self.history[0])
            for r in self.history:
                self._update_best(r, key)

    def resume(self, step: int) -> None:
        """Reload ``monitor.json`` and the base images from the output dir, trimmed to `step`."""
        if self.output_dir is None:
            return
        path = self.output_dir / STATE_FILE
        if path.is_file():
            self.load_state_dict(json.loads(path.read_text()), up_to_step=step)
        base = self.output_dir / BASE_IMAGES_FILE
        if base.is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(base))
            self._base_images = tensors.get("images")
            self._base_embeddings = tensors.get("embeddings")

    def _save(self) -> None:
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.output_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state_dict(), indent=1))
        os.replace(tmp, self.output_dir / STATE_FILE)

    def _save_base(self) -> None:
        if self.output_dir is None or self._base_images is None:
            return
        from safetensors.torch import save_file

        tensors = {"images": self._base_images.contiguous()}
        if self._base_embeddings is not None:
            tensors["embeddings"] = self._base_embeddings.contiguous()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(self.output_dir / BASE_IMAGES_FILE))

    # -- keys ----------------------------------------------------------------------------------------
    def eval_keys(self, record: dict) -> list[str]:
        if self.section.eval_keys:
            return list(self.section.eval_keys)
        found = sorted(k for k in record if k.startswith("val/rewards/eval/") and k.endswith("/mean"))
        terms = [k for k in found if k != "val/rewards/eval/mean"]
        if len(terms) == 1 and "val/rewards/eval/mean" in found:  # one term: it is the composite, watched once
            return ["val/rewards/eval/mean"]
        return found

    def _best_key(self, record: dict) -> str:
        if self.section.best_key:
            return self.section.best_key
        ev = self.eval_keys(record)
        if "val/rewards/eval/mean" in ev:
            return "val/rewards/eval/mean"
        return ev[0] if ev else self.section.train_key

    def _update_best(self, record: dict, key: str) -> bool:
        v = record.get(key)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.best is None or v > self.best["value"]:
            self.best = {"step": int(record["step"]), "key": key, "value": float(v)}
            return True
        return False

    # -- the observation -----------------------------------------------------------------------------
    @torch.no_grad()
    def signals(self, images: torch.Tensor, groups: Sequence | None) -> dict[str, float]:
        """The image-derived signals of one validation set (`monitor/...` keys)."""
        out = {f"monitor/stat/{k}": v for k, v in stats.image_statistics(images).items()}
        emb = None
        if self.embed is not None:
            emb = self.embed(images.float()).detach().float().cpu()
        if groups is not None and len(set(groups)) < len(groups):
            out["monitor/diversity/pixel"] = stats.pixel_diversity(images, groups)
            if emb is not None:
                out["monitor/diversity/embedding"] = stats.embedding_diversity(emb, groups)
        if self._base_images is None:
            self._base_images = images.detach().float().cpu().clamp(0, 1)
            self._base_embeddings = emb
            self._save_base()
        if self._base_images.shape == images.shape:
            out["monitor/drift/pixel"] = stats.drift(images.cpu(), self._base_images)
            if emb is not None and self._base_embeddings is not None and self._base_embeddings.shape == emb.shape:
                out["monitor/drift/embedding"] = stats.embedding_drift(emb, self._base_embeddings)
        return out

    def observe(self, step: int, scalars: dict, images: torch.Tensor | None = None,
                groups: Sequence | None = None) -> tuple[dict, list[rules.Alarm], bool]:
        """Record one validation; returns (signals to log, alarms that fired now, whether it is the best).

        Args:
            step: the optimizer step (0 = the base model).
            scalars: the trainer's validation scalars (``val/...`` rewards).
            images: the validation images (B, 3, H, W) in [0, 1], always the same prompts and seeds.
            groups: one prompt id per image, for per-prompt diversity (needs several images per prompt).
        """
        if not self.section.enabled:
            return {}, [], False
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items() if isinstance(v, (int, float))}}
        sig = self.signals(images, groups) if images is not None else {}
        record.update(sig)
        self.history = [r for r in self.history if r["step"] < step] + [record]
        base = self.history[0]
        for key in [self.section.train_key, *self.eval_keys(record)]:
            if key in record and key in base:
                sig[f"monitor/relative/{key}"] = rules.relative_change(record[key], base[key])
        fired = self._apply_rules(record)
        for a in fired:
            warnings.warn(f"reward-hacking monitor, step {a.step}: {a.rule}: {a.message}", stacklevel=2)
        self.alarms.extend(fired)
        sig["monitor/alarms"] = float(len(self.alarms))
        is_best = self._update_best(record, self._best_key(record))
        self._save()
        return sig, fired, is_best

    def _apply_rules(self, record: dict) -> list[rules.Alarm]:
        s, h = self.section, self.history
        found = []
        if s.divergence:
            for key in self.eval_keys(record):
                found.append(rules.divergence(h, s.train_key, key, s.divergence_tolerance, s.divergence_patience))
        if s.diversity_floor > 0:
            for key in ("monitor/diversity/pixel", "monitor/diversity/embedding"):
                found.append(rules.diversity_collapse(h, key, s.diversity_floor))
        for name in s.statistics:
            found.append(rules.out_of_band(h, f"monitor/stat/{name}", s.stat_rel_band, s.stat_abs_band))
        return [a for a in found if a is not None]

    def summary(self) -> dict:
        """For the run's summary.json: alarms (rule, step, message) and the best step."""
        return {"alarms": [a.to_dict() for a in self.alarms], "best": self.best,
                "stopped": self.should_stop, "validations": len(self.history)}


def write_best(output_dir: str | os.PathLike, best: dict, save: Callable[[Path], None]) -> Path:
    """Replace ``output_dir/best/`` with what `save(dir)` writes plus ``best.json`` naming the step."""
    import shutil

    root = Path(output_dir)
    tmp = root / (BEST_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(tmp)
    (tmp / "best.json").write_text(json.dumps(best, indent=2))
    final = root / BEST_DIR
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
