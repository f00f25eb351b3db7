"""Reward-hacking monitor shared by every trainer: cheap image statistics, per-prompt diversity, drift
from the base model, alarm rules, early stopping and best-checkpoint selection.

Example:
    >>> from alignment.monitor import HackingMonitor, MonitorSection
    >>> mon = HackingMonitor(MonitorSection(on_alarm="stop"), "runs/a")
    >>> signals, alarms, is_best = mon.observe(step, val_scalars, val_images, groups=val_prompts)
"""

from .hook import MonitorHook, weights_saver
from .monitor import BEST_DIR, HackingMonitor, MonitorSection, check_monitor, image_embedder, write_best
from .report import save_validation_grid, write_run_report
from .rules import Alarm, divergence, diversity_collapse, out_of_band, relative_change
from .stats import STATISTICS, drift, embedding_diversity, image_statistics, pixel_diversity

__all__ = [
    "Alarm", "BEST_DIR", "HackingMonitor", "MonitorHook", "MonitorSection", "STATISTICS", "check_monitor", "divergence",
    "diversity_collapse", "drift", "embedding_diversity", "image_embedder", "image_statistics", "out_of_band",
    "pixel_diversity", "relative_change", "save_validation_grid", "weights_saver", "write_best", "write_run_report",
]
