"""EMA of the trained weights, shared by every trainer (issue 11, item 6): diffusers' EMAModel schedule on
hand-made tensors, weights swapped in and restored, exact resume, and exports that carry the EMA weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignment.configs import load_config
from alignment.trainers.common import EMA, LoraSection, ModelSection, TrainSection, check_sections, ema_weights

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ema_follows_diffusers_schedule_on_hand_made_tensors():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA([p], decay=0.5)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 5.0]))
    ema.update()  # update 1: decay 0 -> the shadow is the weights
    assert ema.shadow[0].tolist() == [3.0, 5.0]
    with torch.no_grad():
        p.copy_(torch.tensor([13.0, 15.0]))
    ema.update()  # update 2: decay min(0.5, 2/11) = 2/11
    d = 2 / 11
    torch.testing.assert_close(ema.shadow[0], torch.tensor([d * 3 + (1 - d) * 13, d * 5 + (1 - d) * 15]))
    assert ema.current_decay(10**6) == 0.5  # capped by the configured decay


def test_applied_swaps_in_the_average_and_restores():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    ema = EMA([p], decay=0.9)
    ema.shadow[0].fill_(7.0)
    with ema.applied():
        assert p.item() == 7.0
    assert p.item() == 1.0
    with ema_weights(None):  # no EMA: a no-op
        assert p.item() == 1.0


def test_state_dict_round_trip_and_bad_decay():
    p = torch.nn.Parameter(torch.randn(3))
    a = EMA([p], decay=0.99)
    a.update()
    a.update()
    b = EMA([p], decay=0.99)
    b.load_state_dict(a.state_dict())
    assert b.num_updates == 2 and torch.equal(a.shadow[0], b.shadow[0])
    with pytest.raises(ValueError, match="train.ema_decay must be in"):
        check_sections(ModelSection(tiny="sd"), LoraSection(), TrainSection(ema_decay=1.0))
    with pytest.raises(ValueError, match="decay must be in"):
        EMA([p], decay=0.0)


def _dpo_cfg(pairs, *over):
    from alignment.trainers.dpo import DPOConfig

    return load_config(DPOConfig, ROOT / "configs/tiny/dpo.yaml", [
        f"data.path={pairs}", "data.synthetic_pairs=0", "train.validate_every=0", "train.report_to=none",
        "train.batch_size=2", "train.ema_decay=0.9", *over])


def test_dpo_exports_the_ema_weights_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from alignment.trainers.common import unwrap
    from alignment.trainers.dpo import DPOTrainer, make_synthetic_pairs

    pairs = make_synthetic_pairs(tmp_path / "p.parquet", 8, resolution=32)
    full = DPOTrainer(_dpo_cfg(pairs, "train.max_steps=4", "train.save_every=0"), output_dir=tmp_path / "full")
    res = full.train()
    assert full.ema is not None and full.ema.num_updates == 4
    saved = load_file(res.lora_path)
    raw = {n: p for n, p in unwrap(full.model).named_parameters() if p.requires_grad}
    with full.ema.applied():
        averaged = {n: p.detach().clone() for n, p in unwrap(full.model).named_parameters() if p.requires_grad}
    # The file holds the EMA weights (lora_A is saved as is; B carries the baked alpha/rank = 1 here).
    a_names = sorted(n for n in raw if "lora_A" in n)
    saved_a = sorted(k for k in saved if "lora_A" in k or "lora.down" in k)
    assert len(a_names) == len(saved_a)
    flat_saved = torch.cat([saved[k].flatten() for k in sorted(saved)])

    def close(x, y):
        return x.shape == y.shape and torch.allclose(x, y)

    assert all(any(close(saved[k], averaged[n]) for n in a_names) for k in saved_a)
    assert not any(close(saved[k], raw[n]) for k in saved_a for n in a_names)
    assert torch.isfinite(flat_saved).all()
    # Resume: a run stopped at step 2 and resumed ends with the same EMA as the uninterrupted one.
    part = DPOTrainer(_dpo_cfg(pairs, "train.max_steps=4", "train.save_every=2"), output_dir=tmp_path / "part")
    part.train(stop_at=2)
    resumed = DPOTrainer(_dpo_cfg(pairs, "train.max_steps=4", "train.save_every=2"), output_dir=tmp_path / "part",
                         resume=True)
    resumed.train()
    assert resumed.ema.num_updates == 4
    for a, b in zip(full.ema.shadow, resumed.ema.shadow):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_reward_finetuner_keeps_an_ema_and_exports_it(tmp_path):
    from safetensors.torch import load_file

    from alignment.trainers.reward_finetune import RewardFinetuneConfig, RewardFinetuner

    cfg = load_config(RewardFinetuneConfig, ROOT / "configs/tiny/reward_draft.yaml", [
        "train.max_steps=2", "train.ema_decay=0.5", "train.report_to=none", "train.validate_every=0",
        "train.save_every=0", "eval_reward=null"])
    trainer = RewardFinetuner(cfg, output_dir=str(tmp_path / "run"))
    summary = trainer.train()
    assert trainer.ema is not None and trainer.ema.num_updates == 2
    saved = load_file(summary["lora"])
    with trainer.ema.applied():
        averaged = [p.detach().clone() for p in trainer.params]
    assert any(torch.allclose(v, a) for v in saved.values() for a in averaged if v.shape == a.shape)


def test_refl_recipe_matches_imagereward_train_refl_sh():
    from alignment.trainers.reward_finetune import RewardFinetuneConfig, check_method

    cfg = load_config(RewardFinetuneConfig, ROOT / "configs/sd15_reward_refl.yaml")
    check_method(cfg.method, cfg.sampling)
    assert cfg.method.name == "refl" and cfg.method.refl_step_range == [30, 39]
    assert cfg.sampling.num_steps == 40 and cfg.sampling.scheduler == "ddpm" and cfg.sampling.guidance_scale <= 1
    assert not cfg.lora.enabled and cfg.train.ema_decay == 0.9999 and cfg.train.lr == 1e-5
    assert cfg.train.lr_scheduler == "constant" and cfg.train.mixed_precision == "fp16"
    assert cfg.train.batch_size * cfg.train.gradient_accumulation_steps == 8 and cfg.train.max_steps == 100
    assert list(cfg.reward.terms) == ["imagereward"]
