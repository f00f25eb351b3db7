"""Dynamic batching: concurrent requests merged into one forward pass, scored once, split back.

Requests wait in an asyncio queue. The worker takes the first one, then keeps taking more until the
batch holds `max_batch_size` images or `max_wait_ms` has passed since it started collecting, scores
the batch on one model thread (so the event loop keeps accepting and decoding requests meanwhile),
and resolves every request's future with its own slice. Images of different sizes cannot share a
tensor, so a batch is scored as one forward pass per image size.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from reward_plugins.base import RewardOutput

from .limits import ServeLimits

ScoreFn = Callable[[torch.Tensor, list[str]], RewardOutput]


@dataclass
class Scores:
    """One request's answer: the served selection and every dimension, as python floats."""

    scores: list[float]
    per_dim: dict[str, list[float]]


class Overloaded(Exception):
    """The queue is full or the server is shutting down; the client should retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Job:
    images: list[torch.Tensor]
    prompts: list[str]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


_STOP = object()


class DynamicBatcher:
    """Merge concurrent scoring requests into batches of at most `limits.max_batch_size` images.

    Args:
        score_fn: ``(images (B, 3, H, W) float in [0, 1], prompts) -> RewardOutput`` (no gradients).
        limits: batch size, wait and queue limits.

    Example:
        >>> batcher = DynamicBatcher(reward.score, ServeLimits(max_batch_size=16))
        >>> await batcher.start()
        >>> out = await batcher.submit([img0, img1], ["a cat", "a dog"])
    """

    def __init__(self, score_fn: ScoreFn, limits: ServeLimits) -> None:
        self.score_fn = score_fn
        self.limits = limits
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        # One model thread: the reward is not assumed thread-safe, and one forward at a time is the
        # point of batching. The event loop stays free for I/O while it runs.
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._lock = threading.Lock()
        self._queued_images = 0
        self._in_flight = 0
        self._counts: Counter[str] = Counter()
        self._batch_sizes: Counter[int] = Counter()
        self._busy_s = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._worker is not None:
            return
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-model")
        self._closing = False
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Refuse new requests, finish every queued one, then stop the worker."""
        if self._worker is None:
            return
        self._closing = True
        assert self._queue is not None
        await self._queue.put(_STOP)
        await self._worker
        self._worker = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def closing(self) -> bool:
        return self._closing

    # -- requests ----------------------------------------------------------------------------------
    async def submit(self, images: Sequence[torch.Tensor], prompts: Sequence[str]) -> Scores:
        """Queue one request's images (each (3, H, W)) and wait for their scores.

        Raises:
            Overloaded: the queue holds `max_queue_images` already, or the server is shutting down.
        """
        if self._worker is None or self._queue is None:
            raise RuntimeError("DynamicBatcher.start() was not awaited before submit().")
        if self._closing:
            raise Overloaded("the server is shutting down; retry against its replacement.", self.limits.retry_after_s)
        n = len(images)
        with self._lock:
            if self._queued_images + n > self.limits.max_queue_images:
                self._counts["overload_rejections"] += 1
                raise Overloaded(
                    f"the server is overloaded: {self._queued_images} images are queued and this request adds {n} "
                    f"(limit {self.limits.max_queue_images}); retry after {self.limits.retry_after_s} s.",
                    self.limits.retry_after_s,
                )
            self._queued_images += n
        job = _Job(list(images), list(prompts), asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    def stats(self) -> dict[str, Any]:
        """Counters: requests, images, batches (merged), forward passes, batch-size histogram, queue depth."""
        with self._lock:
            batches = self._counts["batches"]
            return {
                "requests": self._counts["requests"],
                "images": self._counts["images"],
                "batches": batches,
                "forward_passes": self._counts["forward_passes"],
                "max_batch_images": max(self._batch_sizes, default=0),
                "mean_batch_images": (self._counts["images"] / batches) if batches else 0.0,
                "batch_size_histogram": {str(k): v for k, v in sorted(self._batch_sizes.items())},
                "queued_images": self._queued_images,
                "overload_rejections": self._counts["overload_rejections"],
                "scoring_errors": self._counts["scoring_errors"],
                "busy_seconds": round(self._busy_s, 4),
            }

    # -- the worker --------------------------------------------------------------------------------
    async def _collect(self, first: _Job) -> tuple[list[_Job], _Job | object | None]:
        """Jobs for one batch, starting with `first`; returns them and a job (or stop) left for the next."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch, n = [first], len(first.images)
        deadline = loop.time() + self.limits.max_wait_ms / 1000
        while n < self.limits.max_batch_size:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
            if nxt is _STOP or n + len(nxt.images) > self.limits.max_batch_size:
                return batch, nxt
            batch.append(nxt)
            n += len(nxt.images)
        return batch, None

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carry: _Job | object | None = None
        while True:
            first = carry if carry is not None else await self._queue.get()
            carry = None
            if first is _STOP:
                return
            batch, carry = await self._collect(first)
            n = sum(len(j.images) for j in batch)
            with self._lock:
                self._queued_images -= n
                self._counts["batches"] += 1
                self._counts["requests"] += len(batch)
                self._counts["images"] += n
                self._batch_sizes[n] += 1
            try:
                outs = await loop.run_in_executor(self._executor, self._score_batch, batch)
            except Exception as e:  # the model failed: every request of this batch gets the error
                with self._lock:
                    self._counts["scoring_errors"] += 1
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for job, out in zip(batch, outs):
                if not job.future.done():  # a client that went away cancelled its future
                    job.future.set_result(out)

    def _score_batch(self, batch: list[_Job]) -> list[Scores]:
        """Score all images of `batch` (one forward per image size, chunks of max_batch_size)."""
        t0 = time.perf_counter()
        by_size: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for j, job in enumerate(batch):
            for i, im in enumerate(job.images):
                by_size.setdefault(tuple(im.shape), []).append((j, i))
        results = [Scores([0.0] * len(job.images), {}) for job in batch]
        step = self.limits.max_batch_size
        for items in by_size.values():
            for c in range(0, len(items), step):
                chunk = items[c : c + step]
                images = torch.stack([batch[j].images[i] for j, i in chunk])
                out = self.score_fn(images, [batch[j].prompts[i] for j, i in chunk])
                # Python floats once per chunk: answers are lists on every protocol anyway.
                scores = out.scores.detach().float().cpu().tolist()
                dims = {k: v.detach().float().cpu().tolist() for k, v in out.per_dim.items()}
                for row, (j, i) in enumerate(chunk):
                    res = results[j]
                    res.scores[i] = scores[row]
                    for k, v in dims.items():
                        res.per_dim.setdefault(k, [0.0] * len(res.scores))[i] = v[row]
                with self._lock:
                    self._counts["forward_passes"] += 1
        with self._lock:
            self._busy_s += time.perf_counter() - t0
        return results
