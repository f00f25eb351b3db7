"""The HTTP reward server on loopback: protocols against in-process scores, dynamic batching under 64
concurrent clients, hostile pickles, bad inputs, overload and graceful shutdown."""

import base64
import http.client
import io
import json
import os
import pickle
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import reward_plugins as rp  # noqa: E402
from reward_plugins.preprocess import pil_to_tensor, tensor_to_pil  # noqa: E402
from reward_plugins.serving import BackgroundServer, ServeLimits  # noqa: E402
from reward_plugins.testing import random_images  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a red car on a street", "two dogs playing in the snow", "a bowl of soup"]
DIMS = ("aesthetic", "fidelity", "alignment", "overall")
LIMITS = ServeLimits(max_batch_size=16, max_wait_ms=20, max_queue_images=512, max_images_per_request=8,
                     max_image_side=128, max_image_pixels=128 * 128, max_request_bytes=1_000_000)


@pytest.fixture(scope="module")
def reward():
    # The server gets its own instance (same seeded weights), so in-process scoring never shares a model.
    return rp.create_reward("lescore-tiny")


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(rp.create_reward("lescore-tiny"), limits=LIMITS) as s:
        yield s


def post(url, body, content_type=None, path="/"):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type} if content_type else {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get(url, path):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def encode(images, fmt, **kw):
    out = []
    for im in images:
        buf = io.BytesIO()
        tensor_to_pil(im).save(buf, format=fmt, **kw)
        out.append(buf.getvalue())
    return out


def decoded(files):
    from PIL import Image

    return torch.stack([pil_to_tensor(Image.open(io.BytesIO(f))) for f in files])


def in_process(reward, images, prompts):
    out = reward.score(images, prompts)
    return {k: v.tolist() for k, v in out.per_dim.items()}, out.scores.tolist()


def assert_scores(answer, reward, images, prompts):
    per_dim, scores = in_process(reward, images, prompts)
    assert answer["dimensions"] == list(DIMS)
    assert set(answer["per_dim"]) == set(DIMS)
    for d in DIMS:
        np.testing.assert_allclose(answer["per_dim"][d], per_dim[d], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(answer["scores"], scores, rtol=1e-4, atol=1e-4)


# -- protocols ------------------------------------------------------------------------------------
def test_flow_grpo_pickle_client_gets_scores_and_outputs_equal_to_in_process_jpeg(server, reward):
    # Exactly what flow_grpo's unifiedreward_score_remote does: uint8 NHWC, np.array_split prompts,
    # PIL JPEG at its default quality, pickle.dumps, POST to the root URL, pickle.loads the answer.
    images = random_images(4, 64, 64, seed=1)
    arrays = (images * 255).round().clamp(0, 255).to(torch.uint8).numpy().transpose(0, 2, 3, 1)
    from PIL import Image

    jpegs = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG")
        jpegs.append(buf.getvalue())
    prompt_batch = np.array_split(np.array(PROMPTS), 1)[0]
    status, headers, body = post(server.url, pickle.dumps({"images": jpegs, "prompts": prompt_batch}))
    assert status == 200, body
    answer = pickle.loads(body)
    assert answer["outputs"] == answer["scores"]
    # JPEG is lossy: the server scores the decoded JPEG, so compare with in-process scores of it.
    assert_scores(answer, reward, decoded(jpegs), PROMPTS)
    lossy = in_process(reward, images, PROMPTS)[1]
    assert not np.allclose(answer["scores"], lossy, rtol=1e-4, atol=1e-4)


def test_json_base64_png_matches_in_process_uint8_images(server, reward):
    images = random_images(3, 48, 80, seed=2)
    pngs = encode(images, "PNG")
    body = json.dumps({"images": [base64.b64encode(pngs[0]).decode(),
                                  "data:image/png;base64," + base64.b64encode(pngs[1]).decode(),
                                  base64.b64encode(pngs[2]).decode()], "prompts": PROMPTS[:3]})
    status, headers, data = post(server.url, body.encode(), "application/json")
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert_scores(json.loads(data), reward, decoded(pngs), PROMPTS[:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_safetensors_raw_tensors_match_in_process_without_a_jpeg_round_trip(server, reward, dtype):
    from safetensors.torch import load, save

    images = random_images(3, 64, 48, seed=3)
    wire = (images * 255).round().to(torch.uint8) if dtype == torch.uint8 else images.to(dtype)
    body = save({"images": wire}, metadata={"prompts": json.dumps(PROMPTS[:3])})
    status, headers, data = post(server.url, body, "application/x-safetensors")
    assert status == 200 and headers["content-type"] == "application/x-safetensors"
    t = load(data)
    answer = {"scores": t["scores"].tolist(), "per_dim": {d: t[f"per_dim.{d}"].tolist() for d in DIMS},
              "dimensions": list(DIMS)}
    expected = wire.float() / 255 if dtype == torch.uint8 else wire.float()
    assert_scores(answer, reward, expected, PROMPTS[:3])


def test_mixed_image_sizes_in_one_request(server, reward):
    a, b = random_images(1, 64, 64, seed=4), random_images(1, 40, 96, seed=5)
    pngs = encode([a[0], b[0]], "PNG")
    status, _, data = post(server.url, pickle.dumps({"images": pngs, "prompts": PROMPTS[:2]}))
    assert status == 200
    answer = pickle.loads(data)
    ref = [in_process(reward, decoded([p]), [q])[1][0] for p, q in zip(pngs, PROMPTS[:2])]
    np.testing.assert_allclose(answer["scores"], ref, rtol=1e-4, atol=1e-4)


def test_health_and_info(server):
    status, health = get(server.url, "/health")
    assert status == 200 and health["status"] == "ok"
    status, info = get(server.url, "/info")
    assert status == 200
    assert info["reward"] == "lescore-tiny" and info["dimensions"] == list(DIMS)
    assert info["default_dimension"] == "overall" and info["requires_prompts"] is True
    assert info["model"] == "LeScore" and info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["version"] == rp.__version__
    assert info["limits"]["max_batch_size"] == 16 and info["limits"]["max_wait_ms"] == 20
    assert {"requests", "batches", "max_batch_images", "batch_size_histogram"} <= set(info["stats"])


# -- dynamic batching ------------------------------------------------------------------------------
def test_64_concurrent_clients_all_correct_and_batches_merge(server, reward):
    from safetensors.torch import load, save

    images = random_images(64, 64, 64, seed=6)
    prompts = [PROMPTS[i % 4] + f" #{i}" for i in range(64)]
    expected = reward.score(images, prompts).per_dim
    before = server.stats
    barrier = threading.Barrier(64)

    def client(i):
        body = save({"images": images[i : i + 1].contiguous()}, metadata={"prompts": json.dumps(prompts[i : i + 1])})
        barrier.wait()
        status, _, data = post(server.url, body, "application/x-safetensors")
        assert status == 200, data
        return {d: load(data)[f"per_dim.{d}"][0].item() for d in DIMS}

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(client, range(64)))
    for d in DIMS:
        np.testing.assert_allclose([r[d] for r in results], expected[d].tolist(), rtol=1e-4, atol=1e-4)
    after = server.stats
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == 64
    assert batches < 64 and after["max_batch_images"] > 1, after
    assert after["max_batch_images"] <= LIMITS.max_batch_size


# -- hostile pickles and bad inputs ------------------------------------------------------------------
class _Touch:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _still_serves(server):
    png = encode(random_images(1, 32, 32, seed=9), "PNG")
    status, _, data = post(server.url, pickle.dumps({"images": png, "prompts": ["ok"]}))
    assert status == 200 and len(pickle.loads(data)["scores"]) == 1


def test_hostile_pickles_are_refused_nothing_runs_and_the_server_keeps_serving(server, tmp_path):
    target = tmp_path / "pwned"
    png = encode(random_images(1, 32, 32), "PNG")
    hostile = [
        pickle.dumps({"images": png, "prompts": [_Touch(target)]}),
        pickle.dumps(_Touch(target)),
        pickle.dumps({"images": png, "prompts": ["x"], "hook": os.getcwd}),  # a bare global lookup
        pickle.dumps({"images": png, "prompts": np.array(["x"], dtype=object)}),
    ]
    for body in hostile:
        status, headers, data = post(server.url, body)
        assert status == 400, data
        message = json.loads(data)["error"]
        assert message.startswith("refused pickle") and "Nothing from the request was executed" in message
    time.sleep(0.2)
    assert not target.exists()
    _still_serves(server)


def test_a_nesting_bomb_is_refused_and_does_not_crash_the_server():
    # One megabyte of TUPLE1 opcodes used as a dict key would overflow the C stack while unpickling.
    bomb = b"\x80\x04}N" + b"\x85" * 1_000_000 + b"K\x01s."
    big = ServeLimits(max_request_bytes=2_000_000)
    with BackgroundServer(rp.create_reward("aesthetic-tiny"), limits=big) as s:
        status, _, data = post(s.url, bomb)
        assert status == 400 and "nests deeper than 32" in json.loads(data)["error"]
        assert get(s.url, "/health")[0] == 200


def _png_b64(h=32, w=32):
    return base64.b64encode(encode(random_images(1, h, w), "PNG")[0]).decode()


@pytest.mark.parametrize(
    "body, content_type, status, pattern",
    [
        (b"", None, 400, "body is empty"),
        (b"hello there", None, 400, "cannot tell which protocol"),
        (b"x", "text/plain", 415, "unsupported Content-Type 'text/plain'"),
        (b"{not json", "application/json", 400, "malformed JSON"),
        (b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", 400, "malformed JSON"),
        (b'{"prompts": ["a"]}', "application/json", 400, "must be an object with 'images'"),
        (b'{"images": [], "prompts": []}', "application/json", 400, "'images' is empty"),
        (b'{"images": ["%%%"], "prompts": ["a"]}', "application/json", 400, r"images\[0\] is not valid base64"),
        ('{"images": ["aGVsbG8="], "prompts": ["a"]}', "application/json", 400, r"images\[0\] .* not a decodable"),
        ("JSON2", "application/json", 400, "got 1 prompts for 2 images"),
        ("JSON1", "application/json", 400, "needs 'prompts'"),
        ("MANY", "application/json", 413, "at most 8 per request"),
        ("HUGE", "application/json", 413, "129x129 pixels; the limit is 128"),
        (pickle.dumps([1, 2]), None, 400, "expected a dict with 'images'"),
        (pickle.dumps({"images": [b"\xff\xd8\xff broken"], "prompts": ["a"]}), None, 400, "not a decodable"),
        (pickle.dumps({"images": [3], "prompts": ["a"]}), None, 400, r"images\[0\] is int"),
        (pickle.dumps({"images": [b"x"], "prompts": "a"}), None, 400, "'prompts' must be a list of str"),
        (b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}", "application/x-safetensors", 400, "malformed safetensors"),
        ("ST_RANGE", "application/x-safetensors", 400, r"must lie in \[0, 1\]"),
        ("ST_SHAPE", "application/x-safetensors", 400, r"expected \(B, 3, H, W\)"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 12 and v.isupper() else None,
)
def test_bad_inputs_get_clear_4xx_and_the_server_keeps_serving(server, body, content_type, status, pattern):
    from safetensors.torch import save

    if body == "JSON2":
        body = json.dumps({"images": [_png_b64(), _png_b64()], "prompts": ["a"]})
    elif body == "JSON1":
        body = json.dumps({"images": [_png_b64()]})
    elif body == "MANY":
        body = json.dumps({"images": [_png_b64(8, 8)] * 9, "prompts": ["a"] * 9})
    elif body == "HUGE":
        body = json.dumps({"images": [_png_b64(129, 129)], "prompts": ["a"]})
    elif body == "ST_RANGE":
        body = save({"images": torch.full((1, 3, 8, 8), 2.0)}, metadata={"prompts": '["a"]'})
    elif body == "ST_SHAPE":
        body = save({"images": torch.rand(1, 8, 8, 3)}, metadata={"prompts": '["a"]'})
    if isinstance(body, str):
        body = body.encode()
    got, headers, data = post(server.url, body, content_type)
    assert got == status, data
    err = json.loads(data)
    assert err["status"] == status

    assert re.search(pattern, err["error"]), err["error"]
    _still_serves(server)


def test_body_over_the_size_limit_is_413(server):
    status, _, data = post(server.url, b"\x80" + b"\x00" * (LIMITS.max_request_bytes + 1))
    assert status == 413 and "limit is 1000000" in json.loads(data)["error"]


def test_unknown_route_and_method_explain_what_is_served(server):
    host, port = server.url.removeprefix("http://").split(":")
    for method, path, code in (("GET", "/nope", 404), ("PUT", "/", 405)):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request(method, path)
        resp = conn.getresponse()
        assert resp.status == code
        assert "Score with POST /" in json.loads(resp.read())["error"]


# -- overload and shutdown ---------------------------------------------------------------------------
def test_overload_answers_503_with_retry_after():
    limits = ServeLimits(max_batch_size=64, max_wait_ms=600, max_queue_images=2, max_images_per_request=2,
                         retry_after_s=3)
    png = encode(random_images(2, 32, 32), "PNG")
    body = pickle.dumps({"images": png, "prompts": ["a", "b"]})
    with BackgroundServer(rp.create_reward("lescore-tiny"), limits=limits) as s:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, s.url, body)  # waits 600 ms in the batcher for company
            time.sleep(0.2)
            status, headers, data = post(s.url, body)
            assert status == 503 and headers["retry-after"] == "3"
            assert "overloaded" in json.loads(data)["error"]
            assert first.result()[0] == 200
        assert s.stats["overload_rejections"] == 1


def test_graceful_shutdown_finishes_in_flight_requests(reward):
    limits = ServeLimits(max_wait_ms=800)
    images = random_images(2, 32, 32, seed=7)
    pngs = encode(images, "PNG")
    s = BackgroundServer(rp.create_reward("lescore-tiny"), limits=limits).start()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, s.url, pickle.dumps({"images": pngs, "prompts": PROMPTS[:2]}))
        time.sleep(0.3)  # the request is now waiting in the batcher
        s.stop()
        status, _, data = pending.result(timeout=30)
    assert status == 200
    assert_scores(pickle.loads(data), reward, decoded(pngs), PROMPTS[:2])
    with pytest.raises(OSError):
        post(s.url, b"x")
