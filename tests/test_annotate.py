"""`reward-align annotate`: prompts -> JSONL, image sets -> scores -> pairs parquet; resume after a kill."""

import json

import pyarrow.parquet as pq
import pytest

from alignment.annotation import ANNOTATIONS, annotate_image_sets, annotate_prompts, read_image_sets, read_log
from alignment.cli import main
from alignment.pairs import _schema
from reward_plugins.judge import Backend, Judge
from reward_plugins.judge.backends.local import LocalBackend
from reward_plugins.judge.tiny import save_tiny_vlm
from reward_plugins.preprocess import tensor_to_pil
from reward_plugins.testing import random_images

PROMPTS = ["a cat on a sofa", "a red car on a street", "two dogs in the snow", "a bowl of soup", "a castle at night"]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("annotate_vlm"))


class Counting(Backend):
    """Counts the requests it forwards; raises after `crash_after` of them (a killed run)."""

    def __init__(self, inner, crash_after=None):
        self.inner, self.crash_after, self.sent = inner, crash_after, []
        self.name, self.max_images = inner.name, inner.max_images

    def generate(self, requests, max_new_tokens, temperature=0.0):
        if self.crash_after is not None and len(self.sent) + len(requests) > self.crash_after:
            raise KeyboardInterrupt("killed")
        self.sent += [r.key for r in requests]
        return self.inner.generate(requests, max_new_tokens, temperature)


def test_prompts_resume_after_kill_without_repeats_or_losses(vlm_dir, tmp_path):
    local = LocalBackend(str(vlm_dir))
    out = tmp_path / "run"
    crashing = Counting(local, crash_after=6)
    with pytest.raises(KeyboardInterrupt):
        annotate_prompts(Judge(crashing, max_retries=0, max_new_tokens=6), PROMPTS, out, chunk=3)
    assert len(read_log(out / ANNOTATIONS)) == 6  # two chunks of three written before the kill
    with open(out / ANNOTATIONS, "a") as f:
        f.write('{"key": "torn li')  # a line cut by the kill
    resumed = Counting(local)
    res = annotate_prompts(Judge(resumed, max_retries=0, max_new_tokens=6), PROMPTS, out, chunk=3)
    assert len(resumed.sent) == 15 - 6 and not set(resumed.sent) & set(crashing.sent)
    lines = (out / ANNOTATIONS).read_text().splitlines()
    assert len(lines) == 15 and len({json.loads(ln)["key"] for ln in lines}) == 15
    assert res.cost.requests == 15 and res.cost.failures == 15  # random text: recorded failures, raw kept
    assert all(r["raw"] and r["error"].startswith("unparseable") for r in res.records)
    assert {r["template"] for r in res.records} == {"prompt_processing", "prompt_NSFW_filtering", "prompt_classification"}
    again = Counting(local)
    assert annotate_prompts(Judge(again, max_retries=0, max_new_tokens=6), PROMPTS, out).new_requests == 0
    assert again.sent == []
    retry = Counting(local)
    annotate_prompts(Judge(retry, max_retries=0, max_new_tokens=6), PROMPTS, out, retry_failed=True)
    assert len(retry.sent) == 15
    with pytest.raises(ValueError, match="holds a run with other settings"):
        annotate_prompts(Judge(local, max_retries=0), PROMPTS[:2], out)


