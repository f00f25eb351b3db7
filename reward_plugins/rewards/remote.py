"""A reward that lives in another process or machine: the client of `reward-align serve`.

``create_reward("remote", url="http://host:18085")`` asks the server's ``GET /info`` for its reward's
dimensions, default dimension and whether it needs prompts, then scores by POSTing batches (split to
the server's per-request limit). It retries with exponential backoff on connection errors, timeouts
and 5xx answers (honouring a 503's Retry-After), so a trainer survives a server restart; when the
server stays down it raises `RemoteRewardError` naming the URL. A 4xx answer is the request's fault
and raises `ValueError` with the server's explanation, without retrying.

Scores come back over the wire, so the reward is not differentiable (`is_differentiable = False`):
use it for best-of-N, pair mining, evaluation and policy-gradient training, not reward backprop.

Transport (``protocol=``): ``"safetensors"`` (default; raw tensors in the reward's `dtype`, float32
unless ``dtype=`` says otherwise, or ``image_format="uint8"``), ``"json"`` (base64 PNG, or JPEG) or
``"pickle"`` (flow_grpo's protocol, JPEG by default as its clients send). PNG and uint8 round images to
8 bits; JPEG is lossy: the server scores the decoded JPEG.

``remote-tiny`` starts a loopback server in this process serving a tiny reward (``lescore-tiny`` by
default) and connects to it; it needs the ``[serve]`` extra and is for tests and demos.

Example:
    >>> reward = create_reward("remote", url="http://127.0.0.1:18085", timeout_s=30)
    >>> reward.dimensions
    ('aesthetic', 'fidelity', 'alignment', 'overall')
"""

from __future__ import annotations

import http.client
import io
import json
import random
import threading
import time
import urllib.parse
import weakref
from typing import Any

import torch

from ..base import RewardModel
from ..registry import create_reward, register_reward

_RETRY_STATUSES = (500, 502, 503, 504)
_PROTOCOL_TYPES = {"safetensors": "application/x-safetensors", "json": "application/json",
                   "pickle": "application/python-pickle"}
_FORMATS = {"safetensors": ("float", "uint8"), "json": ("png", "jpeg"), "pickle": ("jpeg", "png")}


class RemoteRewardError(ConnectionError):
    """The reward server could not be reached or kept failing after every retry."""


