"""Parsing hand-written answers: well-formed, wrapped, malformed and incomplete."""

import math

import pytest

from reward_plugins.judge import (
    AnswerError,
    Caption,
    Category,
    ImageDescription,
    ImageScores,
    NSFWVerdict,
    PromptParts,
    extract_json,
    parse_answer,
)


@pytest.mark.parametrize("text", [
    '{"image_1": {"aesthetic": 71}, "image_2": {"aesthetic": 40.5}}',
    '```json\n{"image_1": {"aesthetic": 71}, "image_2": {"aesthetic": 40.5}}\n```',
    'Here is my evaluation:\n{"image_1": {"aesthetic": "71"},\n "image_2": {"aesthetic": 40.5}}\nThanks!',
    '{"image_1": 71, "image_2": 40.5}',
    '{"Image 1": {"aesthetic": 71}, "Image 2": {"aesthetic": "40.5/100"}}',
])
def test_scores_well_formed_and_wrapped(text):
    assert parse_answer("annotation_aesthetic", text, num_images=2) == ImageScores("aesthetic", [71.0, 40.5], "aesthetic" if "aesthetic" in text else "")


def test_scores_official_alignment_key():
    # The official aesthetic/fidelity formats ask for "alignment": read from the key that was asked.
    out = parse_answer("annotation_fidelity", '{"image_1": {"alignment": 88}}', 1, answer_key="alignment")
    assert out.scores == [88.0] and out.key == "alignment" and out.dimension == "fidelity"
    # Asked for "fidelity" but the model answered under another single key: still its one score, key recorded.
    assert parse_answer("annotation_fidelity", '{"image_1": {"alignment": 88}}', 1).key == "alignment"


@pytest.mark.parametrize("text, reason", [
    ("I think the images are nice.", "no JSON object"),
    ('{"image_1": {"aesthetic": 71}', "no score for image_1"),       # truncated: only the inner object reads
    ('{"image_1": {"aesthetic": 71}}', "no score for image_2"),        # incomplete
    ('{"image_1": {"aesthetic": "high"}, "image_2": {"aesthetic": 3}}', "no numeric 'aesthetic'"),
    ('{"image_1": {"aesthetic": 171}, "image_2": {"aesthetic": 3}}', "outside 0-100"),
    ('{"image_1": {"aesthetic": -5}, "image_2": {"aesthetic": 3}}', "outside 0-100"),
    ('{"image_1": {"a": 1, "b": 2}, "image_2": {"aesthetic": 3}}', "no numeric"),
    ('{"image_1": {"aesthetic": true}, "image_2": {"aesthetic": 3}}', "no numeric"),
])
def test_scores_malformed(text, reason):
    with pytest.raises(AnswerError, match=reason) as e:
        parse_answer("annotation_aesthetic", text, num_images=2)
    assert e.value.raw == text


def test_prompt_answers():
    parts = parse_answer("prompt_processing", '```\n{"image_content": "a castle on a hill", "magic_words": ["4k", '
                         '"artstation"], "artistic_style": ["oil painting"], "visual_properties": []}\n```')
    assert parts == PromptParts("a castle on a hill", ["4k", "artstation"], ["oil painting"], [])
    assert parse_answer("prompt_NSFW_filtering", '{"NSFW Detected": false}') == NSFWVerdict(False)
    assert parse_answer("prompt_NSFW_filtering", "Answer: {'NSFW Detected': True}".replace("'", '"')) == NSFWVerdict(True)
    assert parse_answer("prompt_NSFW_filtering", '{"NSFW Detected": True}') == NSFWVerdict(True)  # Python style
    assert parse_answer("prompt_classification", '{"category": "animals and plants"}') == Category("Animals & Plants")
    assert parse_answer("captioning_coco_image", '{"prompt": " a dog on a beach "}') == Caption("a dog on a beach")
    d = parse_answer("captioning_aes_image", '{"image_content": "x", "artistic_style": "y", "visual_properties": "z"}')
    assert d == ImageDescription("x", "y", "z")


@pytest.mark.parametrize("template, text, reason", [
    ("prompt_processing", '{"image_content": "x", "magic_words": "4k", "artistic_style": [1]}', "non-list 'artistic_style'"),
    ("prompt_NSFW_filtering", '{"NSFW Detected": "maybe"}', "boolean 'NSFW Detected'"),
    ("prompt_classification", '{"category": "Vehicles"}', "not one of"),
    ("captioning_coco_image", '{"caption": "a dog"}', "'prompt'"),
])
def test_prompt_answers_malformed(template, text, reason):
    with pytest.raises(AnswerError, match=reason):
        parse_answer(template, text)


def test_extract_json_first_object_and_errors():
    assert extract_json('noise {"a": 1} more {"b": 2}') == {"a": 1}
    assert extract_json('[1, 2] then {"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}
    with pytest.raises(AnswerError):
        extract_json("")
    with pytest.raises(ValueError, match="unknown template type"):
        parse_answer("annotation_beauty", "{}")
    assert not math.isnan(parse_answer("annotation_alignment", '{"image_1": {"alignment": 0}}', 1).scores[0])
