"""Calibration statistics (and their use by CompositeReward and the reward fine-tuning trainer) and the
bias probes, with rewards whose answers are known."""

import json
from types import SimpleNamespace

import pytest
import torch
from evaluation_helpers import ChannelReward, PromptColourReward, solid_png

from alignment.evaluation import load_preference_set, load_rewards
from alignment.evaluation.calibration import calibration_stats, distribution_stats, save_calibration
from alignment.evaluation.probes import (
    EDITS,
    add_noise,
    adjust_contrast,
    adjust_saturation,
    gaussian_blur,
    jpeg,
    probes_table,
    run_probes,
)
from alignment.evaluation.report import probe_charts
from reward_plugins.composite import CompositeReward, Term
from reward_plugins.testing import random_images

REDS = [40, 80, 120, 160, 200, 240]


def _folder(tmp_path, prompts):
    d = tmp_path / "ref"
    d.mkdir()
    for i, r in enumerate(REDS):
        (d / f"{i:02d}.png").write_bytes(solid_png(r, 255 - r, 30 * (i % 2), size=24))
    (d / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return d


def test_distribution_stats_on_known_values():
    s = distribution_stats(torch.arange(1, 101, dtype=torch.float64))
    assert s["n"] == 100 and s["mean"] == 50.5 and s["min"] == 1 and s["max"] == 100
    assert s["std"] == pytest.approx(torch.arange(1, 101).double().std().item())
    assert s["quantiles"]["0.5"] == 50.5 and s["quantiles"]["0.25"] == pytest.approx(25.75)
    with pytest.raises(ValueError, match="at least 2"):
        distribution_stats([1.0, float("nan")])


def test_calibration_file_feeds_composite_and_trainer_normalisation(tmp_path):
    ref = load_preference_set(_folder(tmp_path, ["a red cube"]))  # one line: shared by every image
    assert ref.layout == "images" and len(ref.images) == 6 and ref.groups[0] == "a red cube"
    model = ChannelReward()
    rewards = load_rewards(["channels"], tmp_path / "cache", models={"channels": model})
    stats = calibration_stats(ref, rewards, batch_size=4, progress=False)
    reds = torch.tensor(REDS, dtype=torch.float64) / 255
    red = stats["rewards"]["channels"]["dimensions"]["red"]
    assert red["n"] == 6 and red["mean"] == pytest.approx(float(reds.mean()), abs=1e-6)
    assert red["std"] == pytest.approx(float(reds.std()), abs=1e-6)
    assert set(stats["rewards"]["channels"]["dimensions"]) == {"red", "green"}
    path = save_calibration(stats, tmp_path / "calibration.json")

    comp = CompositeReward([Term(model, 1.0, "red"), Term(model, 2.0, "green")])
    got = comp.load_calibration(path)
    assert got["channels:red"] == pytest.approx((red["mean"], red["std"]))
    img = torch.full((1, 3, 8, 8), 200 / 255)
    out = comp(img, None)
    green = stats["rewards"]["channels"]["dimensions"]["green"]
    expected = (200 / 255 - red["mean"]) / red["std"] + 2 * (200 / 255 - green["mean"]) / green["std"]
    assert float(out.scores) == pytest.approx(expected, rel=1e-5)

    # The trainer's reward section reads the same file instead of estimating from a first batch.
    from alignment.trainers.reward_finetune import RewardFinetuner, RewardSection

    fresh = CompositeReward([Term(ChannelReward(), 1.0, "green")])
    fake = SimpleNamespace(reward=fresh, eval_reward=None,
                           cfg=SimpleNamespace(reward=RewardSection(terms={"channels:green": 1.0}, calibration_file=str(path)),
                                               eval_reward=None))
    trained_stats = RewardFinetuner.calibrate(fake)
    assert trained_stats["reward"]["channels:green"] == pytest.approx([green["mean"], green["std"]])
    assert fresh.terms[0].shift == pytest.approx(green["mean"])


def test_composite_rejects_bad_calibrations(tmp_path):
    comp = CompositeReward([Term(ChannelReward(), 1.0, "red")])
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a calibration file"):
        comp.load_calibration(tmp_path / "x.json")
    with pytest.raises(ValueError, match="no statistics for reward 'channels'.*calibrate that reward"):
        comp.load_calibration({"format": "reward-plugins/calibration", "rewards": {"pickscore": {}}})
    with pytest.raises(ValueError, match="no dimension 'red'"):
        comp.load_calibration({"format": "reward-plugins/calibration", "rewards": {"channels": {"dimensions": {}}}})


def test_edits_do_what_they_say():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 20, generator=g)
    grey = adjust_saturation(x, 0.0)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    assert torch.allclose(adjust_saturation(x, 1.0), x, atol=1e-6)
    flat = adjust_contrast(x, 0.0)
    assert flat.std(dim=(2, 3)).max() < 1e-6
    const = torch.full((1, 3, 9, 9), 0.4)
    assert torch.allclose(gaussian_blur(const, 2.0), const, atol=1e-6)
    assert gaussian_blur(x, 2.0).std() < x.std()
    assert torch.equal(add_noise(x, 0.05, seed=3), add_noise(x, 0.05, seed=3))
    assert (jpeg(x, 95) - x).abs().mean() < (jpeg(x, 10) - x).abs().mean()
    for name, e in EDITS.items():  # the neutral strength leaves an image alone
        if name != "jpeg":
            assert torch.allclose(e.fn(x, e.neutral), x, atol=1e-6)
    smooth = random_images(2, 32, 32)  # JPEG 100 is near-lossless on pictures (not on white noise)
    assert (jpeg(smooth, 100) - smooth).abs().mean() < 0.02