class RemoteReward(RewardModel):
    """Scores images with a reward served by `reward-align serve` (see the module docstring).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:18085``.
        timeout_s: socket timeout of one request (connect and each read).
        retries: retries after the first attempt (connection errors, timeouts, 5xx).
        backoff_s: first retry delay; doubles each retry up to `max_backoff_s` (plus a little jitter).
        max_backoff_s: the longest delay between two attempts.
        batch_size: images per request (default and maximum: the server's per-request limit).
        protocol: ``"safetensors"``, ``"json"`` or ``"pickle"``.
        image_format: safetensors ``"float"``/``"uint8"``; json/pickle ``"png"``/``"jpeg"``.
        jpeg_quality: JPEG quality when sending JPEG (PIL's default 75 is what flow_grpo's clients send).
    """

    is_differentiable = False

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 60.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        batch_size: int | None = None,
        protocol: str = "safetensors",
        image_format: str | None = None,
        jpeg_quality: int = 75,
    ) -> None:
        super().__init__()
        if not isinstance(url, str) or not url:
            raise TypeError(f"url must be the server's base URL as a str, e.g. 'http://127.0.0.1:18085'; got {url!r}.")
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must look like 'http://host:port'; got {url!r}.")
        if protocol not in _PROTOCOL_TYPES:
            raise ValueError(f"protocol must be one of {sorted(_PROTOCOL_TYPES)}; got {protocol!r}.")
        image_format = image_format or _FORMATS[protocol][0]
        if image_format not in _FORMATS[protocol]:
            raise ValueError(f"image_format for protocol {protocol!r} must be one of {_FORMATS[protocol]}; got {image_format!r}.")
        for name, value in (("timeout_s", timeout_s), ("backoff_s", backoff_s), ("max_backoff_s", max_backoff_s)):
            if not isinstance(value, (int, float)) or value < 0 or (name == "timeout_s" and value == 0):
                raise ValueError(f"{name} must be a positive number of seconds; got {value!r}.")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0; got {retries!r}.")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._path = parts.path.rstrip("/")
        self.timeout_s, self.retries = float(timeout_s), retries
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.protocol, self.image_format, self.jpeg_quality = protocol, image_format, jpeg_quality
        self._local = threading.local()  # one keep-alive connection per calling thread
        self._owned_server: Any = None
        # No parameters: this empty buffer carries the device scores come back on and the dtype
        # float images travel in, so `create_reward(..., device=, dtype=)` work as for any reward.
        self.register_buffer("_wire", torch.empty(0), persistent=False)

        info = self.refresh_info()
        limit = int(info["limits"]["max_images_per_request"])
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
        self.batch_size = min(batch_size or limit, limit)

    # -- what the server serves -------------------------------------------------------------------
    def refresh_info(self) -> dict[str, Any]:
        """Ask ``GET /info`` again and adopt its dimensions (e.g. after the server was replaced)."""
        status, body, _ = self._request("GET", "/info", None, {})
        if status != 200:
            raise RemoteRewardError(f"GET {self.url}/info answered {status}: {body[:200]!r}; is this a reward server?")
        info = json.loads(body)
        self.server_info = info
        self.dimensions = tuple(info["dimensions"])
        self.default_dimension = info["default_dimension"]
        self.requires_prompts = bool(info["requires_prompts"])
        self.score_range = tuple(info["score_range"]) if info.get("score_range") else None
        if not set(self._mix) <= set(self.dimensions):
            self._mix = {self.default_dimension: 1.0}
        return info

    @property
    def device(self) -> torch.device:
        return self._wire.device

    @property
    def dtype(self) -> torch.dtype:
        return self._wire.dtype

    # -- HTTP with retries -----------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout_s)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes, Any]:
        """One request, retried on connection errors, timeouts and 5xx; 4xx and 2xx are returned."""
        start, last = time.monotonic(), "no attempt"
        for attempt in range(self.retries + 1):
            delay = min(self.backoff_s * (2**attempt), self.max_backoff_s)
            try:
                conn = self._connection()
                conn.request(method, self._path + path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self._drop_connection()
                if resp.status not in _RETRY_STATUSES:
                    return resp.status, data, resp
                last = f"HTTP {resp.status}: {data[:300].decode('utf-8', 'replace')}"
                retry_after = resp.getheader("retry-after")
                if retry_after and retry_after.isdigit():
                    delay = max(delay, min(float(retry_after), self.max_backoff_s))
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, half-closed
                self._drop_connection()
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if attempt < self.retries:
                time.sleep(delay * (1 + 0.1 * random.random()))
        raise RemoteRewardError(
            f"reward server at {self.url} failed {self.retries + 1} attempt(s) over {time.monotonic() - start:.1f} s "
            f"({method} {path or '/'}); last error: {last}. Is `reward-align serve` running there? Check url= "
            "or raise retries=/timeout_s=."
        )

    # -- encoding --------------------------------------------------------------------------------
    def _encode(self, images: torch.Tensor, prompts: list[str]) -> bytes:
        if self.protocol == "safetensors":
            from safetensors.torch import save

            x = images.detach().cpu()
            x = (x.float() * 255).round().clamp(0, 255).to(torch.uint8) if self.image_format == "uint8" else x
            return save({"images": x.contiguous()}, metadata={"prompts": json.dumps(prompts)})
        from ..preprocess import tensor_to_pil

        files = []
        for im in images:
            buf = io.BytesIO()
            if self.image_format == "jpeg":
                tensor_to_pil(im).save(buf, format="JPEG", quality=self.jpeg_quality)
            else:
                tensor_to_pil(im).save(buf, format="PNG", compress_level=1)
            files.append(buf.getvalue())
        if self.protocol == "pickle":
            import pickle

            return pickle.dumps({"images": files, "prompts": prompts}, protocol=4)
        import base64

        return json.dumps({"images": [base64.b64encode(f).decode() for f in files], "prompts": prompts}).encode()

    def _score_chunk(self, images: torch.Tensor, prompts: list[str]) -> dict[str, list[float]]:
        from ..serving.protocols import decode_answer

        body = self._encode(images, prompts)
        status, data, _ = self._request("POST", "/", body, {"Content-Type": _PROTOCOL_TYPES[self.protocol]})
        if status != 200:
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = data[:300].decode("utf-8", "replace")
            raise ValueError(f"reward server at {self.url} refused the request (HTTP {status}): {message}")
        answer = decode_answer(self.protocol, data)
        per_dim = answer["per_dim"]
        missing = [d for d in self.dimensions if d not in per_dim]
        if missing:
            # The server behind the URL changed reward: say so instead of returning the wrong numbers.
            raise RemoteRewardError(
                f"reward server at {self.url} answered dimensions {sorted(per_dim)} but this client expects "
                f"{list(self.dimensions)}; the server was replaced by another reward. Call refresh_info()."
            )
        return per_dim

    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        cols: dict[str, list[float]] = {d: [] for d in self.dimensions}
        for i in range(0, images.shape[0], self.batch_size):
            per_dim = self._score_chunk(images[i : i + self.batch_size], prompts[i : i + self.batch_size])
            for d in self.dimensions:
                cols[d].extend(per_dim[d])
        return {d: torch.tensor(v, dtype=torch.float32, device=self.device) for d, v in cols.items()}

    def close(self) -> None:
        """Close this thread's connection and stop the server this reward started (``remote-tiny``)."""
        self._drop_connection()
        if self._owned_server is not None:
            self._owned_server.stop()
            self._owned_server = None

    def extra_repr(self) -> str:
        return f"url={self.url!r}, protocol={self.protocol!r}, " + super().extra_repr()

    def __getstate__(self) -> dict[str, Any]:
        # Connections are per thread and per process: a copy (deepcopy, pickling to a worker) opens its own.
        state = self.__dict__.copy()
        state["_local"] = None
        state["_owned_server"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


@register_reward("remote", description="a reward served over HTTP by `reward-align serve` (not differentiable)")
def remote(url: str | None = None, checkpoint: str | None = None, **options: Any) -> RemoteReward:
    """A reward served over HTTP by `reward-align serve`; `checkpoint=` is accepted as the URL so every
    CLI command's ``--reward remote --checkpoint http://host:port`` works."""
    if url is None and checkpoint is None:
        raise ValueError(
            "the remote reward needs url='http://host:port' of a server started with "
            "`reward-align serve --reward NAME --port PORT`."
        )
    if url is not None and checkpoint is not None and url != checkpoint:
        raise ValueError(f"got url={url!r} and checkpoint={checkpoint!r}; pass the server's URL once.")
    return RemoteReward(url or checkpoint, **options)


@register_reward("remote-tiny", tiny=True)
def remote_tiny(reward: str = "lescore-tiny", **options: Any) -> RemoteReward:
    """A loopback server in this process serving a tiny reward, and the remote client connected to it."""
    from ..serving import BackgroundServer, ServeLimits

    if not reward.split(":")[0].endswith("-tiny") or reward.startswith("remote"):
        raise ValueError(f"remote-tiny serves a tiny reward such as 'lescore-tiny'; got reward={reward!r}.")
    server = BackgroundServer(create_reward(reward), limits=ServeLimits(max_wait_ms=1.0)).start()
    client = RemoteReward(server.url, **options)
    client._owned_server = server
    # The server thread stops (gracefully) when the client is garbage-collected or the process exits.
    weakref.finalize(client, server.stop, 5.0)
    return client
