"""MPS at fp16: the default thresholds a float32 statistic; exact=True thresholds it in the towers' dtype,
as the official fp16 evaluation does (0.3 and the ratios rounded to fp16)."""

import pytest
import torch

import reward_plugins as rp
from reward_plugins.clip_backbone import text_tokens_and_embeds
from reward_plugins.testing import random_images
from reward_plugins.tokenization import clip_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a cat", "the dog of the hat", "a cat on a dog"]


def official_fp16_statistic(reward, prompts):
    """The official order of operations, all in the model's dtype: raw dot products of prompt and condition
    tokens, max over condition tokens (the ratio to the max is taken by `masks`)."""
    model, tok = reward.model, reward.tokenizer
    text_f, _ = text_tokens_and_embeds(model, clip_token_ids(tok, prompts))
    cond_f, _ = text_tokens_and_embeds(model, clip_token_ids(tok, list(reward.conditions.values())))
    return torch.matmul(text_f, cond_f[0].transpose(0, 1)).amax(dim=-1)


@pytest.mark.parametrize("exact, want", [(False, torch.float32), (True, torch.float16)])
def test_mask_statistic_dtype(exact, want):
    reward = rp.create_reward("mps-tiny", exact=exact, dtype=torch.float16)
    _, _, stat, _ = reward.encode_prompts(PROMPTS)
    assert stat.dtype == want
    ref = official_fp16_statistic(reward, PROMPTS)
    if exact:
        torch.testing.assert_close(stat, ref, rtol=2e-3, atol=2e-3)
    else:
        torch.testing.assert_close(stat, ref.float(), rtol=5e-3, atol=5e-3)  # fp32 of the same fp16 features
    out = reward(random_images(len(PROMPTS), 64, 64, seed=5), PROMPTS).scores
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_a_ratio_within_fp16_rounding_of_the_threshold_flips():
    """0.30002 > 0.3 in float32, but in fp16 both round to 0.30005 and the token is dropped, as the
    official fp16 run drops it."""
    reward = rp.create_reward("mps-tiny", exact=True)
    stat = torch.tensor([[1.0, 0.30002, 0.5, 0.1]])
    eot = torch.tensor([0])
    assert reward.masks(stat, eot).tolist() == [[True, True, True, False]]
    assert reward.masks(stat.half(), eot).tolist() == [[True, False, True, False]]


def test_exact_fp16_cosine_is_computed_in_fp16_and_default_in_fp32():
    images = random_images(2, 64, 64, seed=6)
    exact = rp.create_reward("mps-tiny", exact=True, dtype=torch.float16)
    default = rp.create_reward("mps-tiny", dtype=torch.float16)
    s_exact, s_default = exact.score(images, PROMPTS[:2]).scores, default.score(images, PROMPTS[:2]).scores
    # Same masks on these prompts, so the two differ only by the rounding of the final cosine.
    torch.testing.assert_close(s_exact, s_default, rtol=2e-2, atol=2e-1)
    unit = torch.nn.functional.normalize
    for reward, scores, dt in ((exact, s_exact, torch.float16), (default, s_default, torch.float32)):
        text_f, text_eos, stat, eot = reward.encode_prompts(PROMPTS[:2])
        img = reward.image_tokens(images)  # forward preprocesses fp32 images and casts the 224 px result
        f = reward.cross_model(img, text_f, reward.masks(stat, eot), exact=reward.exact, first_only=True)[:, 0]
        assert f.dtype == torch.float16  # the head runs in the weights' dtype either way
        cos = (unit(text_eos.to(dt), dim=-1) * unit(f.to(dt), dim=-1)).sum(-1)
        ref = reward.model.logit_scale.to(dt).exp() * cos
        torch.testing.assert_close(scores, ref.float(), rtol=0, atol=0)