def test_probes_report_known_directions_and_prompt_dependence(tmp_path):
    # Each image's prompt names its dominant channel, so any other prompt can only lower the match.
    prompts = ["a green cube", "a green ball", "a green car", "a red cube", "a red ball", "a red car"]
    ref = load_preference_set(_folder(tmp_path, prompts))
    rewards = load_rewards(["channels:red", "prompt-colour"], None,
                           models={"channels": ChannelReward(), "prompt-colour": PromptColourReward()})
    res = run_probes(ref, rewards, ["channels:red", "prompt-colour"], num_images=6, edits=["brightness", "saturation"])
    assert res.images == 6
    up = res.lookup("channels:red", "brightness", 1.2)
    assert up.mean_change > 0 and up.fraction_up > 0.5 and up.relative_change > 0
    down = res.lookup("channels:red", "brightness", 0.6)
    assert down.mean_change < 0 and down.fraction_up == 0.0
    # A prompt-free reward does not depend on the prompt at all; the prompt reader drops with a stranger's.
    assert res.lookup("channels:red", "prompt_shuffle", 1.0).mean_change == 0.0
    shuffled = res.lookup("prompt-colour", "prompt_shuffle", 1.0)
    assert shuffled.mean_change < 0 and shuffled.fraction_up < 0.5
    table = probes_table(res)
    assert "| channels:red | brightness | 1.2 |" in table
    charts = probe_charts(res, tmp_path / "charts")
    assert {p.name for p in charts} == {"probe_brightness.png", "probe_saturation.png", "probe_prompt_shuffle.png"}
    assert all(p.stat().st_size > 1000 for p in charts)
    with pytest.raises(ValueError, match="unknown probe"):
        run_probes(ref, rewards, ["channels:red"], edits=["posterize"])


def test_best_of_n_output_is_a_reference_set(tmp_path):
    from alignment.best_of_n import best_of_n
    from alignment.report import write_report
    from alignment.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0, sample_size=8)
    res = best_of_n(pipe, ["a red cube", "a green ball"], ChannelReward(), n=3, k=1, num_inference_steps=2,
                    progress=False)
    write_report(res, tmp_path / "bon", save_images="all")
    ref = load_preference_set(tmp_path / "bon")
    assert ref.layout == "best-of-n" and len(ref.images) == 6 and ref.groups == ["a red cube", "a green ball"]
    stats = calibration_stats(ref, load_rewards(["channels"], models={"channels": ChannelReward()}), progress=False)
    expected = res.per_dim["red"].reshape(-1).double()
    # the PNGs round to uint8: the mean moves by at most half a level
    assert stats["rewards"]["channels"]["dimensions"]["red"]["mean"] == pytest.approx(float(expected.mean()), abs=0.5 / 255)
