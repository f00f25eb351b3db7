"""The judge end to end on a tiny random LLaVA (saved, loaded back through the local backend)."""

import pytest
import torch

import reward_plugins as rp
from reward_plugins.judge import TEMPLATE_TYPES, Backend, BackendError, Completion, ImageScores, Judge, make_backend
from reward_plugins.judge.backends.local import LocalBackend
from reward_plugins.judge.tiny import save_tiny_vlm
from reward_plugins.rewards.mllm_judge import MLLMJudgeReward
from reward_plugins.testing import random_images

PROMPTS = {"prompt": "a castle on a hill, artstation, 4k", "annotation": "two red apples on a table"}


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


def _request(judge, name, images):
    if name.startswith("prompt_"):
        return judge.request(name, PROMPTS["prompt"])
    if name.startswith("captioning_"):
        return judge.request(name, images=images[0])
    return judge.request(name, PROMPTS["annotation"], list(images))


def test_every_template_end_to_end(vlm_dir):
    images = random_images(3, 40, 48)
    judge = Judge(make_backend("local", model=str(vlm_dir), constrained=True), max_retries=1, max_new_tokens=150)
    assert type(judge.backend.model).__name__ == "LlavaForConditionalGeneration"
    reqs = [_request(judge, name, images) for name in TEMPLATE_TYPES]
    outs = judge.run(reqs)
    assert [o.template for o in outs] == list(TEMPLATE_TYPES)
    for o in outs:
        assert o.prompt_tokens > 0 and o.completion_tokens > 0 and o.raw
        if o.template.startswith("annotation_"):
            # Constrained to the format: the random model's digits, always readable.
            assert o.ok and o.attempts == 1, o.error
            assert isinstance(o.result, ImageScores) and len(o.result.scores) == 3
            assert all(0 <= s <= 100 for s in o.result.scores)
        else:
            # A random model's free text is noise: bounded retries, then a recorded failure with the raw text.
            assert not o.ok and o.attempts == 2 and len(o.raw) == 2
            assert o.error.startswith("unparseable answer") and o.result is None


def test_batched_equals_one_at_a_time(vlm_dir):
    images = random_images(4, 32, 32, seed=3)
    batched = LocalBackend(str(vlm_dir), batch_size=4, constrained=True)
    single = LocalBackend(str(vlm_dir), batch_size=1, constrained=True)
    judge = Judge(batched, max_retries=0)
    reqs = [judge.request("annotation_aesthetic", p, list(images[: i + 1]))
            for i, p in enumerate(["a cat", "a red car on a street", "a bowl of soup", "snowy mountains at dawn"])]
    a = batched.generate(reqs, 150)
    b = single.generate(reqs, 150)
    assert [c.text for c in a] == [c.text for c in b]
    assert [c.completion_tokens for c in a] == [c.completion_tokens for c in b]


def test_too_many_images_for_the_backend(vlm_dir):
    judge = Judge(LocalBackend(str(vlm_dir), max_images=2))
    with pytest.raises(ValueError, match="has 3 images but backend local:.* accepts at most 2"):
        judge.request("annotation_alignment", "a cat", list(random_images(3, 16, 16)))
    with pytest.raises(ValueError, match="max_images_per_request=4 is more than backend"):
        MLLMJudgeReward(judge, max_images_per_request=4)


def test_unknown_backend_and_missing_vllm():
    with pytest.raises(ValueError, match="Did you mean 'http'"):
        make_backend("htp", base_url="http://x")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match="needs the vllm package"):
            make_backend("vllm", model="some/model")


def test_reward_listwise_and_per_image():
    reward = rp.create_reward("mllm-judge-tiny", max_images_per_request=2)
    assert not reward.is_differentiable and reward.dimensions == ("alignment", "aesthetic", "fidelity")
    images = random_images(5, 32, 32, seed=4)
    prompts = ["a cat", "a dog", "a cat", "a cat", "a dog"]
    out = reward.score(images, prompts)
    assert torch.isfinite(out.scores).all() and set(out.per_dim) == {"alignment", "aesthetic", "fidelity"}
    # List-wise: cat images (0, 2, 3) split 2 + 1, dog images (1, 4) together: 3 requests per dimension.
    assert reward.cost.requests == 9 and reward.cost.failures == 0
    one = rp.create_reward("mllm-judge-tiny:fidelity", dimensions=["fidelity"], listwise=False)
    assert one.dimensions == ("fidelity",)
    o = one.score(images, prompts)
    assert one.cost.requests == 5 and tuple(o.per_dim) == ("fidelity",)
    torch.testing.assert_close(o.scores, o.per_dim["fidelity"])


