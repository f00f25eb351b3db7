"""Best-of-N sampling: draw N images per prompt with a diffusers pipeline, score them all with a reward on
the same device, keep every score and the top-k.

Images never leave the accelerator between the VAE decoder and the reward: the pipeline is called with
``output_type="pt"`` and the reward scores that tensor directly. Each image has its own seed, so any image
(the winner in particular) can be regenerated from the result alone.

Seeds: image ``j`` of prompt ``i`` uses ``torch.Generator(device).manual_seed(seed + i * n + j)``
(``i`` is the prompt's index in the list passed in; see `image_seed`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .pipelines import PipelineAdapter, check_pipeline

__all__ = ["BestOfNResult", "best_of_n", "image_seed", "pipeline_device", "check_same_device"]


def image_seed(seed: int, prompt_index: int, image_index: int, n: int) -> int:
    """The seed of image `image_index` of prompt `prompt_index` in a run with base `seed` and `n` images/prompt."""
    return int(seed) + int(prompt_index) * int(n) + int(image_index)


def pipeline_device(pipe) -> torch.device:
    """Where the pipeline computes (its execution device when model offloading is on)."""
    dev = getattr(pipe, "_execution_device", None)
    if dev is None:
        dev = pipe.device
    return torch.device(dev)


def pipeline_dtype(pipe) -> str:
    """The pipeline's dtype as a name ('float32', 'bfloat16' ...): diffusers draws the initial noise in it, so
    a replay in another dtype gives another image."""
    return str(getattr(pipe, "dtype", torch.float32)).removeprefix("torch.")


def _canonical(device: torch.device) -> tuple[str, int]:
    device = torch.device(device)
    index = device.index
    if index is None and device.type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device()
    return device.type, index or 0


def check_same_device(pipe, reward) -> torch.device:
    """Raise unless the reward's weights live on the pipeline's device; returns that device.

    Raises:
        ValueError: reward and pipeline are on different devices.
    """
    pdev = pipeline_device(pipe)
    rdev = torch.device(reward.device)
    if _canonical(pdev) != _canonical(rdev):
        raise ValueError(
            f"reward and pipeline must be on the same device (images go from the VAE straight into the reward); "
            f"got pipeline on {pdev} and reward on {rdev}. Move one: `reward.to({str(pdev)!r})` or "
            f"`pipe.to({str(rdev)!r})`, or create the reward with device={str(pdev)!r}."
        )
    return pdev


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings; got a single str {prompts[:40]!r}. Use [prompt].")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt, e.g. prompts=['a photo of a cat'].")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str; got {type(p).__name__}.")
    return prompts


def _check_positive_int(name: str, value: Any, minimum: int = 1, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.{(' ' + hint) if hint else ''}")
    return value


def check_generation(num_inference_steps: Any, height: Any = None, width: Any = None) -> None:
    """Refuse sampler settings diffusers would take and fail on later (0 steps divides by zero inside it,
    negative steps return unsampled noise)."""
    _check_positive_int("num_inference_steps", num_inference_steps, 1, "It is the number of denoising steps.")
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            _check_positive_int(name, value, 8, "It is the image size in pixels (None: the pipeline's default).")


def _check_reward(reward) -> None:
    from reward_plugins.base import RewardModel

    if not isinstance(reward, RewardModel):
        raise TypeError(
            f"reward must be a reward_plugins RewardModel; got {type(reward).__name__}. "
            "Create one with reward_plugins.create_reward('pickscore', device=...)."
        )


def _sync(device: torch.device) -> None:
    # Timings must include queued GPU work, or the reward's share would be attributed to the next call.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class BestOfNResult:
    """Everything a best-of-N run produced. Tensors are on the CPU, indexed (prompt, image).

    Attributes:
        prompts: the P prompts, in order.
        n, k: images per prompt, and how many are selected.
        seeds: (P, N) int64, the seed of every image (see `image_seed`).
        scores: (P, N) float32, the reward's `.scores` (its selected dimension or weighted mix).
        per_dim: every dimension the reward reports, each (P, N) float32.
        ranks: (P, N) int64, 0 = best; ties keep the lower image index first.
        top_indices: (P, k) int64, image indices of the top-k, best first.
        top_images: (P, k, 3, H, W) float32 in [0, 1].
        images: (P, N, 3, H, W) float32 in [0, 1], or None when run with ``keep_images=False``.
        settings: what regenerates an image: pipeline class, steps, guidance, size, seeds, extra kwargs.
        batches: the (prompt, image) pairs of each pipeline call, in order (for bit-exact replay).
        timings: seconds spent in the pipeline (``generate_s``), in the reward (``reward_s``) and in total.
        prompt_indices: the index each prompt's seeds were derived from (0..P-1 unless given).
    """

    prompts: list[str]
    n: int
    k: int
    seeds: torch.Tensor
    scores: torch.Tensor
    per_dim: dict[str, torch.Tensor]
    ranks: torch.Tensor
    top_indices: torch.Tensor
    top_images: torch.Tensor
    images: torch.Tensor | None
    settings: dict[str, Any]
    batches: list[list[tuple[int, int]]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    prompt_indices: list[int] = field(default_factory=list)

    @property
    def best_indices(self) -> torch.Tensor:
        """(P,) image index of each prompt's winner."""
        return self.top_indices[:, 0]

    @property
    def best_images(self) -> torch.Tensor:
        """(P, 3, H, W) the winners."""
        return self.top_images[:, 0]

    @property
    def best_scores(self) -> torch.Tensor:
        """(P,) the winners' scores."""
        return self.scores.gather(1, self.best_indices[:, None])[:, 0]

    @property
    def top_scores(self) -> torch.Tensor:
        """(P, k) the selected images' scores, best first."""
        return self.scores.gather(1, self.top_indices)

    @property
    def reward_fraction(self) -> float:
        """Reward time as a fraction of the run's wall time."""
        total = self.timings.get("total_s", 0.0)
        return self.timings.get("reward_s", 0.0) / total if total > 0 else float("nan")

    def rows(self) -> list[dict[str, Any]]:
        """One flat record per image (prompt, seed, rank, selected, score, every dimension): for JSON/CSV."""
        out = []
        selected = set()
        for i in range(len(self.prompts)):
            selected.update((i, int(j)) for j in self.top_indices[i])
        for i, prompt in enumerate(self.prompts):
            for j in range(self.n):
                row = {
                    "prompt_index": i, "prompt": prompt, "image_index": j, "seed": int(self.seeds[i, j]),
                    "rank": int(self.ranks[i, j]), "selected": (i, j) in selected, "score": float(self.scores[i, j]),
                }
                row.update({d: float(v[i, j]) for d, v in self.per_dim.items()})
                out.append(row)
        return out

    def regenerate(self, pipe, prompt_index: int, image_index: int, *, exact: bool = False) -> torch.Tensor:
        """Generate image `image_index` of prompt `prompt_index` again, (3, H, W) on the pipeline's device.

        With ``exact=False`` the image is generated alone from its recorded seed: identical to the stored one up
        to float rounding when the run used batches (batched matmuls round differently), bit-identical when it
        used ``batch_size=1``. ``exact=True`` replays the whole pipeline call it was part of: bit-identical on
        the same hardware and software.

        Example:
            >>> res = best_of_n(pipe, ["a cat"], reward, n=4)
            >>> img = res.regenerate(pipe, 0, int(res.best_indices[0]))
        """
        if not 0 <= prompt_index < len(self.prompts) or not 0 <= image_index < self.n:
            raise ValueError(
                f"(prompt_index, image_index) must be within ({len(self.prompts)}, {self.n}); "
                f"got ({prompt_index}, {image_index})."
            )
        recorded, now = self.settings.get("dtype"), pipeline_dtype(pipe)
        if recorded is not None and recorded != now:
            warnings.warn(
                f"this result was sampled in {recorded} but the pipeline is now {now}: the initial noise is drawn in "
                f"the pipeline's dtype, so the replayed image differs. Use pipe.to(dtype=torch.{recorded}).",
                stacklevel=2,
            )
        jobs = [(prompt_index, image_index)]
        if exact:
            jobs = next(b for b in self.batches if (prompt_index, image_index) in b)
        images = _generate(pipe, [self.prompts[i] for i, _ in jobs], [int(self.seeds[i, j]) for i, j in jobs],
                           self.settings)
        return images[jobs.index((prompt_index, image_index))]


