"""Requests in OpenAI chat-message form: a system message, then the user turn (text, and images as base64
data URLs with an "Image k:" separator before each).

Three shapes, by template kind: a prompt alone (`prompt_*`), one image (`captioning_*`), or a prompt with a
list of images (`annotation_*`). The same messages go to every backend: HTTP servers receive them as JSON,
the local and vLLM backends decode the data URLs back into images, so every backend sees the same pixels.

Example:
    >>> from reward_plugins.judge import load_templates
    >>> req = build_request(load_templates()["prompt_classification"], prompt="a red fox in the snow")
    >>> [m["role"] for m in req.messages]
    ['system', 'user']
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from PIL import Image

from .templates import Template

ImageLike = Union["Image.Image", bytes, str, os.PathLike, Any]  # Any: a (3, H, W) float tensor in [0, 1]
DATA_URL_PREFIX = "data:image/"


@dataclass(frozen=True)
class ChatRequest:
    """One request: the template it uses, its messages, and how many images it carries."""

    template: str
    messages: list[dict[str, Any]]
    num_images: int
    answer_key: str | None = None

    @property
    def key(self) -> str:
        """A content hash: the same template, prompt and image bytes give the same key (used to resume)."""
        blob = json.dumps([self.template, self.messages], sort_keys=True, ensure_ascii=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


def to_pil(image: ImageLike) -> Image.Image:
    """A PIL image, a path, encoded bytes or a (3, H, W) float tensor in [0, 1] -> an RGB PIL image."""
    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, (bytes, bytearray)):
        pil = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file {str(image)!r} not found.")
        pil = Image.open(image)
    elif hasattr(image, "ndim") and hasattr(image, "shape"):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"a tensor image must have shape (3, H, W); got {tuple(image.shape)}.")
        from reward_plugins.preprocess import tensor_to_pil

        pil = tensor_to_pil(image)
    else:
        raise TypeError(f"an image must be a PIL image, a path, encoded bytes or a (3, H, W) tensor; got {type(image).__name__}.")
    return pil if pil.mode == "RGB" else pil.convert("RGB")


def image_data_url(image: ImageLike, image_format: str = "jpeg", quality: int = 75) -> str:
    """Encode an image as a base64 data URL. JPEG at PIL's default quality 75 is what LePref sends."""
    fmt = image_format.lower()
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png'; got {image_format!r}.")
    buf = io.BytesIO()
    pil = to_pil(image)
    if fmt == "jpeg":
        pil.save(buf, format="JPEG", quality=quality)
    else:
        pil.save(buf, format="PNG")
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def decode_data_url(url: str) -> Image.Image:
    """A base64 image data URL -> an RGB PIL image."""
    if not url.startswith(DATA_URL_PREFIX) or ";base64," not in url:
        raise ValueError(f"expected a base64 image data URL ('data:image/...;base64,...'); got {url[:40]!r}.")
    raw = base64.b64decode(url.split(";base64,", 1)[1])
    return Image.open(io.BytesIO(raw)).convert("RGB")


def build_request(
    template: Template,
    prompt: str | None = None,
    images: Sequence[ImageLike] | ImageLike | None = None,
    *,
    image_format: str = "jpeg",
    jpeg_quality: int = 75,
) -> ChatRequest:
    """The chat messages for one request of `template`.

    Args:
        template: a `Template` (from `load_templates()`).
        prompt: the text-to-image prompt (prompt and annotation templates).
        images: one image (captioning) or a list (annotation); none for prompt templates.

    Raises:
        ValueError: a prompt template given images, an image template given none or several, an annotation
            without a prompt or images, an empty or non-string prompt.
    """
    kind = template.kind
    if images is not None and not isinstance(images, (list, tuple)):
        images = [images]
    images = list(images) if images is not None else []
    if kind == "prompt":
        if images:
            raise ValueError(
                f"template {template.name!r} reads a prompt only; got {len(images)} image(s). Use an annotation_* "
                "template to rate images against a prompt, or a captioning_* template to describe one image."
            )
        _check_prompt(template.name, prompt)
        user: Any = prompt
    elif kind == "image":
        if len(images) != 1:
            raise ValueError(f"template {template.name!r} describes exactly one image; got {len(images)}.")
        user = [{"type": "text", "text": template.image_separator.format(k=1)}, _image_part(images[0], image_format, jpeg_quality)]
    else:
        _check_prompt(template.name, prompt)
        if not images:
            raise ValueError(f"template {template.name!r} rates a prompt's images; got no images.")
        user = [{"type": "text", "text": template.input_format.format(prompt=prompt)}]
        for k, img in enumerate(images, start=1):
            user.append({"type": "text", "text": template.image_separator.format(k=k)})
            user.append(_image_part(img, image_format, jpeg_quality))
    messages = [
        {"role": "system", "content": template.system_text(len(images))},
        {"role": "user", "content": user},
    ]
    return ChatRequest(template.name, messages, len(images), template.answer_key)


def _check_prompt(name: str, prompt: Any) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"template {name!r} needs a non-empty prompt string; got {prompt!r}.")


def _image_part(image: ImageLike, image_format: str, quality: int) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": image_data_url(image, image_format, quality)}}


def to_hf_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """OpenAI messages -> transformers chat messages (content lists, images as PIL) and the images in order."""
    out, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = []
            for c in content:
                if c.get("type") == "image_url":
                    img = decode_data_url(c["image_url"]["url"])
                    images.append(img)
                    parts.append({"type": "image", "image": img})
                else:
                    parts.append({"type": "text", "text": c["text"]})
        out.append({"role": m["role"], "content": parts})
    return out, images


def count_images(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if not isinstance(m["content"], str) for c in m["content"] if c.get("type") == "image_url")
