"""Diffusion-DPO loss (alignment.losses section 1) against values computed by hand."""

import math

import pytest
import torch

from alignment.losses import diffusion_dpo_loss, guided_denoising_error, per_sample_mse

MW, ML = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.10])
RW, RL = torch.tensor([0.15, 0.20]), torch.tensor([0.15, 0.20])
BETA = 10.0
# logits = -(beta/2) * ((mw - ml) - (rw - rl)):
#   pair 0: -5 * ((0.1 - 0.2) - 0) = 0.5      pair 1: -5 * ((0.3 - 0.1) - 0) = -1.0
LOGITS = [0.5, -1.0]


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize(
    "loss_type,expected",
    [
        ("sigmoid", sum(-math.log(_sigmoid(z)) for z in LOGITS) / 2),
        ("hinge", sum(max(0.0, 1 - z) for z in LOGITS) / 2),  # (0.5 + 2.0) / 2
        # IPO on the unscaled log-ratio difference h = logits / beta, times beta^2:
        # beta^2 * ((0.05 - 0.05)^2 + (-0.1 - 0.05)^2) / 2 = ((0.5 - 0.5)^2 + (-1 - 0.5)^2) / 2
        ("ipo", sum(BETA**2 * (z / BETA - 1 / (2 * BETA)) ** 2 for z in LOGITS) / 2),
    ],
)
def test_loss_matches_hand_computed(loss_type, expected):
    loss, m = diffusion_dpo_loss(MW, ML, RW, RL, beta=BETA, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["implicit_acc"].item() == pytest.approx(0.5)
    assert m["reward_margin"].item() == pytest.approx(sum(LOGITS) / 2, rel=1e-5)
    # implicit rewards -(beta/2)(mse - ref): winners 0.25, -0.5; losers -0.25, 0.5
    assert m["reward_w"].item() == pytest.approx((0.25 - 0.5) / 2, abs=1e-6)
    assert m["reward_l"].item() == pytest.approx((-0.25 + 0.5) / 2, abs=1e-6)
    assert m["model_mse"].item() == pytest.approx((0.1 + 0.3 + 0.2 + 0.1) / 4)


def test_hand_values_are_the_expected_numbers():
    # Guard the hand computation itself with literal numbers.
    loss, _ = diffusion_dpo_loss(MW, ML, RW, RL, beta=BETA, loss_type="hinge")
    assert loss.item() == pytest.approx(1.25)
    loss, _ = diffusion_dpo_loss(MW, ML, RW, RL, beta=BETA, loss_type="ipo")
    assert loss.item() == pytest.approx(1.5**2 / 2)


def test_gradient_direction_lowers_winner_error():
    mw, ml = MW.clone().requires_grad_(True), ML.clone().requires_grad_(True)
    loss, _ = diffusion_dpo_loss(mw, ml, RW, RL, beta=BETA)
    loss.backward()
    assert (mw.grad > 0).all() and (ml.grad < 0).all()  # descent lowers mse_w and raises mse_l


def test_reference_gets_no_gradient_and_ties_count_half():
    rw = RW.clone().requires_grad_(True)
    loss, m = diffusion_dpo_loss(RW.clone().requires_grad_(True), RL.clone(), rw, RL, beta=BETA)
    loss.backward()
    assert rw.grad is None
    assert m["implicit_acc"].item() == 0.5  # identical model and reference: logits exactly 0
    assert loss.item() == pytest.approx(math.log(2))


def test_per_sample_mse_is_mean_over_chw_in_float32():
    pred = torch.zeros(2, 4, 3, 3, dtype=torch.bfloat16)
    target = torch.ones(2, 4, 3, 3)
    target[1] *= 2
    out = per_sample_mse(pred, target)
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="same shape"):
        per_sample_mse(pred, target[:1])


def test_bad_arguments_teach():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        diffusion_dpo_loss(MW, ML, RW, RL, beta=BETA, loss_type="logistic")
    with pytest.raises(ValueError, match="beta must be a positive number"):
        diffusion_dpo_loss(MW, ML, RW, RL, beta=0)
    with pytest.raises(ValueError, match="must be 1-D"):
        diffusion_dpo_loss(MW[None], ML, RW, RL, beta=BETA)
    with pytest.raises(ValueError, match="same length"):
        diffusion_dpo_loss(MW, ML[:1], RW, RL, beta=BETA)
    with pytest.raises(TypeError, match="torch.Tensor"):
        diffusion_dpo_loss([0.1], ML, RW, RL, beta=BETA)


def _ipo_grads(margin_logits: float, beta: float) -> tuple[float, float]:
    """d loss / d mse_w and d loss / d mse_l for one pair whose logits are `margin_logits` (reference tied)."""
    # logits = -(beta/2) * (mw - ml) with ref_w == ref_l, so mw - ml = -2 * margin / beta.
    mw = torch.tensor([1e-3], requires_grad=True)
    ml = (mw.detach() + 2 * margin_logits / beta).requires_grad_(True)
    ref = torch.tensor([0.1])
    loss, m = diffusion_dpo_loss(mw, ml, ref, ref, beta=beta, loss_type="ipo")
    assert m["reward_margin"].item() == pytest.approx(margin_logits, rel=1e-3)
    loss.backward()
    return mw.grad.item(), ml.grad.item()


