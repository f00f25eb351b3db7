"""Batched scoring of one set's images by several rewards: decoded once, in worker processes, cached.

Each image is decoded by a `torch.utils.data.DataLoader` worker (PIL, uint8 over the process boundary),
images of one shape are stacked into a batch on the reward's device, and every reward that has not scored
that image yet (its `ScoreCache`) scores the same decoded batch. Two selections of one reward
(``lescore:fidelity`` and ``lescore:alignment``) share one model, one forward pass and one cache.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import ScoreCache, reward_fingerprint, unit_key
from .data import ImageRef


def decode_image(ref: ImageRef) -> torch.Tensor:
    """An `ImageRef` -> (3, H, W) uint8 RGB tensor."""
    import numpy as np
    from PIL import Image

    src = io.BytesIO(ref.data) if ref.data is not None else ref.path
    with Image.open(src) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1)


class _Decode(torch.utils.data.Dataset):
    def __init__(self, refs: Sequence[ImageRef], indices: Sequence[int]) -> None:
        self.refs, self.indices = refs, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        try:
            return idx, decode_image(self.refs[idx]), None
        except Exception as e:  # noqa: BLE001 — a bad file is counted and reported, not fatal
            return idx, None, f"{type(e).__name__}: {e}"


def _worker_init(_: int) -> None:
    # Decoding is single-threaded work; torch threads in every worker would only oversubscribe the cores.
    torch.set_num_threads(1)


@dataclass
class LoadedReward:
    """A reward model under one base name, its cache and whether it reads prompts."""

    base: str
    model: Any
    cache: ScoreCache
    options: dict = field(default_factory=dict)

    @property
    def uses_prompt(self) -> bool:
        return bool(getattr(self.model, "requires_prompts", True))

    def key(self, ref: ImageRef, prompt: str) -> str:
        return unit_key(ref.key, prompt, self.uses_prompt)


def load_reward(base: str, model: Any = None, cache_dir: str | os.PathLike | None = None,
                device: str | torch.device | None = None, dtype: Any = None, **options: Any) -> LoadedReward:
    """Build (or wrap) a reward and open its score cache."""
    if model is None:
        from reward_plugins import create_reward

        model = create_reward(base, device=device, dtype=dtype, **options)
    fp = reward_fingerprint(model, base, options)
    meta = {"options": {k: str(v) for k, v in options.items()}, "dtype": str(getattr(model, "dtype", "")),
            "dimensions": list(getattr(model, "dimensions", ()))}
    return LoadedReward(base, model, ScoreCache(cache_dir, base, fp, meta), dict(options))


@dataclass
class ScoringStats:
    """What one scoring pass did.

    Attributes:
        decoded: images decoded; scored: {reward: images it scored now}; cached: {reward: images found
        in its cache}; failed: {image index: error} for files that could not be read; seconds: wall time.
    """

    decoded: int = 0
    scored: dict[str, int] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0


def score_images(
    rewards: Mapping[str, LoadedReward], refs: Sequence[ImageRef], prompts: Sequence[str],
    indices: Sequence[int] | None = None, batch_size: int = 16, workers: int = 0, progress: bool = True,
    strict: bool = False,
) -> ScoringStats:
    """Score images `indices` of `refs` (with their `prompts`) by every reward, filling their caches.

    Args:
        rewards: {base name: LoadedReward}.
        refs, prompts: one prompt per image.
        indices: which images (default all).
        batch_size: images per reward call (per shape).
        workers: decoding worker processes (0: decode in this process).
        progress: show a tqdm bar.
        strict: raise on the first unreadable image instead of counting it.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    if workers < 0:
        raise ValueError(f"workers must be >= 0; got {workers}.")
    t0 = time.perf_counter()
    indices = list(range(len(refs))) if indices is None else list(indices)
    stats = ScoringStats(scored={n: 0 for n in rewards}, cached={n: 0 for n in rewards})
    # Units that need scoring, by image: an image used with several prompts is decoded once.
    need: dict[str, list[int]] = {}
    for i in indices:
        missing = [n for n, r in rewards.items() if r.key(refs[i], prompts[i]) not in r.cache]
        for n in rewards:
            if n not in missing:
                stats.cached[n] += 1
        if missing:
            need.setdefault(refs[i].key, []).append(i)
    if need:
        first = [v[0] for v in need.values()]
        loader = torch.utils.data.DataLoader(
            _Decode(refs, first), batch_size=batch_size, num_workers=workers, collate_fn=list,
            worker_init_fn=_worker_init if workers else None, persistent_workers=False,
        )
        bar = tqdm(total=len(first), desc="scoring", unit="img", disable=not progress)
        for batch in loader:
            good = []
            for idx, img, err in batch:
                if img is None:
                    if strict:
                        raise FileNotFoundError(f"cannot read image {refs[idx].name}: {err} (strict mode).")
                    for j in need[refs[idx].key]:
                        stats.failed[j] = err
                else:
                    good.extend((j, img) for j in need[refs[idx].key])
            stats.decoded += len(batch) - sum(1 for _, img, _ in batch if img is None)
            by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
            for idx, img in good:
                by_shape.setdefault(tuple(img.shape), []).append((idx, img))
            for items in by_shape.values():
                for s in range(0, len(items), batch_size):
                    _score_batch(rewards, refs, prompts, items[s:s + batch_size], stats)
            bar.update(len(batch))
        bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats


@torch.no_grad()
def _score_batch(rewards: Mapping[str, LoadedReward], refs, prompts, items, stats: ScoringStats) -> None:
    stacked = torch.stack([img for _, img in items])
    for name, r in rewards.items():
        todo: dict[str, int] = {}
        for pos, (idx, _) in enumerate(items):
            k = r.key(refs[idx], prompts[idx])
            if k not in r.cache and k not in todo:
                todo[k] = pos
        if not todo:
            continue
        pos = torch.tensor(list(todo.values()))
        images = stacked[pos].to(r.model.device).float().div_(255)
        batch_prompts = [prompts[items[p][0]] for p in todo.values()]
        out = r.model.score(images, batch_prompts if r.uses_prompt else None)
        per_dim = {d: v.float().cpu().tolist() for d, v in (out.per_dim or {"score": out.scores}).items()}
        r.cache.put({k: {d: vals[j] for d, vals in per_dim.items()} for j, k in enumerate(todo)})
        stats.scored[name] += len(todo)


def selected_scores(r: LoadedReward, refs: Sequence[ImageRef], prompts: Sequence[str], indices: Sequence[int],
                    dimension: str | None = None) -> torch.Tensor:
    """(len(indices),) float64 scores from the cache: `dimension`, or the reward's own selection.

    Images without a cached score (unreadable files) get NaN.
    """
    mix = {dimension: 1.0} if dimension is not None else dict(getattr(r.model, "selection", {}) or {})
    out = torch.full((len(indices),), float("nan"), dtype=torch.float64)
    for j, i in enumerate(indices):
        row = r.cache.get(r.key(refs[i], prompts[i]))
        if row is None:
            continue
        if not mix or any(k not in row for k in mix):
            if "score" in row and len(row) == 1:
                out[j] = row["score"]
                continue
            raise ValueError(f"reward {r.base!r} has no dimension {sorted(set(mix) - set(row))} (it reports {sorted(row)}).")
        total = sum(mix.values())
        out[j] = sum(w * row[k] for k, w in mix.items()) / total
    return out
