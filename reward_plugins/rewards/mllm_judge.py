"""A multimodal LLM as a reward: LePref's annotation templates, scores 0-100 per dimension.

The judge sees the images as encoded pictures (JPEG data URLs, as LePref sends them), so no gradient
reaches the images: `is_differentiable = False`. Use it where scores are enough: best-of-N, pair mining,
the evaluation harness, policy-gradient training.

Images are scored list-wise as LePref does: a prompt's images go in one request (in batch order, up to
`max_images_per_request`, then split over several requests); `listwise=False` asks about each image alone.
Each dimension in `dimensions` is one request per group (pass ``dimensions=["alignment"]`` to pay for one).
An answer that still cannot be read after the judge's retries raises (default) or gives NaN with
``on_failure="nan"``, the failed requests kept in `reward.failures`; never a made-up 0.

Example:
    >>> reward = create_reward("mllm-judge", backend="http", base_url="http://127.0.0.1:8000/v1",
    ...                        dimension="aesthetic")                                        # doctest: +SKIP
    >>> reward.score(images, prompts).scores                                                 # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..base import RewardModel
from ..judge.judge import Cost, Judge, Outcome
from ..judge.templates import DIMENSIONS, SCORE_RANGE
from ..registry import register_reward

FAILURE_MODES = ("raise", "nan")


class MLLMJudgeReward(RewardModel):
    """Scores from a VLM judge; `per_dim` holds every dimension in `dimensions`, each 0-100."""

    dimensions = DIMENSIONS
    default_dimension = "alignment"
    is_differentiable = False
    requires_prompts = True
    score_range = SCORE_RANGE

    def __init__(
        self,
        judge: Judge,
        dimensions: Sequence[str] | None = None,
        *,
        listwise: bool = True,
        max_images_per_request: int | None = None,
        on_failure: str = "raise",
    ) -> None:
        super().__init__()
        dims = tuple(dimensions) if dimensions is not None else DIMENSIONS
        bad = [d for d in dims if d not in DIMENSIONS]
        if bad or not dims or len(set(dims)) != len(dims):
            raise ValueError(f"dimensions must be distinct names among {list(DIMENSIONS)}; got {list(dims)}.")
        if on_failure not in FAILURE_MODES:
            raise ValueError(f"on_failure must be one of {FAILURE_MODES}; got {on_failure!r}.")
        limit = max_images_per_request if max_images_per_request is not None else judge.backend.max_images
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"max_images_per_request must be an int >= 1; got {max_images_per_request!r}.")
        backend_limit = judge.backend.max_images
        if limit is not None and backend_limit is not None and limit > backend_limit:
            raise ValueError(
                f"max_images_per_request={limit} is more than backend {judge.backend.name} accepts ({backend_limit}); "
                f"lower it to <= {backend_limit} or raise the backend's max_images."
            )
        # Instance attributes: the reward reports only the dimensions it asks for.
        self.dimensions = dims
        self.default_dimension = "alignment" if "alignment" in dims else dims[0]
        self._mix = {self.default_dimension: 1.0}
        self.judge = judge
        self.listwise = bool(listwise)
        self.max_images_per_request = limit
        self.on_failure = on_failure
        self.failures: list[Outcome] = []
        self.cost = Cost()
        # A local model is a submodule, so `.to(device, dtype)` on the reward moves the VLM too.
        vlm = getattr(judge.backend, "model", None)
        self.vlm = vlm if isinstance(vlm, torch.nn.Module) else None
        # A served judge has no weights here; this empty buffer records where `.to()` put the reward, so
        # best-of-N and pair mining see it on the pipeline's device.
        self.register_buffer("_placement", torch.zeros(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.vlm.device if self.vlm is not None else self._placement.device

    def _groups(self, prompts: list[str]) -> list[list[int]]:
        if not self.listwise:
            return [[i] for i in range(len(prompts))]
        by_prompt: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            by_prompt.setdefault(p, []).append(i)
        step = self.max_images_per_request or len(prompts)
        return [idx[s : s + step] for idx in by_prompt.values() for s in range(0, len(idx), step)]

    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        groups = self._groups(prompts)
        pics = images.detach().float().cpu()
        self.failures = []
        per_dim = {}
        for dim in self.dimensions:
            reqs = [self.judge.request(f"annotation_{dim}", prompts[g[0]], [pics[i] for i in g]) for g in groups]
            outcomes = self.judge.run(reqs)
            scores = torch.full((len(prompts),), float("nan"))
            for g, o in zip(groups, outcomes):
                self.cost.add(o)
                if o.ok:
                    scores[g] = torch.tensor(o.result.scores)
                else:
                    self.failures.append(o)
            per_dim[dim] = scores.to(images.device)
        if self.failures and self.on_failure == "raise":
            o = self.failures[0]
            raise RuntimeError(
                f"the judge could not score {len(self.failures)} request(s); first: {o.template} with {o.num_images} "
                f"image(s) after {o.attempts} attempt(s): {o.error}; last answer {o.raw[-1][:200] if o.raw else ''!r}. "
                "Pass on_failure='nan' to get NaN for those images instead (see reward.failures)."
            )
        return per_dim


def _backend_kwargs(backend: str, model: Any, base_url: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(options or {})
    if backend == "http":
        if base_url is None:
            raise ValueError("backend='http' needs base_url= (e.g. 'http://127.0.0.1:8000/v1').")
        opts.update(base_url=base_url, model=model)
    else:
        if base_url is not None:
            raise ValueError(f"base_url= is for backend='http'; got backend={backend!r}.")
        if model is None:
            raise ValueError(f"backend={backend!r} needs model= (a model dir or hub id).")
        opts["model"] = model
    return opts


@register_reward("mllm-judge", aliases=("vlm-judge",))
def mllm_judge(
    backend: str = "http",
    model: Any = None,
    base_url: str | None = None,
    templates: str | None = None,
    faithful: bool | None = None,
    dimensions: Sequence[str] | None = None,
    listwise: bool = True,
    max_images_per_request: int | None = None,
    max_new_tokens: int | None = None,
    max_retries: int = 2,
    on_failure: str = "raise",
    backend_options: dict[str, Any] | None = None,
) -> MLLMJudgeReward:
    """A VLM judge (local transformers, an OpenAI-compatible server, or vLLM) on LePref's annotation templates."""
    judge = Judge(backend, templates, faithful=faithful, max_retries=max_retries, max_new_tokens=max_new_tokens,
                  backend_options=_backend_kwargs(backend, model, base_url, backend_options))
    return MLLMJudgeReward(judge, dimensions, listwise=listwise, max_images_per_request=max_images_per_request,
                           on_failure=on_failure)


@register_reward("mllm-judge-tiny", tiny=True)
def mllm_judge_tiny(seed: int = 0, dimensions: Sequence[str] | None = None, listwise: bool = True,
                    max_images_per_request: int | None = None, batch_size: int = 8) -> MLLMJudgeReward:
    """A random tiny LLaVA through the local backend, its answers constrained to the JSON format (offline)."""
    from ..judge.backends.local import LocalBackend
    from ..judge.tiny import tiny_vlm

    model, processor = tiny_vlm(seed)
    judge = Judge(LocalBackend(model, processor, batch_size=batch_size, constrained=True), max_retries=0)
    return MLLMJudgeReward(judge, dimensions, listwise=listwise, max_images_per_request=max_images_per_request)
