"""The remote reward client against a loopback server: same scores as in-process per protocol, the
server's dimensions, batching to the server's limit, retries across a server restart, clear errors."""

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import reward_plugins as rp  # noqa: E402
from reward_plugins.preprocess import pil_to_tensor, tensor_to_pil  # noqa: E402
from reward_plugins.rewards.remote import RemoteReward, RemoteRewardError  # noqa: E402
from reward_plugins.serving import BackgroundServer, ServeLimits  # noqa: E402
from reward_plugins.testing import random_images  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a red car", "two dogs in the snow", "a bowl of soup", "a castle", "a tree", "a boat"]
LIMITS = ServeLimits(max_batch_size=8, max_wait_ms=2, max_images_per_request=4, max_image_side=128,
                     max_image_pixels=128 * 128)


@pytest.fixture(scope="module")
def reward():
    return rp.create_reward("lescore-tiny")


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(rp.create_reward("lescore-tiny"), limits=LIMITS) as s:
        yield s


def _round_trip(images, fmt, **kw):
    from PIL import Image

    out = []
    for im in images:
        buf = io.BytesIO()
        tensor_to_pil(im).save(buf, format=fmt, **kw)
        out.append(pil_to_tensor(Image.open(io.BytesIO(buf.getvalue()))))
    return torch.stack(out)


def test_reports_the_servers_dimensions_and_is_not_differentiable(server):
    remote = rp.create_reward("remote", url=server.url)
    assert isinstance(remote, RemoteReward)
    assert remote.dimensions == ("aesthetic", "fidelity", "alignment", "overall")
    assert remote.default_dimension == "overall" and remote.requires_prompts
    assert remote.is_differentiable is False and remote.batch_size == LIMITS.max_images_per_request
    images = random_images(2, 32, 32).requires_grad_()
    out = remote(images, PROMPTS[:2])
    assert not out.scores.requires_grad and out.scores.dtype == torch.float32
    # --checkpoint URL works like url= (so every CLI command's --reward remote --checkpoint URL works).
    assert rp.create_reward("remote:fidelity", checkpoint=server.url + "/").selection == {"fidelity": 1.0}


@pytest.mark.parametrize(
    "protocol, image_format, reference",
    [
        ("safetensors", "float", lambda x: x),
        ("safetensors", "uint8", lambda x: (x * 255).round() / 255),
        ("json", "png", lambda x: (x * 255).round() / 255),
        ("json", "jpeg", lambda x: _round_trip(x, "JPEG", quality=75)),
        ("pickle", "jpeg", lambda x: _round_trip(x, "JPEG", quality=75)),
    ],
)
def test_scores_equal_in_process_per_protocol(server, reward, protocol, image_format, reference):
    images = random_images(7, 48, 64, seed=11)
    remote = rp.create_reward("remote", url=server.url, protocol=protocol, image_format=image_format)
    before = server.stats["requests"]
    out = remote.score(images, PROMPTS)
    # 7 images, at most 4 per request: the client split them into two requests.
    assert server.stats["requests"] - before == 2
    expected = reward.score(reference(images), PROMPTS)
    for d in remote.dimensions:
        torch.testing.assert_close(out.per_dim[d], expected.per_dim[d], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.scores, expected.scores, rtol=1e-4, atol=1e-4)


def test_bfloat16_wire_and_bad_options(server):
    remote = rp.create_reward("remote", url=server.url, dtype=torch.bfloat16)
    assert remote.dtype == torch.bfloat16
    assert torch.isfinite(remote.score(random_images(2, 32, 32), PROMPTS[:2]).scores).all()
    with pytest.raises(ValueError, match="needs url='http://host:port'"):
        rp.create_reward("remote")
    with pytest.raises(ValueError, match="protocol must be one of"):
        rp.create_reward("remote", url=server.url, protocol="grpc")
    with pytest.raises(ValueError, match="image_format for protocol 'pickle'"):
        rp.create_reward("remote", url=server.url, protocol="pickle", image_format="float")


def test_a_4xx_answer_raises_value_error_with_the_servers_explanation(server):
    remote = rp.create_reward("remote", url=server.url, retries=0)
    with pytest.raises(ValueError, match=r"refused the request \(HTTP 413\).*160x160 pixels; the limit is 128"):
        remote.score(random_images(1, 160, 160), PROMPTS[:1])


