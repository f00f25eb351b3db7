"""Reward-hacking monitor: each statistic on hand-made images, each rule on hand-made series, and the
monitor's state (best step, stop, resume) on a scripted run."""

import json
import math

import pytest
import torch

from alignment.monitor import (
    HackingMonitor,
    MonitorSection,
    check_monitor,
    divergence,
    diversity_collapse,
    drift,
    embedding_diversity,
    image_statistics,
    out_of_band,
    pixel_diversity,
    save_validation_grid,
    write_best,
    write_run_report,
)
from alignment.monitor import stats as S


def solid(rgb, n=1, size=16):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


# -- statistics --------------------------------------------------------------------------------------
def test_saturation_of_pure_red_grey_and_black():
    assert S.saturation(solid([1.0, 0.0, 0.0])).item() == pytest.approx(1.0)
    assert S.saturation(solid([0.5, 0.5, 0.5])).item() == pytest.approx(0.0)
    assert S.saturation(solid([0.0, 0.0, 0.0])).item() == 0.0  # black: defined as 0, not NaN


def test_dark_and_bright_fractions():
    img = solid([0.0, 0.0, 0.0])
    img[..., :4] = 1.0  # a white band: 4 of 16 columns
    st = image_statistics(img)
    assert st["dark_fraction"] == pytest.approx(12 / 16)
    assert st["bright_fraction"] == pytest.approx(4 / 16)


def test_colour_entropy_flat_two_colours_and_uniform():
    assert S.colour_entropy(solid([0.3, 0.6, 0.9])).item() == pytest.approx(0.0)
    half = solid([0.0, 0.0, 0.0])
    half[..., :8] = 1.0
    assert S.colour_entropy(half).item() == pytest.approx(1.0)  # two equal bins: one bit
    # every one of the 512 bins exactly once: log2(512) = 9 bits
    levels = torch.arange(8, dtype=torch.float32) / 8 + 1 / 16
    r, g, b = torch.meshgrid(levels, levels, levels, indexing="ij")
    img = torch.stack([r.flatten(), g.flatten(), b.flatten()]).view(1, 3, 16, 32)
    assert S.colour_entropy(img).item() == pytest.approx(9.0)


def test_edge_density_and_high_frequency_energy():
    flat = solid([0.5, 0.5, 0.5])
    assert S.edge_density(flat).item() == 0.0
    assert S.high_freq_energy(flat).item() == 0.0
    step = flat.clone()
    step[..., 8:] = 1.0
    assert 0 < S.edge_density(step).item() < 0.3  # only the columns at the step
    checker = (torch.arange(16).view(1, 16) + torch.arange(16).view(16, 1)) % 2
    checker = checker.float().expand(1, 3, 16, 16)
    assert S.high_freq_energy(checker).item() == pytest.approx(1.0)  # all energy at Nyquist
    assert S.high_freq_energy(step).item() < 0.5


def test_pixel_diversity_identical_samples_is_zero_and_grows_with_spread():
    same = solid([0.2, 0.4, 0.6], n=4)
    groups = ["a", "a", "b", "b"]
    assert pixel_diversity(same, groups) == 0.0
    mixed = torch.cat([solid([0, 0, 0]), solid([1, 1, 1]), solid([0, 0, 0]), solid([0.5, 0.5, 0.5])])
    # prompt a: distance 1; prompt b: distance 0.5 -> mean 0.75
    assert pixel_diversity(mixed, groups) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="images_per_prompt"):
        pixel_diversity(mixed, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="one prompt id per image"):
        pixel_diversity(mixed, ["a"])


def test_embedding_diversity_and_drift():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    assert embedding_diversity(e, [0, 0, 1, 1]) == pytest.approx(0.5)  # (1 + 0) / 2
    a, b = solid([0, 0, 0], n=2), solid([0.5, 0.5, 0.5], n=2)
    assert drift(a, a) == 0.0
    assert drift(a, b) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ in shape"):
        drift(a, solid([0, 0, 0], n=3))


def test_statistics_reject_bad_input():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        image_statistics(torch.zeros(3, 8, 8))


# -- rules -------------------------------------------------------------------------------------------
def series(train, ev):
    return [{"step": 10 * i, "r": r, "e": e} for i, (r, e) in enumerate(zip(train, ev))]


def test_divergence_fires_when_train_rises_and_eval_falls():
    h = series([1.0, 1.2, 1.5, 1.9], [0.5, 0.6, 0.62, 0.5])
    alarm = divergence(h, "r", "e", tolerance=0.05)
    assert alarm is not None and alarm.step == 30 and alarm.key == "e" and "step 20" in alarm.message
    # the same fall while the training reward falls too is not over-optimisation
    assert divergence(series([1.0, 1.2, 1.5, 1.1], [0.5, 0.6, 0.62, 0.5]), "r", "e", tolerance=0.05) is None
    # a fall within tolerance: no alarm
    assert divergence(series([1.0, 1.2, 1.5, 1.9], [0.5, 0.6, 0.62, 0.61]), "r", "e", tolerance=0.05) is None


