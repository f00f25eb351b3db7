"""The judge: templates + a backend + the parser, with bounded retries and a cost account.

A request whose answer cannot be parsed (or whose transport failed) is asked again, at most `max_retries`
more times; the first attempt is greedy (LePref samples at temperature 0), retries sample at
`retry_temperature` so they can differ. What still fails is an `Outcome` with `error` and every raw
answer kept, never a made-up score.

Example:
    >>> judge = Judge(make_backend("http", base_url="http://127.0.0.1:8000/v1"))      # doctest: +SKIP
    >>> out = judge.run([judge.request("annotation_alignment", "a red fox", images)])   # doctest: +SKIP
    >>> out[0].result.scores                                                             # doctest: +SKIP
    [82.0, 64.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import Backend, make_backend
from .parsing import Answer, AnswerError, answer_to_dict, parse_answer
from .requests import ChatRequest, ImageLike, build_request
from .templates import TemplateSet, load_templates, template_kind


@dataclass
class Outcome:
    """One request's end result: `result` (typed) or `error` (why it failed), with every raw answer."""

    key: str
    template: str
    num_images: int
    result: Answer | None = None
    error: str | None = None
    raw: list[str] = field(default_factory=list)
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.result is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "template": self.template, "num_images": self.num_images, "ok": self.ok,
            "result": answer_to_dict(self.result) if self.result is not None else None, "error": self.error,
            "raw": self.raw, "attempts": self.attempts, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


@dataclass
class Cost:
    """Running totals: requests finished, backend calls (attempts), tokens, failures."""

    requests: int = 0
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: int = 0

    def add(self, o: Outcome) -> None:
        self.requests += 1
        self.attempts += o.attempts
        self.prompt_tokens += o.prompt_tokens
        self.completion_tokens += o.completion_tokens
        self.failures += 0 if o.ok else 1

    def summary(self) -> str:
        return (f"{self.requests} requests ({self.attempts} backend calls), {self.prompt_tokens} prompt + "
                f"{self.completion_tokens} completion tokens, {self.failures} failed")


class Judge:
    """Ask a VLM the LePref template questions and read the answers.

    Args:
        backend: a `Backend` or a backend name ('local', 'http', 'vllm') with `backend_options`.
        templates: None (our wording), a `TemplateSet`, or the path of LePref's annoutils.py.
        faithful: with an official file, reproduce it exactly (True) or corrected (False); see `load_templates`.
        max_retries: extra attempts for an answer that cannot be parsed or a request that failed.
        retry_temperature: sampling temperature of the retries (the first attempt is greedy).
        max_new_tokens: answer length cap; None = 32 + 32 per image for annotations, 512 otherwise.
        image_format, jpeg_quality: how images are encoded into the data URLs (LePref: JPEG, quality 75).
    """

    def __init__(
        self,
        backend: Backend | str,
        templates: str | Path | TemplateSet | None = None,
        *,
        faithful: bool | None = None,
        max_retries: int = 2,
        retry_temperature: float = 0.7,
        max_new_tokens: int | None = None,
        image_format: str = "jpeg",
        jpeg_quality: int = 75,
        backend_options: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0; got {max_retries!r}.")
        # Templates first: a bad template option should fail before a model is loaded.
        self.templates = load_templates(templates, faithful=faithful)
        self.backend = make_backend(backend, **(backend_options or {}))
        self.max_retries = max_retries
        self.retry_temperature = float(retry_temperature)
        self.max_new_tokens = max_new_tokens
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality

    def request(self, template_type: str, prompt: str | None = None,
                images: Sequence[ImageLike] | ImageLike | None = None) -> ChatRequest:
        """Build (and check against the backend's image limit) one request."""
        req = build_request(self.templates[template_type], prompt, images, image_format=self.image_format,
                            jpeg_quality=self.jpeg_quality)
        self.backend.check_request(req)
        return req

    def _tokens_for(self, req: ChatRequest) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return 32 + 32 * req.num_images if template_kind(req.template) == "annotation" else 512

    def run(self, requests: Sequence[ChatRequest]) -> list[Outcome]:
        """Answer and parse every request (retrying bad answers); one `Outcome` each, in order."""
        outcomes = [Outcome(r.key, r.template, r.num_images) for r in requests]
        pending = list(range(len(requests)))
        for attempt in range(self.max_retries + 1):
            if not pending:
                break
            temperature = 0.0 if attempt == 0 else self.retry_temperature
            # Requests of one length budget go together, so a batch never waits on a longer budget.
            by_budget: dict[int, list[int]] = {}
            for i in pending:
                by_budget.setdefault(self._tokens_for(requests[i]), []).append(i)
            still = []
            for budget, idx in by_budget.items():
                comps = self.backend.generate([requests[i] for i in idx], budget, temperature)
                for i, c in zip(idx, comps):
                    o, r = outcomes[i], requests[i]
                    o.attempts += 1
                    o.prompt_tokens += c.prompt_tokens
                    o.completion_tokens += c.completion_tokens
                    o.raw.append(c.text)
                    if c.error is not None:
                        o.error = f"request failed: {c.error}"
                        still.append(i)
                        continue
                    try:
                        o.result = parse_answer(r.template, c.text, r.num_images, r.answer_key)
                        o.error = None
                    except AnswerError as e:
                        o.error = f"unparseable answer: {e.reason}"
                        still.append(i)
            pending = sorted(still)
        return outcomes
