"""Templates as data, requests in OpenAI form, and the official-file loader (ast, never executed)."""

import base64
import io

import pytest
from judge_helpers import official_layout
from PIL import Image

from reward_plugins.judge import TEMPLATE_TYPES, build_request, load_templates
from reward_plugins.judge.official import read_official_file
from reward_plugins.judge.templates import check_template_type
from reward_plugins.testing import random_images


def test_eight_types_with_scales_and_formats():
    ts = load_templates()
    assert list(ts) == list(TEMPLATE_TYPES) and len(ts) == 8
    for dim in ("alignment", "aesthetic", "fidelity"):
        t = ts[f"annotation_{dim}"]
        text = t.system_text(3)
        assert "There are 3 images" in text and "{num_images}" not in text
        assert f'"image_1": {{"{dim}": <score>}}' in text
        for band in ("90-100", "70-89", "50-69", "30-49", "0-29"):
            assert band in text
    assert '"NSFW Detected"' in ts["prompt_NSFW_filtering"].system
    for cat in ("Abstract & Artistic", "Animals & Plants", "Characters", "Objects & Food", "Scenes"):
        assert cat in ts["prompt_classification"].system


def test_unknown_template_did_you_mean():
    with pytest.raises(ValueError, match="Did you mean 'annotation_aesthetic'"):
        check_template_type("annotation_aesthetics")
    with pytest.raises(ValueError, match="Did you mean 'prompt_NSFW_filtering'"):
        load_templates()["prompt-nsfw-filtering"]


def test_requests_in_openai_form():
    ts = load_templates()
    imgs = random_images(2, 24, 32)
    req = build_request(ts["annotation_alignment"], "a red fox", list(imgs))
    system, user = req.messages
    assert system == {"role": "system", "content": ts["annotation_alignment"].system_text(2)}
    kinds = [c["type"] for c in user["content"]]
    assert kinds == ["text", "text", "image_url", "text", "image_url"]
    assert user["content"][0]["text"] == "Input: a red fox\n"
    assert [user["content"][i]["text"] for i in (1, 3)] == ["\nImage 1:\n", "\nImage 2:\n"]
    url = user["content"][2]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (32, 24)
    assert req.num_images == 2 and req.key == build_request(ts["annotation_alignment"], "a red fox", list(imgs)).key
    assert req.key != build_request(ts["annotation_alignment"], "a red fix", list(imgs)).key
    p = build_request(ts["prompt_processing"], "a cat, 4k")
    assert p.messages[1] == {"role": "user", "content": "a cat, 4k"}
    c = build_request(ts["captioning_aes_image"], images=imgs[0])
    assert [x["type"] for x in c.messages[1]["content"]] == ["text", "image_url"]


def test_bad_requests():
    ts = load_templates()
    img = random_images(1, 16, 16)[0]
    with pytest.raises(ValueError, match="reads a prompt only; got 1 image"):
        build_request(ts["prompt_classification"], "a cat", [img])
    with pytest.raises(ValueError, match="exactly one image; got 2"):
        build_request(ts["captioning_coco_image"], images=[img, img])
    with pytest.raises(ValueError, match="got no images"):
        build_request(ts["annotation_fidelity"], "a cat", [])
    with pytest.raises(ValueError, match="non-empty prompt"):
        build_request(ts["annotation_fidelity"], "", [img])


def test_official_file_faithful_and_corrected(tmp_path):
    path = official_layout(tmp_path / "annoutils.py")
    texts, quirks = read_official_file(path)
    assert quirks.placeholder_unfilled
    assert quirks.asked_keys == {"annotation_alignment": "alignment", "annotation_aesthetic": "alignment",
                                 "annotation_fidelity": "alignment"}
    assert quirks.input_format == "## Input: {prompt}\n"
    with pytest.raises(ValueError, match="choose faithful=True"):
        load_templates(path)
    faithful = load_templates(path, faithful=True)
    assert faithful.quirks == quirks and faithful.faithful is True
    t = faithful["annotation_aesthetic"]
    assert t.system_text(4) == texts["annotation_aesthetic"]  # exactly the file's text: NUM left in
    assert "**NUM**" in t.system_text(4) and t.answer_key == "alignment"
    img = random_images(1, 16, 16)[0]
    req = build_request(t, "a cat", [img])
    assert req.messages[1]["content"][0]["text"] == "## Input: a cat\n"
    assert build_request(faithful["captioning_coco_image"], images=img).messages[1]["content"][0]["text"] == "\nImage :\n"
    fixed = load_templates(path, faithful=False)["annotation_aesthetic"]
    assert "You have **4** images" in fixed.system_text(4)
    assert '{"aesthetic":' in fixed.system and '"alignment"' not in fixed.system
    assert fixed.answer_key == "aesthetic" and fixed.notes


def test_official_file_is_never_executed(tmp_path):
    marker = tmp_path / "ran"
    # Code at module level: parsed, never run; the templates still load.
    path = official_layout(tmp_path / "a.py", header=f"open({str(marker)!r}, 'w').write('x')\nimport os\nos.system('touch {marker}')")
    assert len(load_templates(path, faithful=True)) == 8
    assert not marker.exists()
    # Code inside the template dictionary: refused, and not run either.
    hostile = f"    'prompt_processing': {{'role': 'system', 'content': __import__('os').system('touch {marker}')}},"
    path2 = official_layout(tmp_path / "b.py", entry_override=hostile)
    with pytest.raises(ValueError, match="other than plain literals"):
        load_templates(path2, faithful=True)
    assert not marker.exists()


def test_official_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="RL2065/LePref"):
        load_templates(tmp_path / "missing.py", faithful=True)
    (tmp_path / "x.py").write_text("template_dict = {'prompt_processing': {'role': 'system', 'content': 'x'}}\n")
    with pytest.raises(ValueError, match="no 'prompt_NSFW_filtering' entry"):
        load_templates(tmp_path / "x.py", faithful=True)
    (tmp_path / "y.py").write_text("def broken(:\n")
    with pytest.raises(ValueError, match="not valid Python"):
        load_templates(tmp_path / "y.py", faithful=False)
