"""LePref's MLLM annotation: the eight template types, requests, parsing, backends and the judge.

    from reward_plugins.judge import Judge, make_backend
    judge = Judge(make_backend("http", base_url="http://127.0.0.1:8000/v1"))
    [out] = judge.run([judge.request("annotation_aesthetic", "a red fox in the snow", images)])
    out.result.scores if out.ok else out.error

Backends are imported only when built (`make_backend`); nothing here needs vllm or a server at import.
"""

from .backends import BACKENDS, Backend, BackendError, Completion, make_backend
from .judge import Cost, Judge, Outcome
from .parsing import (
    AnswerError,
    Caption,
    Category,
    ImageDescription,
    ImageScores,
    NSFWVerdict,
    PromptParts,
    extract_json,
    parse_answer,
)
from .requests import ChatRequest, build_request, image_data_url
from .templates import CATEGORIES, DIMENSIONS, TEMPLATE_TYPES, Template, TemplateSet, load_templates

__all__ = [
    "BACKENDS", "Backend", "BackendError", "Completion", "make_backend", "Cost", "Judge", "Outcome", "AnswerError",
    "Caption", "Category", "ImageDescription", "ImageScores", "NSFWVerdict", "PromptParts", "extract_json",
    "parse_answer", "ChatRequest", "build_request", "image_data_url", "CATEGORIES", "DIMENSIONS", "TEMPLATE_TYPES",
    "Template", "TemplateSet", "load_templates",
]
