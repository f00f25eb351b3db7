"""AlignProp's truncation (issue 11, item 7): the current official code draws the cut-off step once per
generation call from N(42, 5) on 50 steps (K = 50 - t, about 9 +- 5, never 50); the uniform option remains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignment.configs import load_config
from alignment.trainers.reward_finetune import (
    MethodSection,
    RewardFinetuneConfig,
    SamplingSection,
    check_method,
    draw_truncation_k,
)

ROOT = Path(__file__).resolve().parents[1]


def test_gaussian_truncation_follows_the_official_distribution():
    m = MethodSection(name="alignprop", truncation="gaussian")
    g = torch.Generator().manual_seed(0)
    ks = torch.tensor([draw_truncation_k(m, 50, g) for _ in range(4000)], dtype=torch.float32)
    assert ks.min() >= 1 and ks.max() <= 49  # never full backprop
    # t = int(x), x ~ N(42, 5) redrawn outside [1, 49] (so x < 50): E[x | x < 50] = 42 - 5 phi(1.6)/Phi(1.6)
    # = 41.41, the floor takes ~0.5 off, so E[K] = 50 - 40.9 = 9.1; its sd is ~4.6.
    assert 8.8 < ks.mean() < 9.4 and 4.2 < ks.std() < 5.0


def test_uniform_truncation_stays_in_its_range():
    m = MethodSection(name="alignprop", truncation="uniform", truncation_range=[3, 5])
    g = torch.Generator().manual_seed(0)
    assert {draw_truncation_k(m, 10, g) for _ in range(200)} == {3, 4, 5}
    m = MethodSection(name="alignprop", truncation="uniform")
    assert {draw_truncation_k(m, 4, g) for _ in range(200)} == {1, 2, 3, 4}


def test_bad_truncation_settings_are_refused():
    with pytest.raises(ValueError, match="method.truncation must be one of"):
        check_method(MethodSection(name="alignprop", truncation="normal"), SamplingSection())
    with pytest.raises(ValueError, match="truncation_mean"):
        check_method(MethodSection(name="alignprop", truncation="gaussian"), SamplingSection(num_steps=20))
    with pytest.raises(ValueError, match="truncation_std"):
        check_method(MethodSection(name="alignprop", truncation="gaussian", truncation_std=0.0), SamplingSection())


def test_alignprop_recipe_uses_the_official_defaults():
    cfg = load_config(RewardFinetuneConfig, ROOT / "configs/sd15_reward_alignprop.yaml")
    check_method(cfg.method, cfg.sampling)
    m, s = cfg.method, cfg.sampling
    assert m.truncation == "gaussian" and (m.truncation_mean, m.truncation_std) == (42.0, 5.0)
    assert s.num_steps == 50 and s.eta == 1.0 and s.guidance_scale == 5.0 and s.scheduler == "ddim"
