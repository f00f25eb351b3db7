"""Advantages and the clipped objective of policy-gradient training (alignment/policy_losses.py)."""

import math

import numpy as np
import pytest
import torch

from alignment.policy_losses import PerPromptStatTracker, group_advantages, ppo_clip_loss


def test_group_advantages_normalise_within_each_group():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 14.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(r, g)
    for idx in ([0, 1, 2], [3, 4, 5]):
        x = np.array(r[idx].tolist())
        torch.testing.assert_close(adv[idx], torch.tensor((x - x.mean()) / x.std(), dtype=torch.float32))
    # the std floor: a group that agrees gives zeros, not amplified noise
    flat = group_advantages(torch.tensor([1.0, 1.0 + 1e-7]), torch.tensor([0, 0]), std_floor=1e-4)
    assert flat.abs().max() < 1e-2


def test_group_advantages_skip_invalid_samples_and_support_a_global_std():
    r = torch.tensor([1.0, float("nan"), 3.0, 5.0, float("inf"), 0.0])
    g = torch.tensor([0, 0, 0, 1, 1, 2])
    adv = group_advantages(r, g)
    assert torch.isfinite(adv).all()
    assert adv[1] == 0 and adv[4] == 0  # invalid
    assert adv[3] == 0 and adv[5] == 0  # a group with one valid sample has no baseline
    torch.testing.assert_close(adv[[0, 2]], torch.tensor([-1.0, 1.0]))
    glob = group_advantages(r, g, global_std=True)
    std = float(np.std([1.0, 3.0, 5.0, 0.0]))
    torch.testing.assert_close(glob[[0, 2]], torch.tensor([-1.0, 1.0]) / std)


def test_per_prompt_tracker_uses_batch_stats_until_min_count_then_its_buffer():
    tr = PerPromptStatTracker(buffer_size=4, min_count=3)
    a1 = tr.update(["a", "a", "b"], torch.tensor([1.0, 2.0, 6.0]))
    batch = np.array([1.0, 2.0, 6.0])
    torch.testing.assert_close(a1, torch.tensor((batch - batch.mean()) / batch.std(), dtype=torch.float32))
    a2 = tr.update(["a", "b"], torch.tensor([3.0, 0.0]))
    buf = np.array([1.0, 2.0, 3.0])  # "a" now has 3 values: its own statistics
    torch.testing.assert_close(a2[0], torch.tensor((3.0 - buf.mean()) / buf.std(), dtype=torch.float32))
    tr.update(["a", "a"], torch.tensor([4.0, 5.0]))
    assert list(tr.stats["a"]) == [2.0, 3.0, 4.0, 5.0]  # bounded buffer
    clone = PerPromptStatTracker(4, 3)
    clone.load_state_dict(tr.state_dict())
    torch.testing.assert_close(clone.update(["a"], torch.tensor([1.0])), tr.update(["a"], torch.tensor([1.0])))
    assert tr.update(["a"], torch.tensor([float("nan")]))[0] == 0


def test_ppo_clip_loss_is_pessimistic_and_clipped():
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    new = torch.tensor([math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5)], requires_grad=True)
    loss, stats = ppo_clip_loss(new, old, adv, clip_range=0.2)
    # max(-A r, -A clip(r)): [-1.2, -0.5, 1.5, 0.8]
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 0.5 + 1.5 + 0.8) / 4))
    loss.backward()
    # clipped terms carry no gradient; unclipped ones carry -A r / 4
    torch.testing.assert_close(new.grad, torch.tensor([0.0, -0.5 / 4, 1.5 / 4, 0.0]))
    assert float(stats["clipfrac"]) == 1.0
    same, st = ppo_clip_loss(old.clone(), old, adv, clip_range=1e-4)
    assert torch.equal(st["ratio"], torch.ones(4)) and float(same) == 0.0
    clipped, _ = ppo_clip_loss(old.clone(), old, torch.tensor([100.0, -100.0, 0.0, 0.0]), 0.1, adv_clip=5.0)
    assert float(clipped) == 0.0  # advantages clipped symmetrically to ±5 cancel


@pytest.mark.parametrize("bad", [0, -1])
def test_tracker_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="buffer_size and min_count"):
        PerPromptStatTracker(bad, 1)


def test_ppo_clip_loss_weights_drop_samples_and_reweight_the_mean():
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -2.0, 3.0, 0.5])
    new = torch.tensor([0.1, -0.05, 0.02, 0.3], requires_grad=True)
    w = torch.tensor([0.5, 0.0, 0.5, 0.0])  # samples 1 and 3 dropped (a failed reward), the others averaged
    loss, st = ppo_clip_loss(new, old, adv, clip_range=0.2, weights=w)
    keep = [0, 2]
    ref, ref_st = ppo_clip_loss(new[keep], old[keep], adv[keep], clip_range=0.2)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(st["approx_kl"], ref_st["approx_kl"])
    loss.backward()
    assert new.grad[1] == 0 and new.grad[3] == 0 and new.grad[0] != 0
    even, _ = ppo_clip_loss(new.detach(), old, adv, 0.2, weights=torch.full((4,), 0.25))
    torch.testing.assert_close(even, ppo_clip_loss(new.detach(), old, adv, 0.2)[0])
    with pytest.raises(ValueError, match="one entry per sample"):
        ppo_clip_loss(new, old, adv, 0.2, weights=torch.ones(3))
