"""Any reward as trl's `reward_fn(images, prompts, prompt_metadata) -> (rewards, metadata)` (trl <= 0.23)."""

import pytest
import torch

from alignment.trl_reward import trl_reward_fn
from reward_plugins import create_reward
from reward_plugins.base import RewardModel

pytestmark = pytest.mark.usefixtures("one_thread")


class Flaky(RewardModel):
    is_differentiable = False
    requires_prompts = False

    def compute(self, images, prompts):
        s = (images.mean((1, 2, 3)) > 0.5).float()
        s[0] = float("nan")
        return {"score": s}


def test_documented_signature_values_and_metadata():
    reward = create_reward("aesthetic-tiny")
    fn = trl_reward_fn(reward, batch_size=2)
    images = torch.rand(3, 3, 32, 32)
    rewards, meta = fn(images, ("a cat", "a dog", "a car"), ({}, {}, {}))
    torch.testing.assert_close(rewards, reward.score(images, ["a cat", "a dog", "a car"]).scores)
    assert not rewards.requires_grad and meta["nan_count"] == 0 and all(len(v) == 3 for v in meta["per_dim"].values()) and meta["per_dim"]


def test_differentiable_mode_keeps_the_graph_for_alignprop():
    fn = trl_reward_fn(create_reward("aesthetic-tiny"), differentiable=True)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    rewards, _ = fn(images, ["a cat", "a dog"], [{}, {}])
    rewards.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_nan_is_counted_and_optionally_replaced():
    rewards, meta = trl_reward_fn(Flaky())(torch.rand(3, 3, 8, 8), ["a"] * 3, [{}] * 3)
    assert meta["nan_count"] == 1 and torch.isnan(rewards[0])
    rewards, meta = trl_reward_fn(Flaky(), nan_to=0.0)(torch.rand(3, 3, 8, 8), ["a"] * 3, [{}] * 3)
    assert meta["nan_count"] == 1 and torch.isfinite(rewards).all()


def test_bad_input():
    with pytest.raises(ValueError, match="not differentiable"):
        trl_reward_fn(Flaky(), differentiable=True)
    with pytest.raises(TypeError, match="RewardModel"):
        trl_reward_fn(lambda x: x)
    with pytest.raises(TypeError, match=r"\(B, 3, H, W\) tensor"):
        trl_reward_fn(Flaky())([torch.rand(3, 8, 8)], ["a"], [{}])


def test_trl_ddpo_trainer_runs_an_epoch_with_the_adapter(tmp_path):
    trl = pytest.importorskip("trl", reason="trl (<= 0.23, the last with DDPOTrainer) is not installed")
    if not hasattr(trl, "DDPOTrainer"):
        pytest.skip(f"trl {trl.__version__} has no DDPOTrainer (removed in 0.24)")
    from accelerate import PartialState

    from alignment.tiny import save_tiny_pipeline

    PartialState()  # trl's pipeline logs through accelerate before its trainer builds an Accelerator
    save_tiny_pipeline(tmp_path / "sd")
    pipe = trl.DefaultDDPOStableDiffusionPipeline(str(tmp_path / "sd"), use_lora=True)
    seen = []
    inner = trl_reward_fn(create_reward("aesthetic-tiny"))

    def reward_fn(images, prompts, metadata):
        seen.append((tuple(images.shape), float(images.min()), float(images.max()), tuple(prompts)))
        return inner(images, prompts, metadata)

    cfg = trl.DDPOConfig(
        num_epochs=1, sample_num_steps=2, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=1,
        train_gradient_accumulation_steps=1, log_with=None, mixed_precision="no", save_freq=100,
        per_prompt_stat_tracking=False, async_reward_computation=False,
        project_kwargs={"project_dir": str(tmp_path), "logging_dir": str(tmp_path / "logs"),
                        "automatic_checkpoint_naming": True, "total_limit": 1},
    )
    trainer = trl.DDPOTrainer(cfg, reward_fn, lambda: ("a cat", {}), pipe)  # adds its LoRA
    before = {n: p.detach().clone() for n, p in pipe.sd_pipeline.unet.named_parameters() if p.requires_grad}
    assert before
    trainer.train()
    assert seen and seen[0][0] == (2, 3, 32, 32) and 0 <= seen[0][1] and seen[0][2] <= 1
    after = dict(pipe.sd_pipeline.unet.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)  # trl updated its LoRA


def test_trl_alignprop_trainer_backpropagates_through_the_adapter(tmp_path):
    trl = pytest.importorskip("trl", reason="trl (<= 0.23, the last with AlignPropTrainer) is not installed")
    if not hasattr(trl, "AlignPropTrainer"):
        pytest.skip(f"trl {trl.__version__} has no AlignPropTrainer (removed in 0.24)")
    from accelerate import PartialState

    from alignment.tiny import save_tiny_pipeline

    PartialState()
    save_tiny_pipeline(tmp_path / "sd")
    pipe = trl.DefaultDDPOStableDiffusionPipeline(str(tmp_path / "sd"), use_lora=True)
    inner = trl_reward_fn(create_reward("aesthetic-tiny"), differentiable=True)
    seen = []

    def reward_fn(images, prompts, metadata):
        seen.append(images.requires_grad)
        return inner(images, prompts, metadata)

    cfg = trl.AlignPropConfig(
        num_epochs=1, sample_num_steps=2, train_batch_size=1, train_gradient_accumulation_steps=1, log_with=None,
        mixed_precision="no", save_freq=100, truncated_backprop_rand=False, truncated_backprop_timestep=0,
        project_kwargs={"project_dir": str(tmp_path), "logging_dir": str(tmp_path / "logs"),
                        "automatic_checkpoint_naming": True, "total_limit": 1},
    )
    trainer = trl.AlignPropTrainer(cfg, reward_fn, lambda: ("a cat", {}), pipe)
    before = {n: p.detach().clone() for n, p in pipe.sd_pipeline.unet.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(pipe.sd_pipeline.unet.named_parameters())
    assert seen == [True]  # trl hands over images with a graph; the reward keeps it
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)