def test_client_retries_a_503_after_the_servers_retry_after(reward):
    # Queue of 2 images and a long batching wait: of two concurrent 2-image requests one is refused with
    # 503 + Retry-After 1, and the client retries it after that second.
    limits = ServeLimits(max_batch_size=64, max_wait_ms=400, max_queue_images=2, max_images_per_request=2)
    images = random_images(4, 32, 32, seed=13)
    expected = reward.score(images, PROMPTS[:4]).scores
    with BackgroundServer(rp.create_reward("lescore-tiny"), limits=limits) as s:
        remote = rp.create_reward("remote", url=s.url, retries=3, backoff_s=0.05)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, remote.score(images[2 * i : 2 * i + 2],
                                                                                            PROMPTS[2 * i : 2 * i + 2])))
                   for i in range(2)]
        results = {}
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert s.stats["overload_rejections"] >= 1
    torch.testing.assert_close(torch.cat([results[0].scores, results[1].scores]), expected, rtol=1e-4, atol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_survives_a_server_restart_and_errors_clearly_when_it_stays_down(reward):
    port = _free_port()
    images = random_images(3, 32, 32, seed=12)
    expected = reward.score(images, PROMPTS[:3]).scores
    first = BackgroundServer(rp.create_reward("lescore-tiny"), port=port, limits=LIMITS).start()
    remote = rp.create_reward("remote", url=f"http://127.0.0.1:{port}", retries=8, backoff_s=0.05, max_backoff_s=0.4)
    torch.testing.assert_close(remote.score(images, PROMPTS[:3]).scores, expected, rtol=1e-4, atol=1e-4)
    first.stop()  # the keep-alive connection the client holds is now dead

    second = BackgroundServer(rp.create_reward("lescore-tiny"), port=port, limits=LIMITS)
    restart = threading.Timer(0.5, second.start)
    restart.start()
    try:
        out = remote.score(images, PROMPTS[:3])  # refused until the replacement is up, then answered
        torch.testing.assert_close(out.scores, expected, rtol=1e-4, atol=1e-4)
    finally:
        restart.join()
        second.stop()

    remote.retries, remote.backoff_s = 2, 0.01
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(RemoteRewardError, match=rf"reward server at {url} failed 3 attempt\(s\).*Is `reward-align serve` running"):
        remote.score(images, PROMPTS[:3])
    with pytest.raises(RemoteRewardError, match=rf"reward server at {url} failed 2 attempt\(s\) .*GET /info"):
        rp.create_reward("remote", url=url, retries=1, backoff_s=0.01)


def test_remote_tiny_owns_its_loopback_server():
    remote = rp.create_reward("remote-tiny", reward="pickscore-tiny")
    assert remote.dimensions == ("pickscore",) and remote.server_info["reward"] == "pickscore-tiny"
    server = remote._owned_server
    assert server.running
    remote.close()
    assert not server.running
    with pytest.raises(ValueError, match="serves a tiny reward"):
        rp.create_reward("remote-tiny", reward="pickscore")


def _wait_for_health(port, proc, timeout_s=180.0):
    import urllib.request

    deadline = time.monotonic() + timeout_s  # the CLI imports torch and transformers first: slow on a busy CPU
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"reward-align serve exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"reward-align serve did not answer /health within {timeout_s} s")


def test_cli_serve_answers_a_flow_grpo_client_without_prompts_and_stops_on_sigterm():
    # aesthetic-tiny needs no prompts: the shape of flow_grpo's deqa_score_remote request ({"images": [...]}).
    import pickle
    import urllib.request

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "alignment.cli", "serve", "--reward", "aesthetic-tiny", "--port", str(port),
           "--max-batch-size", "8", "--log-level", "info"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_health(port, proc)
        remote = rp.create_reward("remote", url=f"http://127.0.0.1:{port}")
        assert remote.dimensions == ("aesthetic",) and not remote.requires_prompts
        assert remote.server_info["limits"]["max_batch_size"] == 8
        buf = io.BytesIO()
        tensor_to_pil(random_images(1, 32, 32)[0]).save(buf, format="JPEG")
        req = urllib.request.Request(f"http://127.0.0.1:{port}", data=pickle.dumps({"images": [buf.getvalue()]}))
        answer = pickle.loads(urllib.request.urlopen(req, timeout=30).read())
        assert len(answer["outputs"]) == 1 and answer["scores"] == answer["outputs"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status says "terminated by SIGTERM".
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "Application shutdown complete" in err
    assert f"serving aesthetic-tiny (aesthetic) on http://127.0.0.1:{port}" in err


def test_cli_serve_unknown_reward_is_one_line_error(capsys):
    from alignment.cli import main

    assert main(["serve", "--reward", "lescroe-tiny"]) == 1
    err = capsys.readouterr().err
    assert "reward-align serve: error: unknown reward 'lescroe-tiny'. Did you mean 'lescore-tiny'" in err
    assert "Traceback" not in err


def test_cli_reports_a_remote_server_that_is_down_in_one_line(monkeypatch, capsys, tmp_path):
    from alignment.cli import main

    monkeypatch.setitem(RemoteReward.__init__.__kwdefaults__, "retries", 0)
    url = f"http://127.0.0.1:{_free_port()}"
    tensor_to_pil(random_images(1, 16, 16)[0]).save(tmp_path / "a.png")
    assert main(["score", "--reward", "remote", "--checkpoint", url, str(tmp_path / "a.png")]) == 1
    err = capsys.readouterr().err
    assert f"reward-align score: error: reward server at {url} failed 1 attempt(s)" in err and "Traceback" not in err
