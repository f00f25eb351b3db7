"""RWR's pre-training term on real, captioned images (``method.prior_source: data`` with ``method.prior_data``,
Lee et al. 2023) in `alignment.trainers.reward_finetune`, on the tiny random SD pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trainer_helpers import Brightness

from alignment.configs import load_config
from alignment.trainers.reward_finetune import (
    MethodSection,
    RewardFinetuneConfig,
    RewardFinetuner,
    SamplingSection,
    check_method,
)

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.validate_every=0", "train.save_every=0", "train.report_to=none", "data.val_images_per_prompt=1",
        "data.val_prompts=[a horse]", "data.prompts=[a cat, a dog]", "reward.normalize=false",
        "sampling.num_steps=2", "train.batch_size=4"]

pytestmark = pytest.mark.usefixtures("one_thread")


def config(tmp_path, *over) -> RewardFinetuneConfig:
    return load_config(RewardFinetuneConfig, ROOT / "configs" / "tiny" / "reward_rwr.yaml",
                       [*FAST, f"train.output_dir={tmp_path}", *over])

CAPTIONS = ["a red square", "a blue square", "a green square"]
COLOURS = [(230, 20, 20), (20, 40, 230), (20, 180, 40)]


def write_images(folder, size=(40, 48)) -> list[str]:
    """Three one-colour images (not square, not the model's resolution) and a JSONL of their captions."""
    folder.mkdir()
    rows = []
    for i, (cap, rgb) in enumerate(zip(CAPTIONS, COLOURS)):
        arr = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.array(rgb, dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i}.png")
        rows.append({"image": f"img_{i}.png", "prompt": cap})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return CAPTIONS


def test_prior_data_is_encoded_once_and_fitted_with_its_own_captions(tmp_path, monkeypatch):
    write_images(tmp_path / "real")
    cfg = config(tmp_path / "run", "train.max_steps=1", "method.prior_weight=1.0", "method.prior_source=data",
                 f"method.prior_data={tmp_path / 'real' / 'data.jsonl'}", "method.rwr_weighting=exp")
    trainer = RewardFinetuner(cfg, reward=Brightness())
    data = trainer._prior_data
    assert data["prompts"] == CAPTIONS
    res = trainer.resolution
    # Centre-cropped and resized to the model's resolution, then the VAE posterior mean of each image.
    first = torch.tensor(COLOURS[0], dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, res, res) / 255.0
    torch.testing.assert_close(data["latents"][:1], trainer.adapter.encode_images(first, sample=False).float(),
                               atol=1e-4, rtol=1e-4)
    calls = []
    original = RewardFinetuner._denoising_pred

    def spy(self, latents, cond, gen, uncond=None):
        calls.append(latents.detach().clone())
        return original(self, latents, cond, gen, uncond)

    monkeypatch.setattr(RewardFinetuner, "_denoising_pred", spy)
    loss, _, _, _ = trainer._rwr_step(["a cat", "a dog"] * 2, torch.Generator().manual_seed(0), 0, 0, None)
    assert math.isfinite(float(loss.detach()))
    # Two denoising calls: the weighted loss on the samples, then the prior term on rows of the real data.
    assert len(calls) == 2
    prior = calls[1]
    assert prior.shape[0] == cfg.train.batch_size
    assert all(any(torch.equal(row, d) for d in data["latents"]) for row in prior)


def test_prior_data_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="prior_source=data needs method.prior_data"):
        check_method(MethodSection(name="rwr", prior_source="data", prior_weight=1.0), SamplingSection())
    with pytest.raises(ValueError, match="prior_data is set but method.prior_source='base'"):
        check_method(MethodSection(name="rwr", prior_data="x.jsonl", prior_weight=1.0), SamplingSection())
    with pytest.raises(ValueError, match="prior_weight=0 never uses the data"):
        check_method(MethodSection(name="rwr", prior_source="data", prior_data="x.jsonl"), SamplingSection())
    with pytest.raises(ValueError, match="does not exist"):
        RewardFinetuner(config(tmp_path, "method.prior_weight=1.0", "method.prior_source=data",
                               f"method.prior_data={tmp_path / 'missing.jsonl'}"), reward=Brightness())