def test_divergence_patience_needs_consecutive_validations():
    h = series([1.0, 1.2, 1.5, 1.9], [0.5, 0.7, 0.5, 0.72])
    assert divergence(h[:3], "r", "e", tolerance=0.05, patience=1) is not None
    assert divergence(h[:3], "r", "e", tolerance=0.05, patience=2) is None
    h2 = series([1.0, 1.2, 1.5, 1.9], [0.5, 0.7, 0.5, 0.45])
    assert divergence(h2, "r", "e", tolerance=0.05, patience=2) is not None


def test_diversity_collapse_and_band_rules():
    h = [{"step": 0, "d": 0.2}, {"step": 5, "d": 0.15}]
    assert diversity_collapse(h, "d", 0.5) is None
    h.append({"step": 10, "d": 0.05})
    a = diversity_collapse(h, "d", 0.5)
    assert a is not None and a.step == 10 and "25%" in a.message
    s = [{"step": 0, "sat": 0.3}, {"step": 5, "sat": 0.42}]
    assert out_of_band(s, "sat", rel_band=0.5, abs_band=0.1) is None  # band ±0.15
    s.append({"step": 10, "sat": 0.9})
    assert "rose" in out_of_band(s, "sat", rel_band=0.5, abs_band=0.1).message


def test_bad_monitor_settings_are_rejected():
    with pytest.raises(ValueError, match="on_alarm"):
        check_monitor(MonitorSection(on_alarm="panic"))
    with pytest.raises(ValueError, match="unknown names"):
        check_monitor(MonitorSection(statistics=["saturaton"]))


# -- the monitor over a scripted run -----------------------------------------------------------------
def scripted_run(tmp_path, section, n=6):
    """Training reward always rises; the evaluation reward peaks at step 20 then falls; images darken."""
    mon = HackingMonitor(section, tmp_path)
    evals = [0.5, 0.6, 0.7, 0.55, 0.4, 0.3]
    out = []
    for i in range(n):
        step = 10 * i
        images = solid([0.8 - 0.18 * i] * 3, n=4) + 0.05 * torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i))
        scalars = {"val/reward/mean": 1.0 + 0.3 * i, "val/rewards/eval/mean": evals[i]}
        sig, alarms, best = mon.observe(step, scalars, images.clamp(0, 1), groups=["p", "p", "q", "q"])
        out.append((step, sig, alarms, best))
        if mon.should_stop:
            break
    return mon, out


def test_monitor_tracks_best_and_stops_at_the_first_alarm(tmp_path):
    mon, out = scripted_run(tmp_path, MonitorSection(on_alarm="stop", statistics=[]))
    assert mon.best["step"] == 20 and mon.best["key"] == "val/rewards/eval/mean"
    assert [o[3] for o in out[:3]] == [True, True, True]
    assert out[-1][0] == 30 and mon.should_stop and mon.alarms[0].rule == "divergence"
    sig = out[1][1]
    assert {"monitor/stat/saturation", "monitor/diversity/pixel", "monitor/drift/pixel"} <= set(sig)
    assert sig["monitor/relative/val/reward/mean"] == pytest.approx(0.3)
    state = json.loads((tmp_path / "monitor.json").read_text())
    assert state["best"]["step"] == 20 and state["alarms"][0]["step"] == 30


def test_monitor_warn_mode_goes_on_and_flags_darkening(tmp_path):
    with pytest.warns(UserWarning, match="reward-hacking monitor"):
        mon, out = scripted_run(tmp_path, MonitorSection(on_alarm="warn", statistics=["dark_fraction"]))
    assert len(out) == 6 and not mon.should_stop
    assert {"divergence", "image_statistic"} <= {a.rule for a in mon.alarms}


def test_monitor_resume_forgets_what_came_after_the_checkpoint(tmp_path):
    mon, _ = scripted_run(tmp_path, MonitorSection(on_alarm="warn", statistics=[]))
    again = HackingMonitor(MonitorSection(statistics=[]), tmp_path)
    again.resume(step=20)
    assert [r["step"] for r in again.history] == [0, 10, 20] and again.alarms == []
    assert again.best["step"] == 20
    # drift after a resume still compares with the base model's images
    sig, _, _ = again.observe(30, {"val/reward/mean": 2.0, "val/rewards/eval/mean": 0.1}, solid([0.8] * 3, n=4),
                              groups=["p", "p", "q", "q"])
    assert math.isfinite(sig["monitor/drift/pixel"]) and sig["monitor/drift/pixel"] < 0.1


