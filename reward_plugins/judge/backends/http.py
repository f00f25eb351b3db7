"""Any OpenAI-compatible chat-completions server (vLLM `serve`, SGLang, `transformers serve`...), with the
standard library only: bounded concurrency (a thread pool), a timeout per call, retries with exponential
backoff on timeouts, 5xx/408/429 answers and malformed bodies, and the server's own model name.

A server that cannot be reached at all raises `BackendError` naming the URL; a request that still fails
after its retries comes back as a `Completion` with `error` set, so one bad request does not stop a run.

Example:
    >>> backend = HTTPBackend("http://127.0.0.1:8000/v1", model="mistralai/Pixtral-12B-2409", concurrency=16)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..requests import ChatRequest
from .base import DEFAULT_MAX_IMAGES, Backend, BackendError, Completion, check_positive

RETRY_STATUS = (408, 429)


class _Retryable(Exception):
    pass


class HTTPBackend(Backend):
    """Chat completions over HTTP.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
        model: the model name the server knows; None asks ``GET /models`` and takes its only model.
        api_key: sent as a Bearer token when given.
        concurrency: requests in flight at once.
        timeout: seconds per call.
        max_retries: extra tries per request on timeouts, 5xx/408/429 and malformed answers.
        backoff: first wait between tries in seconds (doubled each time, at most `max_backoff`).
        max_images: most images per request (match the server's own limit).
        extra_body: extra fields for every request body (e.g. ``{"guided_json": ...}`` on vLLM).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_images: int | None = DEFAULT_MAX_IMAGES,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL like 'http://127.0.0.1:8000/v1'; got {base_url!r}.")
        check_positive("concurrency", concurrency)
        check_positive("timeout", timeout, 1e-3)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0; got {max_retries!r}.")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_images = max_images
        self.extra_body = dict(extra_body or {})
        self.model = model or self._only_model()
        self.name = f"http:{self.base_url} ({self.model})"

    # -- plumbing ---------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _call(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        url = self.base_url + path
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers=self._headers(), method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            if e.code >= 500 or e.code in RETRY_STATUS:
                raise _Retryable(f"HTTP {e.code} from {url}: {detail}") from e
            raise BackendError(f"HTTP {e.code} from {url}: {detail}") from e
        except TimeoutError as e:
            raise _Retryable(f"no answer from {url} within {self.timeout:g} s") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _Retryable(f"no answer from {url} within {self.timeout:g} s") from e
            raise BackendError(
                f"cannot reach the OpenAI-compatible server at {url} ({e.reason}); is it running? Start one with "
                "e.g. `vllm serve MODEL` or `transformers serve MODEL`, and check base_url."
            ) from e
        except (ConnectionError, OSError) as e:
            raise _Retryable(f"connection to {url} failed: {e}") from e
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise _Retryable(f"malformed JSON body from {url}: {raw[:120]!r}") from e

    def _with_retries(self, path: str, body: dict[str, Any] | None) -> dict[str, Any] | str:
        """The parsed body, or the last error message once the retries are spent."""
        delay = self.backoff
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                return self._call(path, body)
            except _Retryable as e:
                last = str(e)
            if attempt < self.max_retries:
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        return f"{last} (after {self.max_retries + 1} tries)"

    def _only_model(self) -> str:
        got = self._with_retries("/models", None)
        if isinstance(got, str):
            raise BackendError(f"cannot list the models of {self.base_url}: {got}")
        ids = [m.get("id") for m in got.get("data", []) if isinstance(m, dict)]
        if len(ids) != 1:
            raise BackendError(f"{self.base_url}/models lists {ids}; pass model= with the one to use.")
        return ids[0]

    # -- the interface ------------------------------------------------------------------------------
    def _one(self, request: ChatRequest, max_new_tokens: int, temperature: float) -> Completion:
        body = {"model": self.model, "messages": request.messages, "max_tokens": max_new_tokens,
                "temperature": temperature, **self.extra_body}
        delay = self.backoff
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                got = self._call("/chat/completions", body)
                text = got["choices"][0]["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError(type(text).__name__)
                usage = got.get("usage") or {}
                return Completion(text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
            except _Retryable as e:
                last = str(e)
            except (KeyError, IndexError, TypeError, AttributeError):
                last = f"answer without choices[0].message.content: {json.dumps(got)[:160]}"
            if attempt < self.max_retries:
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        return Completion("", error=f"{last} (after {self.max_retries + 1} tries)")

    def generate(self, requests: Sequence[ChatRequest], max_new_tokens: int, temperature: float = 0.0) -> list[Completion]:
        for r in requests:
            self.check_request(r)
        if len(requests) <= 1 or self.concurrency == 1:
            return [self._one(r, max_new_tokens, temperature) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(lambda r: self._one(r, max_new_tokens, temperature), requests))