@pytest.mark.parametrize("margin", [0.0025, 0.01, 0.1, 0.3])
def test_ipo_lowers_the_winners_error_at_a_small_positive_margin_at_beta_5000(margin):
    # The documented beta. A pair the model already prefers slightly must still be pushed further: descent
    # (minus the gradient) lowers the winner's error and raises the loser's.
    gw, gl = _ipo_grads(margin, beta=5000.0)
    assert gw > 0 and gl < 0


def test_ipo_optimum_is_half_in_logit_units():
    # IPO's target 1/(2 beta) on h = logits / beta: the loss is flat at logits = 1/2 and pushes back beyond it.
    gw, _ = _ipo_grads(0.5, beta=5000.0)
    assert gw == pytest.approx(0.0, abs=1e-12)
    gw, _ = _ipo_grads(0.8, beta=5000.0)
    assert gw < 0
    for beta in (10.0, 2500.0, 5000.0):
        losses = {z: diffusion_dpo_loss(torch.tensor([-2 * z / beta]), torch.tensor([0.0]), torch.tensor([0.0]),
                                        torch.tensor([0.0]), beta=beta, loss_type="ipo")[0].item()
                  for z in (0.3, 0.5, 0.7)}
        assert losses[0.5] == pytest.approx(0.0, abs=1e-12) and losses[0.3] > 0 and losses[0.7] > 0


@pytest.mark.parametrize("beta", [2500.0, 5000.0])
def test_ipo_gradients_are_on_the_sigmoid_scale(beta):
    # Unscaled, IPO's gradient at logits = 0 is 1/(2 beta) of d(logits)/d(mse) / beta: 1e-7 of sigmoid's at
    # beta = 5000, small enough for Adam's eps = 1e-8 to shrink the LoRA updates (toy world: grad norm ~1e-5).
    grads = {}
    for lt in ("sigmoid", "ipo"):
        mw = torch.tensor([0.1], requires_grad=True)
        diffusion_dpo_loss(mw, torch.tensor([0.1]), torch.tensor([0.1]), torch.tensor([0.1]), beta=beta,
                           loss_type=lt)[0].backward()
        grads[lt] = mw.grad.item()
    # d/d mse_w at logits 0: sigmoid 0.5 * beta/2, IPO 2 * 0.5 * beta/2.
    assert grads["sigmoid"] == pytest.approx(beta / 4)
    assert grads["ipo"] == pytest.approx(beta / 2)


def test_ipo_adam_step_is_not_shrunk_by_epsilon():
    # One Adam step on a parameter that sets the winner's error: it moves by ~lr (Adam's sign-like first
    # step), not by a fraction of lr as when the gradient is comparable to eps.
    theta = torch.nn.Parameter(torch.tensor([0.0]))
    opt = torch.optim.Adam([theta], lr=1e-3, eps=1e-8)
    scale = 1e-6  # d mse_w / d theta, as small as a LoRA parameter's share of the error
    mw = 0.1 + scale * theta
    loss, _ = diffusion_dpo_loss(mw, torch.tensor([0.1]), torch.tensor([0.1]), torch.tensor([0.1]), beta=5000.0,
                                 loss_type="ipo")
    loss.backward()
    opt.step()
    assert theta.item() == pytest.approx(-1e-3, rel=0.05)


def test_guided_error_is_the_cfg_product_and_counts_a_shared_change_once():
    c, u = torch.tensor([0.2, 0.4]), torch.tensor([0.3, 0.1])
    assert torch.allclose(guided_denoising_error(c, u, 7.0), torch.tensor([7 * 0.2 - 6 * 0.3, 7 * 0.4 - 6 * 0.1]))
    assert torch.equal(guided_denoising_error(c, u, 1.0), c)  # w = 1: the paper's conditional error
    # A change d of both branches (caption-independent) moves the guided error by d; of the conditional
    # branch alone (the caption's effect) by w·d: the CFG sampler's weighting.
    d = torch.tensor([0.01, 0.01])
    shared = guided_denoising_error(c + d, u + d, 7.0) - guided_denoising_error(c, u, 7.0)
    cond_only = guided_denoising_error(c + d, u, 7.0) - guided_denoising_error(c, u, 7.0)
    assert torch.allclose(shared, d, atol=1e-6) and torch.allclose(cond_only, 7 * d, atol=1e-6)


@pytest.mark.parametrize("w", [0.5, True, "7", float("nan")])
def test_guided_error_refuses_bad_scales(w):
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 1"):
        guided_denoising_error(torch.zeros(2), torch.zeros(2), w)
    with pytest.raises(ValueError, match="one shape"):
        guided_denoising_error(torch.zeros(2), torch.zeros(3), 7.0)