def test_best_dir_and_report(tmp_path):
    mon, out = scripted_run(tmp_path, MonitorSection(on_alarm="warn", statistics=[]))
    for step, *_ in out:
        save_validation_grid(solid([0.1 * step / 10] * 3, n=3), tmp_path, step)
    best = write_best(tmp_path, mon.best, lambda d: (d / "weights.bin").write_bytes(b"x"))
    assert (best / "weights.bin").is_file() and json.loads((best / "best.json").read_text())["step"] == 20
    path = write_run_report(tmp_path, mon)
    from PIL import Image

    img = Image.open(path)
    assert img.width >= 6 * 64 and img.height > 3 * 64 + 400  # six columns of three, plus the charts


def test_hook_single_process_writes_best_grids_and_report(tmp_path):
    from alignment.monitor import MonitorHook

    hook = MonitorHook(MonitorSection(on_alarm="stop", statistics=[]), tmp_path)
    evals = [0.5, 0.7, 0.4]
    saved = []
    for i, e in enumerate(evals):
        images = solid([0.5] * 3, n=4) + 0.1 * torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i))
        # shuffled order with its index: the hook restores validation order
        sig = hook.on_validation(10 * i, {"val/reward/mean": 1.0 + i, "val/rewards/eval/mean": e},
                                 images.flip(0), ["q", "q", "p", "p"], index=[3, 2, 1, 0],
                                 save_best=lambda d, i=i: saved.append(i) or (d / "w").write_text(str(i)))
        assert "monitor/drift/pixel" in sig
    assert hook.should_stop() and saved == [0, 1]  # step 0 (the base model) is the first best
    assert (tmp_path / "best" / "w").read_text() == "1"
    assert hook.markers() == [(20, "divergence")]
    summary = hook.finish()
    assert summary["best"]["step"] == 10 and summary["stopped"] and (tmp_path / "monitor_report.png").is_file()


def test_hook_resume_and_fresh_start_drop_stale_grids(tmp_path):
    from alignment.monitor import MonitorHook

    hook = MonitorHook(MonitorSection(statistics=[]), tmp_path)
    for step in (0, 10, 20):
        hook.on_validation(step, {"val/reward/mean": 1.0 + step}, solid([0.5] * 3, n=2), ["p", "p"])
    strips = lambda: sorted(p.name for p in (tmp_path / "monitor_grids").glob("*.png"))  # noqa: E731
    assert strips() == ["step-0000000.png", "step-0000010.png", "step-0000020.png"]
    resumed = MonitorHook(MonitorSection(statistics=[]), tmp_path)
    resumed.resume(10)  # the checkpoint is step 10: the strip of step 20 belongs to the interrupted run
    assert strips() == ["step-0000000.png", "step-0000010.png"]
    assert [r["step"] for r in resumed.monitor.history] == [0, 10]
    fresh = MonitorHook(MonitorSection(statistics=[]), tmp_path)
    fresh.on_validation(0, {"val/reward/mean": 1.0}, solid([0.5] * 3, n=2), ["p", "p"])
    assert strips() == ["step-0000000.png"]


def test_hook_adds_the_training_reward_window_to_the_record(tmp_path):
    from alignment.monitor import MonitorHook

    hook = MonitorHook(MonitorSection(statistics=[], train_key="train/reward/mean/window_mean"), tmp_path)
    img = solid([0.5] * 3, n=2)
    hook.on_validation(0, {"val/reward/mean": 1.0, "val/rewards/eval/mean": 0.5}, img, ["p", "p"])
    for r in (1.0, 2.0, 3.0, float("nan")):
        hook.record_training({"reward/mean": r, "loss": 0.1})
    sig = hook.on_validation(3, {"val/reward/mean": 1.0, "val/rewards/eval/mean": 0.5}, img, ["p", "p"])
    assert hook.monitor.history[-1]["train/reward/mean/window_mean"] == pytest.approx(2.0)
    assert sig["train/reward/mean/window_mean"] == pytest.approx(2.0)  # logged too
    hook.record_training({"reward/mean": 5.0})
    hook.on_validation(4, {"val/reward/mean": 1.0, "val/rewards/eval/mean": 0.2}, img, ["p", "p"])
    assert hook.monitor.history[-1]["train/reward/mean/window_mean"] == 5.0  # the window restarts
    # the training-prompt reward rose while the held-out one fell: divergence on the windowed key
    assert [a.rule for a in hook.monitor.alarms] == ["divergence"]