def _image_manifest(tmp_path, n_sets=2, n=3):
    lines = []
    for s in range(n_sets):
        paths = []
        for j, img in enumerate(random_images(n, 32, 32, seed=10 + s)):
            p = tmp_path / f"p{s}_{j}.png"
            tensor_to_pil(img).save(p)
            paths.append(p.name)
        lines.append(json.dumps({"prompt": PROMPTS[s], "images": paths, "seeds": [100 + j for j in range(n)]}))
    (tmp_path / "sets.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "sets.jsonl"


def test_images_to_pairs_in_pairs_format(vlm_dir, tmp_path):
    sets = read_image_sets(_image_manifest(tmp_path))
    judge = Judge(LocalBackend(str(vlm_dir), constrained=True), max_retries=0)
    res = annotate_image_sets(judge, sets, tmp_path / "out", max_images_per_request=2, rule="each")
    # 2 sets x 3 dimensions x (2 + 1 images per request)
    assert res.cost.requests == 12 and res.cost.failures == 0
    assert sorted(f.parent.parent.name for f in res.pairs_files) == ["aesthetic", "alignment", "fidelity"]
    for f in res.pairs_files:
        t = pq.read_table(f)
        assert t.schema.equals(_schema(["alignment", "aesthetic", "fidelity"]))
        dim = f.parent.parent.name
        for r in t.to_pylist():
            assert r["label_0"] == 1.0 and r["score_0"] > r["score_1"] and r["seed_0"] >= 100
            assert r["score_0"] == r[f"score_{dim}_0"] and r["jpg_0"][:4] == b"\x89PNG"
    # The pairs come from the logged scores: a resumed run sends nothing and writes the same pairs.
    again = annotate_image_sets(judge, sets, tmp_path / "out", max_images_per_request=2, rule="each")
    assert again.new_requests == 0 and again.num_pairs == res.num_pairs


def test_cli_images_and_prompts(vlm_dir, tmp_path, capsys):
    manifest = _image_manifest(tmp_path, n_sets=1)
    rc = main(["annotate", "images", "--images", str(manifest), "--output-dir", str(tmp_path / "o"), "--backend",
               "local", "--model", str(vlm_dir), "--constrained", "--dimensions", "aesthetic", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "1 image sets: 1 requests (1 backend calls)" in out and "0 failed" in out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["requests"] == 1 and summary["pairs"] == 1 and summary["prompt_tokens"] > 0
    rc = main(["annotate", "prompts", "--prompt", "a cat", "--output-dir", str(tmp_path / "p"), "--backend", "local",
               "--model", str(vlm_dir), "--max-new-tokens", "4", "--max-retries", "0", "--no-progress",
               "--backend-option", "batch_size=3"])
    assert rc == 0 and "3 requests" in capsys.readouterr().out


def test_cli_errors_are_one_line(vlm_dir, tmp_path, capsys):
    rc = main(["annotate", "prompts", "--prompt", "a cat", "--output-dir", str(tmp_path / "x"),
               "--base-url", "http://127.0.0.1:9/v1"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot reach the OpenAI-compatible server at http://127.0.0.1:9/v1/models" in err
    assert len(err.strip().splitlines()) == 1
    rc = main(["annotate", "prompts", "--prompt", "a cat", "--output-dir", str(tmp_path / "y"), "--backend", "local",
               "--model", str(vlm_dir), "--template-types", "prompt_clasification"])
    err = capsys.readouterr().err
    assert rc == 1 and "Did you mean 'prompt_classification'" in err and len(err.strip().splitlines()) == 1
    rc = main(["annotate", "prompts", "--prompt", "a cat", "--output-dir", str(tmp_path / "z"), "--backend", "local",
               "--model", str(vlm_dir), "--template-types", "annotation_aesthetic"])
    assert rc == 1 and "not a prompt template" in capsys.readouterr().err
    rc = main(["annotate", "prompts", "--prompt", "a cat", "--output-dir", str(tmp_path / "u"), "--backend", "local",
               "--model", str(vlm_dir), "--backend-option", "batch_size"])
    assert rc == 1 and "--backend-option takes KEY=VALUE" in capsys.readouterr().err
    rc = main(["annotate", "images", "--images", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "w")])
    assert rc == 1 and "no image sets at" in capsys.readouterr().err
    rc = main(["annotate", "prompts", "--prompt", "a cat", "--output-dir", str(tmp_path / "v"), "--backend", "local",
               "--model", str(vlm_dir), "--templates", str(tmp_path / "annoutils.py")])
    err = capsys.readouterr().err
    assert rc == 1 and "--faithful or --corrected" in err and "Loading weights" not in err
    rc = main(["annotate", "prompts", "--prompt", "a cat", "--output-dir", str(tmp_path / "v"), "--backend", "local",
               "--model", str(vlm_dir), "--templates", str(tmp_path / "annoutils.py"), "--faithful"])
    assert rc == 1 and "annoutils.py' not found" in capsys.readouterr().err


def test_best_of_n_dir_as_image_sets(tmp_path):
    (tmp_path / "images").mkdir()
    for j, img in enumerate(random_images(3, 16, 16)):
        tensor_to_pil(img).save(tmp_path / "images" / f"prompt_0000_image_{j:02d}_rank_{3 - j}.png")
    doc = {"prompts": [{"prompt_index": 0, "prompt": "a cat",
                        "images": [{"image_index": j, "seed": 7 + j} for j in range(3)]}]}
    (tmp_path / "scores.json").write_text(json.dumps(doc))
    [s] = read_image_sets(tmp_path)
    assert s.prompt == "a cat" and s.seeds == [7, 8, 9] and s.indices == [0, 1, 2] and len(s.images) == 3
