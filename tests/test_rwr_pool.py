"""RWR's offline pool (``method.rwr_samples: pool``, Lee et al. / RAFT) and the VAE re-encoding of samples
(``method.rwr_reencode``) in `alignment.trainers.reward_finetune`, on the tiny random SD pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from trainer_helpers import Brightness

from alignment.configs import load_config
from alignment.trainers.common import read_jsonl
from alignment.trainers.reward_finetune import (
    MethodSection,
    RewardFinetuneConfig,
    RewardFinetuner,
    SamplingSection,
    check_method,
)

ROOT = Path(__file__).resolve().parents[1]
RWR = ROOT / "configs" / "tiny" / "reward_rwr.yaml"
PROMPTS = ["a cat", "a dog", "a red car"]
FAST = ["train.validate_every=0", "train.save_every=0", "train.report_to=none", "data.val_images_per_prompt=1",
        "data.val_prompts=[a horse]", f"data.prompts=[{', '.join(PROMPTS)}]", "reward.normalize=false",
        "sampling.num_steps=2", "train.batch_size=4"]

pytestmark = pytest.mark.usefixtures("one_thread")


def config(tmp_path, *over) -> RewardFinetuneConfig:
    return load_config(RewardFinetuneConfig, RWR, [*FAST, f"train.output_dir={tmp_path}", *over])


def test_pool_is_drawn_once_from_the_base_and_keeps_each_prompts_best(tmp_path, monkeypatch):
    calls = []
    original = RewardFinetuner.generate

    def spy(self, prompts, generator, base=False):
        calls.append((list(prompts), base))
        return original(self, prompts, generator, base=base)

    monkeypatch.setattr(RewardFinetuner, "generate", spy)
    cfg = config(tmp_path, "train.max_steps=3", "method.rwr_samples=pool", "method.rwr_pool_size=6",
                 "method.rwr_weighting=topk", "method.rwr_top_fraction=0.34")
    trainer = RewardFinetuner(cfg, reward=Brightness())
    trainer.train()
    # 3 prompts x 6 images in chunks of the batch size (4 + 2), all from the base model, and nothing after
    # (validation samples through its own call).
    assert sorted(len(c[0]) for c in calls) == [2, 2, 2, 4, 4, 4] and all(base for _, base in calls)
    assert all(len(set(c[0])) == 1 for c in calls)
    pool = trainer._rwr_pool
    # topk 0.34 of 6 keeps ceil(2.04) = 3 per prompt, each weighted 1 after the rescaling to mean 1.
    assert pool["prompts"] == [p for p in PROMPTS for _ in range(3)]
    torch.testing.assert_close(pool["weights"], torch.ones(9))
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["rwr/pool_size"] == 18 and rows[0]["rwr/pool_kept"] == 9
    # The kept entries are each prompt's brightest: their mean beats the pool's.
    assert rows[0]["rwr/pool_kept_reward_mean"] > rows[0]["rwr/pool_reward_mean"]
    # The policy was trained (the LoRA moved) on those entries.
    assert any(float(p.detach().abs().sum()) > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_pool_entries_are_the_kept_samples_re_encoded(tmp_path, monkeypatch):
    cfg = config(tmp_path, "train.max_steps=1", "method.rwr_samples=pool", "method.rwr_pool_size=4",
                 "method.rwr_weighting=topk", "method.rwr_top_fraction=0.5", "method.rwr_reencode=true")
    trainer = RewardFinetuner(cfg, reward=Brightness())
    encoded = []
    original = RewardFinetuner._reencode

    def spy(self, images):
        encoded.append((images.shape[0], original(self, images)))
        return encoded[-1][1]

    monkeypatch.setattr(RewardFinetuner, "_reencode", spy)
    pool = trainer._build_rwr_pool()
    # Only the kept images (2 of 4 per prompt) are encoded, and the pool holds exactly their encodings.
    assert [n for n, _ in encoded] == [2, 2, 2]
    torch.testing.assert_close(pool["latents"], torch.cat([z for _, z in encoded]))
    # Rebuilding draws the same pool (fixed seeds: resume and every process see the same one).
    torch.testing.assert_close(trainer._build_rwr_pool()["latents"], pool["latents"])


def test_reencode_fits_the_encoding_of_the_sampled_images(tmp_path, monkeypatch):
    cfg = config(tmp_path, "train.max_steps=1", "method.rwr_reencode=true", "method.rwr_weighting=exp")
    trainer = RewardFinetuner(cfg, reward=Brightness())
    seen = {}
    original = RewardFinetuner._denoising_pred

    def spy(self, latents, cond, gen, uncond=None):
        seen["latents"] = latents.detach().clone()
        return original(self, latents, cond, gen, uncond)

    monkeypatch.setattr(RewardFinetuner, "_denoising_pred", spy)
    loss, _, images, _ = trainer._rwr_step(PROMPTS[:2] * 2, torch.Generator().manual_seed(0), 0, 0, None)
    assert math.isfinite(float(loss))
    torch.testing.assert_close(seen["latents"], trainer.adapter.encode_images(images, sample=False).float())


def test_pool_and_reencode_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"method.rwr_group_size=4 with method.rwr_samples=pool.*set rwr_group_size to 1"):
        check_method(MethodSection(name="rwr", rwr_samples="pool", rwr_group_size=4), SamplingSection())
    with pytest.raises(ValueError, match="method.rwr_reencode must be true or false"):
        check_method(MethodSection(name="rwr", rwr_reencode="yes"), SamplingSection())
    with pytest.raises(ValueError, match="rwr_pool_size"):
        RewardFinetuner(config(tmp_path, "method.rwr_samples=pool", "method.rwr_pool_size=1"))
    # 'raw' weights drop non-positive rewards: a reward that is negative everywhere keeps nothing.
    cfg = config(tmp_path, "method.rwr_samples=pool", "method.rwr_pool_size=2", "method.rwr_weighting=raw")
    trainer = RewardFinetuner(cfg, reward=Brightness(offset=2.0))
    with pytest.raises(ValueError, match="rwr_samples=pool kept no sample.*Use a weighting that keeps samples"):
        trainer._build_rwr_pool()
