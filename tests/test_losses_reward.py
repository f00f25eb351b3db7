"""Reward fine-tuning losses (alignment/losses.py section 2) on hand-made tensors."""

import math

import pytest
import torch

from alignment.losses import anchor_l2, draft_loss, refl_loss, rwr_loss, rwr_weights


def test_softmax_weights_are_batch_size_times_softmax():
    r = torch.tensor([0.0, 1.0, 3.0])
    w = rwr_weights(r, temperature=0.5, mode="softmax")
    e = [math.exp(x / 0.5) for x in (0.0, 1.0, 3.0)]
    expected = torch.tensor([3 * v / sum(e) for v in e])
    torch.testing.assert_close(w, expected)
    assert float(w.mean()) == pytest.approx(1.0)
    # A higher temperature flattens the weights towards uniform.
    flat = rwr_weights(r, temperature=100.0)
    assert float(flat.max() - flat.min()) < 0.05 < float(w.max() - w.min())


def test_exp_weights_are_clipped_then_mean_normalised():
    r = torch.tensor([0.0, 0.0, 10.0])
    w = rwr_weights(r, temperature=1.0, mode="exp", clip=5.0)
    # exp((r - mean)/tau) = [e^-3.33, e^-3.33, e^6.67] -> last clipped to 5, then divided by the mean.
    raw = torch.tensor([math.exp(-10 / 3), math.exp(-10 / 3), 5.0])
    torch.testing.assert_close(w, raw / raw.mean())
    unclipped = rwr_weights(r, temperature=1.0, mode="exp", clip=None)
    assert float(unclipped[2] / unclipped[0]) == pytest.approx(math.exp(10.0), rel=1e-4)


def test_weights_do_not_carry_gradients():
    r = torch.tensor([0.3, -0.2], requires_grad=True)
    assert not rwr_weights(r).requires_grad


def test_rwr_loss_matches_a_manual_weighted_mse():
    torch.manual_seed(0)
    pred = torch.randn(3, 4, 2, 2, requires_grad=True)
    target = torch.randn(3, 4, 2, 2)
    w = torch.tensor([0.5, 1.0, 1.5])
    loss = rwr_loss(pred, target, w)
    manual = sum(w[i] * ((pred[i] - target[i]) ** 2).mean() for i in range(3)) / 3
    torch.testing.assert_close(loss, manual)
    loss.backward()
    # The sample with weight 0 gets no gradient.
    pred.grad = None
    rwr_loss(pred, target, torch.tensor([0.0, 1.0, 2.0])).backward()
    assert float(pred.grad[0].abs().sum()) == 0.0 and float(pred.grad[2].abs().sum()) > 0


def test_rwr_prior_term_adds_unweighted_mse():
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    prior_pred, prior_target = torch.full((1, 1, 2, 2), 2.0), torch.zeros(1, 1, 2, 2)
    w = torch.tensor([1.0, 1.0])
    assert float(rwr_loss(pred, target, w)) == pytest.approx(1.0)
    assert float(rwr_loss(pred, target, w, prior_pred, prior_target, prior_weight=0.5)) == pytest.approx(1.0 + 0.5 * 4.0)


def test_draft_loss_gradient_is_minus_scale_over_batch():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    loss = draft_loss(r, scale=2.0)
    assert loss.item() == pytest.approx(-5.0)
    loss.backward()
    torch.testing.assert_close(r.grad, torch.full((4,), -0.5))


def test_refl_loss_is_a_hinge_below_the_target():
    r = torch.tensor([1.0, 2.5, 0.0], requires_grad=True)
    loss = refl_loss(r, target=2.0, scale=1e-3)
    assert loss.item() == pytest.approx((1.0 + 0.0 + 2.0) / 3 * 1e-3)
    loss.backward()
    torch.testing.assert_close(r.grad, torch.tensor([-1e-3 / 3, 0.0, -1e-3 / 3]))


def test_anchor_l2_treats_the_base_as_constant():
    pred = torch.tensor([[1.0, 3.0]], requires_grad=True)
    base = torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss = anchor_l2(pred, base)
    assert loss.item() == pytest.approx((1 + 4) / 2)
    loss.backward()
    torch.testing.assert_close(pred.grad, torch.tensor([[1.0, 2.0]]))
    assert base.grad is None


def test_errors_teach():
    r = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="mode must be one of"):
        rwr_weights(r, mode="rank")
    with pytest.raises(ValueError, match="temperature must be > 0; got 0"):
        rwr_weights(r, temperature=0)
    with pytest.raises(ValueError, match=r"rewards must be a non-empty \(B,\) tensor"):
        rwr_weights(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="clip must be > 0"):
        rwr_weights(r, mode="exp", clip=0.0)
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="same shape"):
        rwr_loss(x, torch.zeros(2, 1, 2, 3), r)
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
        rwr_loss(x, x, torch.ones(3))
    with pytest.raises(ValueError, match="needs prior_pred and prior_target"):
        rwr_loss(x, x, r, prior_weight=1.0)
    with pytest.raises(ValueError, match="prior_weight must be >= 0"):
        rwr_loss(x, x, r, x, x, prior_weight=-1.0)


def test_topk_weights_keep_the_best_fraction_at_mean_one():
    r = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.8, 0.0])
    w = rwr_weights(r, mode="topk", top_fraction=0.25)
    # ceil(0.25 * 8) = 2 kept: the rewards 0.9 and 0.8, each weighing 8 / 2.
    torch.testing.assert_close(w, torch.tensor([0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.0]))
    assert float(w.mean()) == pytest.approx(1.0)
    # A fraction that does not divide the batch rounds the kept count up; 1.0 is uniform.
    assert int((rwr_weights(r, mode="topk", top_fraction=0.3) > 0).sum()) == 3
    torch.testing.assert_close(rwr_weights(r, mode="topk", top_fraction=1.0), torch.ones(8))
    with pytest.raises(ValueError, match="top_fraction must be in"):
        rwr_weights(r, mode="topk", top_fraction=0.0)
