"""CLIPScore on prompts longer than 77 tokens: our end-token-keeping cut vs torchmetrics' plain cut."""

import pytest
import torch
import torch.nn.functional as F

import reward_plugins as rp
from reward_plugins.testing import random_images
from reward_plugins.tokenization import clip_token_ids, tiny_clip_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = "a cat of the dog " * 30  # far over 77 tokens in the tiny vocabulary
SHORT = "a cat"


def test_keep_eot_truncation_ends_with_eot_and_torchmetrics_does_not():
    tok = tiny_clip_tokenizer()
    full = tok(LONG)["input_ids"]
    assert len(full) > 77
    keep = clip_token_ids(tok, [LONG, SHORT])
    cut = clip_token_ids(tok, [LONG, SHORT], truncation="torchmetrics")
    assert keep[0].tolist() == full[:76] + [tok.eos_token_id]
    assert cut[0].tolist() == full[:77] and cut[0, -1] != tok.eos_token_id
    assert torch.equal(keep[1], cut[1])  # short prompts: both rules give the same padded ids


def reference_torchmetrics_score(reward, images, prompts):
    """torchmetrics' CLIPScore formulation: ids cut at 77, pooled text and image features, 100 * cos."""
    tok, model = reward.tokenizer, reward.model
    rows = [ids[:77] for ids in tok(prompts)["input_ids"]]
    ids = torch.tensor([r + [tok.pad_token_id] * (77 - len(r)) for r in rows])
    txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    img = model.visual_projection(model.vision_model(pixel_values=reward.transform(images)).pooler_output)
    return (100 * F.cosine_similarity(img, txt, dim=-1)).clamp(min=0)


def test_torchmetrics_truncation_reproduces_its_long_prompt_scores():
    images = random_images(2, 96, 80, seed=3)
    prompts = [LONG, SHORT]
    tm = rp.create_reward("clipscore-tiny", truncation="torchmetrics")
    ours = rp.create_reward("clipscore-tiny")
    s_tm, s_ours = tm.score(images, prompts).scores, ours.score(images, prompts).scores
    torch.testing.assert_close(s_tm, reference_torchmetrics_score(tm, images, prompts), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s_tm[1], s_ours[1])  # identical on prompts within 77 tokens
    assert (s_tm[0] - s_ours[0]).abs() > 1e-3  # and the two rules really differ on the long one


def test_unknown_truncation_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="keep_eot.*torchmetrics.*got 'middle'"):
        rp.create_reward("clipscore-tiny", truncation="middle")
