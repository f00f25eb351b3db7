"""Answers -> typed results. Tolerant of what models wrap around JSON (code fences, a sentence before or
after, Python-style True/False), strict about what the answer must contain: a missing image, a score that
is not a number or lies outside 0-100, or an unknown category raises `AnswerError` with the raw text, so a
bad answer is retried and then recorded as a failure, never read as a score of 0.

Example:
    >>> parse_answer("annotation_aesthetic", '```json\\n{"image_1": {"aesthetic": 71}}\\n```', num_images=1)
    ImageScores(dimension='aesthetic', scores=[71.0], key='aesthetic')
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Union

from .templates import ANSWER_KEYS, CATEGORIES, SCORE_RANGE, check_template_type, template_kind


class AnswerError(ValueError):
    """An answer that cannot be read as the template's format. `raw` is the model's text."""

    def __init__(self, reason: str, raw: str) -> None:
        super().__init__(f"{reason}; answer was {raw[:200]!r}")
        self.reason = reason
        self.raw = raw


@dataclass(frozen=True)
class PromptParts:
    image_content: str
    magic_words: list[str]
    artistic_style: list[str]
    visual_properties: list[str]


@dataclass(frozen=True)
class NSFWVerdict:
    nsfw: bool


@dataclass(frozen=True)
class Category:
    category: str


@dataclass(frozen=True)
class Caption:
    prompt: str


@dataclass(frozen=True)
class ImageDescription:
    image_content: str
    artistic_style: str
    visual_properties: str


@dataclass(frozen=True)
class ImageScores:
    """Per-image scores of one annotation answer, in image order. `key` is the key they were read from."""

    dimension: str
    scores: list[float] = field(default_factory=list)
    key: str = ""


Answer = Union[PromptParts, NSFWVerdict, Category, Caption, ImageDescription, ImageScores]
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)


def extract_json(text: str) -> dict[str, Any]:
    """The first JSON object in `text` (inside a code fence if there is one).

    Raises:
        AnswerError: no JSON object can be read.
    """
    if not isinstance(text, str):
        raise AnswerError(f"answer must be text; got {type(text).__name__}", repr(text))
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    dec = json.JSONDecoder()
    for cand in candidates:
        for variant in (cand, _pythonish(cand)):
            for i, ch in enumerate(variant):
                if ch != "{":
                    continue
                try:
                    obj, _ = dec.raw_decode(variant, i)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    return obj
    raise AnswerError("no JSON object found", text)


def _pythonish(text: str) -> str:
    # Models sometimes answer in Python literal style; map the common differences, nothing more.
    return re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", text)))


def _str(obj: dict, key: str, raw: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise AnswerError(f"missing or non-string {key!r}", raw)
    return v.strip()


def _str_list(obj: dict, key: str, raw: str) -> list[str]:
    v = obj.get(key)
    if isinstance(v, str):
        return [v.strip()] if v.strip() else []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise AnswerError(f"missing or non-list {key!r}", raw)
    return [x.strip() for x in v]


def _category(value: Any, raw: str) -> str:
    norm = {re.sub(r"[^a-z]", "", c.lower().replace("&", "and")): c for c in CATEGORIES}
    key = re.sub(r"[^a-z]", "", str(value).lower().replace("&", "and"))
    if key not in norm:
        raise AnswerError(f"category {value!r} is not one of {list(CATEGORIES)}", raw)
    return norm[key]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*100)?\s*", value)
        return float(m.group(1)) if m else None
    return None


def _image_score(entry: Any, key: str) -> tuple[float | None, str]:
    if isinstance(entry, dict):
        if key in entry:
            return _number(entry[key]), key
        nums = [(k, _number(v)) for k, v in entry.items() if _number(v) is not None]
        # One number under another key (e.g. "alignment" where "aesthetic" was asked): the score, whatever its name.
        if len(nums) == 1:
            return nums[0][1], nums[0][0]
        return None, key
    return _number(entry), ""


def parse_scores(obj: dict[str, Any], dimension: str, key: str, num_images: int, raw: str) -> ImageScores:
    """Read {"image_1": {key: s}, ...} for images 1..num_images."""
    lo, hi = SCORE_RANGE
    scores, used = [], set()
    for k in range(1, num_images + 1):
        entry = obj.get(f"image_{k}", obj.get(f"Image {k}", obj.get(f"image {k}")))
        if entry is None:
            raise AnswerError(f"no score for image_{k} (expected {num_images} images)", raw)
        s, found = _image_score(entry, key)
        if s is None or not math.isfinite(s):
            raise AnswerError(f"image_{k} has no numeric {key!r} score", raw)
        if not lo <= s <= hi:
            raise AnswerError(f"image_{k} score {s:g} is outside {lo:g}-{hi:g}", raw)
        scores.append(s)
        used.add(found)
    return ImageScores(dimension, scores, "/".join(sorted(u for u in used if u)))


def parse_answer(template_type: str, text: str, num_images: int = 0, answer_key: str | None = None) -> Answer:
    """Parse one answer of `template_type` into its typed result.

    Args:
        template_type: one of the eight types.
        text: the model's answer.
        num_images: images in the request (annotation types: every one must be scored).
        answer_key: the per-image key the template asked for (default: the dimension name).

    Raises:
        AnswerError: the answer does not match the format.
        ValueError: unknown template type.
    """
    name = check_template_type(template_type)
    obj = extract_json(text)
    kind = template_kind(name)
    if kind == "annotation":
        dim = name.removeprefix("annotation_")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1 for {name!r}; got {num_images}.")
        return parse_scores(obj, dim, answer_key or dim, num_images, text)
    if name == "prompt_processing":
        return PromptParts(_str(obj, "image_content", text), *(_str_list(obj, k, text) for k in ANSWER_KEYS[name][1:]))
    if name == "prompt_NSFW_filtering":
        key = next((k for k in obj if k.lower().replace("_", " ") in ("nsfw detected", "nsfw")), None)
        v = obj.get(key) if key else None
        if isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no"):
            v = v.strip().lower() in ("true", "yes")
        if not isinstance(v, bool):
            raise AnswerError("missing boolean 'NSFW Detected'", text)
        return NSFWVerdict(v)
    if name == "prompt_classification":
        return Category(_category(obj.get("category"), text))
    if name == "captioning_coco_image":
        return Caption(_str(obj, "prompt", text))
    return ImageDescription(*(_str(obj, k, text) for k in ANSWER_KEYS[name]))


def answer_to_dict(answer: Answer) -> dict[str, Any]:
    """A typed result as a JSON-ready dict (for the JSONL outputs)."""
    from dataclasses import asdict

    return {"type": type(answer).__name__, **asdict(answer)}
