"""The HTTP backend against a real OpenAI-compatible server on loopback (`transformers serve` on the tiny
VLM), with a fault-injecting proxy in front of it for timeouts, 5xx and malformed answers."""

import time

import pytest
from judge_server import FaultProxy

from reward_plugins.judge import BackendError, Judge, make_backend
from reward_plugins.judge.backends.http import HTTPBackend
from reward_plugins.judge.local_server import TransformersServe, free_port
from reward_plugins.judge.tiny import save_tiny_vlm
from reward_plugins.testing import random_images

pytest.importorskip("fastapi", reason="transformers serve needs the serving extra (fastapi, uvicorn)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = save_tiny_vlm(tmp_path_factory.mktemp("served_vlm"))
    server = TransformersServe(model_dir)
    yield model_dir, server
    server.close()


@pytest.fixture(scope="module")
def requests_(served):
    model_dir, server = served
    judge = Judge(make_backend("http", base_url=server.base_url), max_new_tokens=12)
    images = random_images(2, 32, 32)
    return [judge.request("annotation_alignment", "a cat", list(images)),
            judge.request("prompt_classification", "a dog on a beach"),
            judge.request("captioning_coco_image", images=images[1])]


def test_served_model_name_and_same_answers_as_local(served, requests_):
    model_dir, server = served
    http = HTTPBackend(server.base_url)  # model name from GET /models
    assert http.model == str(model_dir)
    local = make_backend("local", model=str(model_dir))
    a = http.generate(requests_, 12)
    b = local.generate(requests_, 12)
    # Same weights, same messages, greedy: the server's text and token counts equal local generation's.
    assert [c.error for c in a] == [None] * 3
    assert [c.text for c in a] == [c.text for c in b]
    assert [(c.prompt_tokens, c.completion_tokens) for c in a] == [(c.prompt_tokens, c.completion_tokens) for c in b]


def test_timeout_5xx_and_malformed_are_retried(served, requests_):
    _, server = served
    direct = HTTPBackend(server.base_url, timeout=60).generate(requests_[:1], 12)[0]
    proxy = FaultProxy(server.base_url, plan=["500", "sleep", "malformed", "nochoices"], sleep=1.5)
    try:
        backend = HTTPBackend(proxy.base_url, model=server_model(server), timeout=0.75, max_retries=4, backoff=0.01)
        got = backend.generate(requests_[:1], 12)[0]
        assert got.error is None and got.text == direct.text
        assert proxy.chat_calls == 5  # four injected faults, then the real answer
    finally:
        proxy.close()


def test_failure_after_retries_is_recorded(served, requests_):
    _, server = served
    proxy = FaultProxy(server.base_url, plan=["500"] * 10)
    try:
        backend = HTTPBackend(proxy.base_url, model=server_model(server), max_retries=1, backoff=0.01)
        [c] = backend.generate(requests_[:1], 12)
        assert c.text == "" and "HTTP 500" in c.error and "after 2 tries" in c.error
        judge = Judge(backend, max_retries=1, max_new_tokens=12)
        [o] = judge.run(requests_[:1])
        assert not o.ok and o.attempts == 2 and o.error.startswith("request failed: HTTP 500")
        assert proxy.chat_calls == 2 + 4
    finally:
        proxy.close()


@pytest.mark.parametrize("concurrency", [1, 3])
def test_bounded_concurrency(served, requests_, concurrency):
    _, server = served
    proxy = FaultProxy(server.base_url, delay=0.3)
    try:
        backend = HTTPBackend(proxy.base_url, model=server_model(server), concurrency=concurrency)
        reqs = [requests_[1]] * 6
        t0 = time.perf_counter()
        out = backend.generate(reqs, 4)
        elapsed = time.perf_counter() - t0
        assert [c.error for c in out] == [None] * 6 and len({c.text for c in out}) == 1
        assert proxy.max_inflight == concurrency
        if concurrency > 1:
            assert elapsed < 6 * 0.3  # overlapped: less than the sum of the proxy's delays
    finally:
        proxy.close()


def test_server_down_names_the_url(requests_):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(BackendError, match=f"cannot reach the OpenAI-compatible server at {url}/models"):
        HTTPBackend(url)
    backend = HTTPBackend(url, model="m")
    with pytest.raises(BackendError, match=f"{url}/chat/completions .*is it running"):
        backend.generate(requests_[:1], 4)


def test_bad_options():
    with pytest.raises(ValueError, match="base_url must be an http"):
        HTTPBackend("127.0.0.1:8000")
    with pytest.raises(ValueError, match="concurrency must be"):
        HTTPBackend("http://127.0.0.1:1/v1", model="m", concurrency=0)


def server_model(server):
    return HTTPBackend(server.base_url).model


def test_reward_through_the_server(served):
    import reward_plugins as rp

    _, server = served
    reward = rp.create_reward("mllm-judge", backend="http", base_url=server.base_url, dimensions=["aesthetic"],
                              max_retries=0, max_new_tokens=8, on_failure="nan",
                              backend_options={"concurrency": 2})
    assert reward.judge.backend.concurrency == 2 and not reward.is_differentiable
    out = reward(random_images(3, 32, 32), ["a cat", "a cat", "a dog"])
    # The served model is random and unconstrained: both list-wise requests fail, recorded, NaN (never 0).
    assert len(reward.failures) == 2 and {f.num_images for f in reward.failures} == {1, 2}
    assert out.scores.isnan().all() and reward.cost.requests == 2 and reward.cost.prompt_tokens > 0
    with pytest.raises(ValueError, match="backend='http' needs base_url"):
        rp.create_reward("mllm-judge", backend="http")