def _generate(pipe, prompts: list[str], seeds: list[int], settings: Mapping[str, Any]) -> torch.Tensor:
    """One pipeline call: images (B, 3, H, W) in [0, 1] on the pipeline's device."""
    device = pipeline_device(pipe)
    # diffusers accepts one generator per image; each draws its own initial noise, so an image does not
    # depend on which other images share its batch (beyond float rounding).
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    out = pipe(
        prompt=prompts, generator=generators, output_type="latent",
        num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
        height=settings.get("height"), width=settings.get("width"), **(settings.get("pipeline_kwargs") or {}),
    )
    latents = out.images if hasattr(out, "images") else out[0]
    # Decoding ourselves (what output_type="pt" does) keeps it outside any caller's autocast: an fp32 VAE
    # under fp16 autocast would overflow as SDXL's fp16 VAE does.
    ad = PipelineAdapter(pipe)
    with torch.no_grad():  # FLUX returns packed tokens: the adapter unpacks them at the requested size
        return ad.decode(ad.pipeline_latents(latents, settings.get("height"), settings.get("width")))


def _rank(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order best-first, ranks) for (P, N) scores; stable so ties keep the lower index first."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order).contiguous())
    return order, ranks


def best_of_n(
    pipe,
    prompts: Sequence[str],
    reward,
    n: int,
    *,
    k: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    keep_images: bool = True,
    pipeline_kwargs: Mapping[str, Any] | None = None,
    prompt_indices: Sequence[int] | None = None,
) -> BestOfNResult:
    """Sample `n` images per prompt, score every one with `reward`, and select the top `k`.

    Args:
        pipe: a diffusers `StableDiffusionPipeline` (SD 1.x/2.x) or `StableDiffusionXLPipeline`.
        prompts: the prompts (non-empty list of str).
        reward: a `reward_plugins` reward on the pipeline's device; its `.scores` ranks the images.
        n: images per prompt (>= 1).
        k: how many to select per prompt (1 <= k <= n).
        batch_size: images per pipeline call: the memory budget (prompts x N are flattened and chunked).
        seed: base seed; image j of prompt i uses ``seed + i * n + j`` (see `image_seed`).
        num_inference_steps, guidance_scale, height, width: passed to the pipeline (None: its default size).
        progress: show a tqdm bar over images.
        keep_images: keep all P x N images in the result (on the CPU); False keeps only the top-k.
        pipeline_kwargs: extra pipeline arguments (e.g. ``{"negative_prompt": [...]}``), recorded for replay.
        prompt_indices: the indices seeds are derived from (default 0..P-1); pair mining passes global ones.

    Returns:
        A `BestOfNResult` with every score per dimension, ranks, the top-k and the seeds.

    Raises:
        TypeError: unsupported pipeline class, or `reward` is not a RewardModel.
        ValueError: empty prompts, n < 1, k outside [1, n], batch_size < 1, reward on another device.

    Example:
        >>> reward = create_reward("pickscore", device="cuda", dtype="bf16")
        >>> res = best_of_n(pipe, ["a red fox in snow"], reward, n=16, k=2, batch_size=8)
        >>> res.best_images.shape, res.per_dim["pickscore"].shape      # (1, 3, 512, 512), (1, 16)
    """
    family = check_pipeline(pipe)
    _check_reward(reward)
    prompts = _check_prompts(prompts)
    n = _check_positive_int("n", n, 1, "Use n=4 or more for best-of-N.")
    k = _check_positive_int("k", k, 1)
    if k > n:
        raise ValueError(f"k must be <= n (cannot select {k} of {n} images per prompt); got k={k}, n={n}.")
    batch_size = _check_positive_int("batch_size", batch_size, 1, "It is the number of images per pipeline call.")
    check_generation(num_inference_steps, height, width)
    device = check_same_device(pipe, reward)
    if prompt_indices is None:
        prompt_indices = list(range(len(prompts)))
    prompt_indices = [int(i) for i in prompt_indices]
    if len(prompt_indices) != len(prompts):
        raise ValueError(f"prompt_indices has {len(prompt_indices)} entries for {len(prompts)} prompts.")

    settings = {
        "pipeline_class": type(pipe).__name__, "family": family, "dtype": pipeline_dtype(pipe),
        "pipeline": str(getattr(getattr(pipe, "config", {}), "_name_or_path", "") or ""),
        "scheduler": type(pipe.scheduler).__name__, "num_inference_steps": int(num_inference_steps),
        "guidance_scale": float(guidance_scale), "height": height, "width": width, "seed": int(seed), "n": n,
        "seed_rule": "seed + prompt_index * n + image_index", "generator_device": device.type,
        "batch_size": batch_size, "pipeline_kwargs": dict(pipeline_kwargs or {}),
        "reward": getattr(reward, "name", type(reward).__name__), "reward_selection": reward.selection,
        "reward_dimensions": list(reward.dimensions),
    }
    P = len(prompts)
    seeds = torch.tensor([[image_seed(seed, prompt_indices[i], j, n) for j in range(n)] for i in range(P)],
                         dtype=torch.int64)
    jobs = [(i, j) for i in range(P) for j in range(n)]
    batches = [jobs[s : s + batch_size] for s in range(0, len(jobs), batch_size)]

    scores = torch.empty(P, n)
    per_dim: dict[str, torch.Tensor] = {}
    store: dict[int, torch.Tensor] = {}     # prompt -> (N, 3, H, W) on the CPU, until the prompt is complete
    filled = [0] * P
    all_images: torch.Tensor | None = None
    top_images: torch.Tensor | None = None
    top_indices = torch.empty(P, k, dtype=torch.int64)
    t_gen = t_rew = 0.0

    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), unit="img", desc="best-of-N", disable=not progress, leave=False)
    # The pipeline's own per-call bar would print once per batch; silence it for the run and restore it.
    saved_bar_cfg = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(**{**saved_bar_cfg, "disable": True})
    t_start = time.perf_counter()
    try:
        for batch in batches:
            t0 = time.perf_counter()
            with torch.no_grad():
                images = _generate(pipe, [prompts[i] for i, _ in batch], [int(seeds[i, j]) for i, j in batch], settings)
            _sync(device)
            t1 = time.perf_counter()
            out = reward.score(images, [prompts[i] for i, _ in batch])
            _sync(device)
            t2 = time.perf_counter()
            t_gen += t1 - t0
            t_rew += t2 - t1
            s_cpu = out.scores.float().cpu()
            d_cpu = {d: v.float().cpu() for d, v in out.per_dim.items()}
            images = images.detach().float().cpu()
            for b, (i, j) in enumerate(batch):
                scores[i, j] = s_cpu[b]
                for d, v in d_cpu.items():
                    per_dim.setdefault(d, torch.empty(P, n))[i, j] = v[b]
                if i not in store:
                    store[i] = torch.empty(n, *images.shape[1:])
                store[i][j] = images[b]
                filled[i] += 1
                if filled[i] == n:
                    order = torch.sort(scores[i], descending=True, stable=True).indices[:k]
                    top_indices[i] = order
                    if top_images is None:
                        top_images = torch.empty(P, k, *images.shape[1:])
                    top_images[i] = store[i][order]
                    if keep_images:
                        if all_images is None:
                            all_images = torch.empty(P, n, *images.shape[1:])
                        all_images[i] = store[i]
                    del store[i]
            bar.update(len(batch))
    finally:
        pipe.set_progress_bar_config(**saved_bar_cfg)
        bar.close()
    total = time.perf_counter() - t_start
    _, ranks = _rank(scores)
    return BestOfNResult(
        prompts=prompts, n=n, k=k, seeds=seeds, scores=scores, per_dim=per_dim, ranks=ranks,
        top_indices=top_indices, top_images=top_images, images=all_images, settings=settings, batches=batches,
        timings={"generate_s": t_gen, "reward_s": t_rew, "total_s": total,
                 "images": float(len(jobs)), "images_per_s": len(jobs) / total if total > 0 else math.nan},
        prompt_indices=prompt_indices,
    )
