"""vLLM's offline engine (`LLM.chat`), as LePref runs Pixtral-12B. Needs the `vllm` package (GPU machines).

Example:
    >>> backend = VLLMBackend("mistralai/Pixtral-12B-2409", tokenizer_mode="mistral", max_model_len=32648)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..requests import ChatRequest
from .base import DEFAULT_MAX_IMAGES, Backend, BackendError, Completion


class VLLMBackend(Backend):
    """Batched generation in-process with vLLM; `llm_options` go to `vllm.LLM` (e.g. tokenizer_mode)."""

    def __init__(self, model: str, *, max_images: int | None = DEFAULT_MAX_IMAGES, **llm_options: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise BackendError(
                f"backend 'vllm' needs the vllm package, which is not importable here ({e}); install it on a GPU "
                "machine (`pip install vllm`) or use backend='http' against a `vllm serve` server."
            ) from e
        self.name = f"vllm:{model}"
        self.max_images = max_images
        if max_images is not None:
            llm_options.setdefault("limit_mm_per_prompt", {"image": max_images})
        self.llm = LLM(model=model, **llm_options)

    def generate(self, requests: Sequence[ChatRequest], max_new_tokens: int, temperature: float = 0.0) -> list[Completion]:
        from vllm import SamplingParams

        for r in requests:
            self.check_request(r)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature)
        outs = self.llm.chat([r.messages for r in requests], params, use_tqdm=False)
        return [
            Completion(o.outputs[0].text, len(o.prompt_token_ids or []), len(o.outputs[0].token_ids or []))
            for o in outs
        ]
