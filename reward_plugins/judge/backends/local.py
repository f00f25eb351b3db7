"""Local generation with transformers: `AutoModelForImageTextToText` + `AutoProcessor` (Pixtral/LLaVA,
Qwen2.5-VL, LLaVA-family...), batched greedy generation with left padding on the model's device.

Example:
    >>> backend = LocalBackend("Qwen/Qwen2.5-VL-7B-Instruct", device="cuda", dtype="bf16", batch_size=8)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..constraints import ScoreFormat, TokenIndex, allowed_tokens, score_skeleton
from ..requests import ChatRequest, to_hf_messages
from ..templates import template_kind
from .base import DEFAULT_MAX_IMAGES, Backend, Completion, check_positive


class LocalBackend(Backend):
    """Generate with a transformers vision-language model in this process.

    Args:
        model: a model dir or hub id, or a loaded model (then pass `processor` too).
        processor: the model's processor (loaded from `model` when it is a path).
        device, dtype: where and in what precision to run (a path is loaded in `dtype`).
        batch_size: requests generated together (left-padded); 1 = one at a time.
        max_images: most images per request.
        constrained: constrain annotation answers to their JSON format (see `reward_plugins.judge.constraints`).
    """

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module,
        processor: Any = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        batch_size: int = 8,
        max_images: int | None = DEFAULT_MAX_IMAGES,
        constrained: bool = False,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from reward_plugins.registry import resolve_dtype

        check_positive("batch_size", batch_size)
        if isinstance(model, (str, os.PathLike)):
            self.name = f"local:{os.fspath(model)}"
            processor = processor or AutoProcessor.from_pretrained(os.fspath(model))
            model = AutoModelForImageTextToText.from_pretrained(os.fspath(model), dtype=resolve_dtype(dtype))
        else:
            if processor is None:
                raise ValueError("a loaded model needs its processor: pass processor=AutoProcessor.from_pretrained(...).")
            self.name = f"local:{type(model).__name__}"
            if dtype is not None:
                model = model.to(resolve_dtype(dtype))
        self.model = model.to(device).eval().requires_grad_(False)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # Decoder-only generation appends to the right end of every row: pad on the left.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = int(batch_size)
        self.max_images = max_images
        self.constrained = bool(constrained)
        self._index: TokenIndex | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, requests: Sequence[ChatRequest], max_new_tokens: int, temperature: float = 0.0) -> list[Completion]:
        for r in requests:
            self.check_request(r)
        out: list[Completion] = []
        for start in range(0, len(requests), self.batch_size):
            out += self._generate_batch(list(requests[start : start + self.batch_size]), max_new_tokens, temperature)
        return out

    def _formats(self, batch: list[ChatRequest]) -> list[ScoreFormat | None]:
        if not self.constrained:
            return [None] * len(batch)
        if self._index is None:
            self._index = TokenIndex(self.tokenizer)
        return [
            ScoreFormat(score_skeleton(r.answer_key or r.template.removeprefix("annotation_"), r.num_images))
            if template_kind(r.template) == "annotation" else None
            for r in batch
        ]

    @torch.no_grad()
    def _generate_batch(self, batch: list[ChatRequest], max_new_tokens: int, temperature: float) -> list[Completion]:
        conversations = [to_hf_messages(r.messages)[0] for r in batch]
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True},
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        prompt_len = inputs["input_ids"].shape[1]
        formats = self._formats(batch)
        kwargs: dict[str, Any] = {}
        if any(f is not None for f in formats):
            vocab = list(range(len(self.tokenizer)))

            def allowed(row: int, ids: torch.Tensor) -> list[int]:
                fmt = formats[row]
                if fmt is None:
                    return vocab
                text = self.tokenizer.decode(ids[prompt_len:], skip_special_tokens=True)
                return allowed_tokens(fmt, self._index, text)

            kwargs["prefix_allowed_tokens_fn"] = allowed
        sample = temperature > 0
        gen = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
            top_p=None, top_k=None, pad_token_id=self.tokenizer.pad_token_id, **kwargs,
        )
        new = gen[:, prompt_len:]
        eos = self.tokenizer.eos_token_id
        results = []
        for row in range(len(batch)):
            ids = new[row].tolist()
            n = len(ids)
            if eos in ids:
                n = ids.index(eos) + 1
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
            results.append(Completion(text, int(inputs["attention_mask"][row].sum()), n))
        return results
