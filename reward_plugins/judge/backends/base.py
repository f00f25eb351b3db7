"""The one interface every judge backend has: chat requests in, completions out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..requests import ChatRequest

DEFAULT_MAX_IMAGES = 8  # LePref runs vLLM with limit_mm_per_prompt={"image": 8}


class BackendError(RuntimeError):
    """The backend cannot serve requests at all (server down, wrong model name, missing package)."""


@dataclass
class Completion:
    """One answer. `error` is set (and `text` may be empty) when the request itself failed after retries."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Backend:
    """Base class: `generate` answers every request, in order.

    Attributes:
        name: a short description (for logs and the cost summary).
        max_images: most images one request may carry (None: no limit).
    """

    name: str = "backend"
    max_images: int | None = DEFAULT_MAX_IMAGES

    def generate(self, requests: Sequence[ChatRequest], max_new_tokens: int, temperature: float = 0.0) -> list[Completion]:
        raise NotImplementedError

    def check_request(self, request: ChatRequest) -> None:
        """Raise ValueError when `request` has more images than this backend accepts."""
        if self.max_images is not None and request.num_images > self.max_images:
            raise ValueError(
                f"a {request.template} request has {request.num_images} images but backend {self.name} accepts at "
                f"most {self.max_images} per request; lower max_images_per_request (images are then split over "
                "several requests) or raise the backend's max_images (and the server's own limit, e.g. vLLM's "
                "--limit-mm-per-prompt)."
            )


def check_positive(name: str, value, minimum: float = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ValueError(f"{name} must be a number >= {minimum}; got {value!r}.")
