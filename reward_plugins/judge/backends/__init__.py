"""Judge backends behind one interface (`Backend.generate`). Each is imported only when it is built, so a
missing optional package (vllm) matters only to the backend that needs it.

    make_backend("local", model="path/to/vlm")              transformers AutoModelForImageTextToText
    make_backend("http", base_url="http://host:8000/v1")     any OpenAI-compatible server
    make_backend("vllm", model="mistralai/Pixtral-12B-2409") vLLM's offline LLM.chat
"""

from __future__ import annotations

import difflib
from typing import Any

from .base import Backend, BackendError, Completion

BACKENDS = ("local", "http", "vllm")

__all__ = ["Backend", "BackendError", "Completion", "BACKENDS", "make_backend"]


def make_backend(kind: str | Backend, **kwargs: Any) -> Backend:
    """Build a backend by name ('local', 'http', 'vllm'); a `Backend` instance is returned as is."""
    if isinstance(kind, Backend):
        if kwargs:
            raise ValueError(f"backend is already built ({kind.name}); options {sorted(kwargs)} cannot apply to it.")
        return kind
    if kind == "local":
        from .local import LocalBackend

        return LocalBackend(**kwargs)
    if kind == "http":
        from .http import HTTPBackend

        return HTTPBackend(**kwargs)
    if kind == "vllm":
        from .vllm import VLLMBackend

        return VLLMBackend(**kwargs)
    close = difflib.get_close_matches(str(kind), BACKENDS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown judge backend {kind!r}.{hint} Choose one of {', '.join(BACKENDS)} or pass a Backend.")
