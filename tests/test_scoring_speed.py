"""The speed paths of the CLIP-similarity rewards change no result: text ids trimmed after EOT, and the
image tower compiled in place (the code path; the eager backend stands in for inductor on CPU)."""

import pytest
import torch
import torch.nn.functional as F

import reward_plugins as rp
from reward_plugins.clip_backbone import text_embeds
from reward_plugins.testing import random_images
from reward_plugins.tokenization import clip_token_ids, tiny_clip_tokenizer, trim_after_eot

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a cat", "the dog of the hat on a cat", "a dog"]


def test_trim_after_eot_keeps_up_to_the_longest_prompt():
    tok = tiny_clip_tokenizer()
    ids = clip_token_ids(tok, PROMPTS)
    trimmed = trim_after_eot(ids, tok.eos_token_id)
    longest = max(len(tok(p)["input_ids"]) for p in PROMPTS)
    assert trimmed.shape == (3, longest) and torch.equal(trimmed, ids[:, :longest])
    no_eot = clip_token_ids(tok, ["a cat of the dog " * 30], truncation="torchmetrics")
    assert trim_after_eot(no_eot, tok.eos_token_id).shape[-1] == 77  # a row without EOT is never cut


def test_trimmed_text_embeddings_equal_the_77_token_ones():
    reward = rp.create_reward("pickscore-tiny")
    full = F.normalize(text_embeds(reward.model, clip_token_ids(reward.tokenizer, PROMPTS)), dim=-1)
    torch.testing.assert_close(reward.encode_prompts(PROMPTS), full, rtol=1e-5, atol=1e-6)


def test_compiled_image_tower_keeps_names_scores_and_gradients():
    images = random_images(2, 64, 80, seed=2)
    reward = rp.create_reward("pickscore-tiny")
    before = reward.score(images, PROMPTS[:2]).scores
    keys = list(reward.state_dict())
    assert reward.compile_image_tower(backend="eager") is reward
    assert list(reward.state_dict()) == keys
    x = images.clone().requires_grad_(True)
    out = reward(x, PROMPTS[:2]).scores
    torch.testing.assert_close(out.detach(), before)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_half_precision_images_are_resized_in_float32():
    from reward_plugins.preprocess import ImageTransform

    x = random_images(2, 96, 128, seed=4).bfloat16()
    for mode in ("crop", "letterbox", "square"):
        t = ImageTransform(64, mode)
        out = t(x)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, t(x.float()).bfloat16())  # float32 arithmetic, one rounding at the end