def test_reward_failure_is_raised_or_nan_never_zero(vlm_dir):
    # Unconstrained random text never parses.
    judge = Judge(LocalBackend(str(vlm_dir)), max_retries=1, max_new_tokens=8)
    images = random_images(2, 32, 32)
    with pytest.raises(RuntimeError, match="could not score 1 request.*after 2 attempt"):
        MLLMJudgeReward(judge, ["aesthetic"])(images, ["a cat", "a cat"])
    reward = MLLMJudgeReward(judge, ["aesthetic"], on_failure="nan")
    out = reward(images, ["a cat", "a cat"])
    assert torch.isnan(out.scores).all() and len(reward.failures) == 1 and reward.failures[0].raw


class _Fixed(Backend):
    """A served judge stand-in: answers every annotation with fixed scores (placement test only)."""

    name, max_images = "fixed", 8

    def generate(self, requests, max_new_tokens, temperature=0.0):
        return [Completion("{" + ",".join(f'"image_{k}": {{"{r.answer_key}": {10 * k}}}' for k in
                                          range(1, r.num_images + 1)) + "}", 1, 1) for r in requests]


def test_weightless_judge_follows_to_device():
    r = MLLMJudgeReward(Judge(_Fixed()), ["aesthetic"])
    assert r.device == torch.device("cpu") and not list(r.parameters())
    assert MLLMJudgeReward(Judge(_Fixed()), ["aesthetic"]).to("meta").device == torch.device("meta")
    out = r(random_images(3, 16, 16), ["a", "a", "b"])
    assert out.scores.tolist() == [10.0, 20.0, 10.0]  # list-wise: image k of a prompt's request gets 10 k


def test_vllm_backend_glue(monkeypatch):
    """The vLLM adapter's calls, against a stand-in `vllm` module (real vLLM needs a GPU machine)."""
    import sys
    import types

    calls = {}

    class LLM:
        def __init__(self, model, **kw):
            calls["init"] = (model, kw)

        def chat(self, conversations, params, use_tqdm=False):
            calls["chat"] = (conversations, params)
            out = types.SimpleNamespace(text='{"image_1": {"alignment": 42}}', token_ids=[1, 2, 3])
            return [types.SimpleNamespace(outputs=[out], prompt_token_ids=[0] * 7) for _ in conversations]

    class SamplingParams:
        def __init__(self, max_tokens, temperature):
            self.max_tokens, self.temperature = max_tokens, temperature

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    judge = Judge("vllm", backend_options={"model": "mistralai/Pixtral-12B-2409", "tokenizer_mode": "mistral"})
    assert calls["init"] == ("mistralai/Pixtral-12B-2409", {"tokenizer_mode": "mistral", "limit_mm_per_prompt": {"image": 8}})
    req = judge.request("annotation_alignment", "a cat", [random_images(1, 16, 16)[0]])
    [o] = judge.run([req])
    assert o.ok and o.result.scores == [42.0] and (o.prompt_tokens, o.completion_tokens) == (7, 3)
    conversations, params = calls["chat"]
    assert conversations == [req.messages] and params.temperature == 0.0 and params.max_tokens == 64


def test_in_best_of_n_and_pair_mining(tmp_path):
    """The judge as any other reward: best-of-N reranking and mined pairs (tiny SD pipeline)."""
    from alignment.best_of_n import best_of_n
    from alignment.pairs import mine_pairs
    from alignment.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    reward = rp.create_reward("mllm-judge-tiny", dimensions=["aesthetic"])
    res = best_of_n(pipe, ["a cat", "a dog"], reward, 3, num_inference_steps=2, batch_size=3)
    assert res.scores.shape == (2, 3) and torch.isfinite(res.scores).all()
    assert reward.cost.requests == 2  # one list-wise request of three images per prompt
    pairs = mine_pairs(pipe, ["a cat", "a dog"], reward, 3, tmp_path / "pairs", num_inference_steps=2, batch_size=3)
    assert pairs.num_prompts == 2 and pairs.num_pairs <= 2


@pytest.mark.parametrize("faithful", [True, False])
def test_official_templates_end_to_end(vlm_dir, tmp_path, faithful):
    from judge_helpers import official_layout

    path = official_layout(tmp_path / "annoutils.py")
    judge = Judge(LocalBackend(str(vlm_dir), constrained=True), path, faithful=faithful, max_retries=0)
    req = judge.request("annotation_aesthetic", "a cat", list(random_images(2, 32, 32)))
    system = req.messages[0]["content"]
    assert ("**NUM**" in system) == faithful and ("**2**" in system) != faithful
    [o] = judge.run([req])
    key = "alignment" if faithful else "aesthetic"  # what the (faithful: official) format asked for
    assert o.ok and o.raw[0].startswith(f'{{"image_1":{{"{key}":') and o.result.key == key
    assert o.result.dimension == "aesthetic" and len(o.result.scores) == 2
