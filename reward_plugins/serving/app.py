"""The reward server's ASGI application (Starlette): scoring at ``POST /``, ``GET /health``, ``GET /info``.

Example:
    >>> app = create_app(create_reward("lescore-tiny"), ServeLimits(max_batch_size=16))
    >>> uvicorn.run(app, host="127.0.0.1", port=18085)
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reward_plugins.base import RewardModel, RewardOutput

from .batcher import DynamicBatcher, Overloaded
from .limits import ServeLimits
from .protocols import EXPECTED, PROTOCOLS, RequestError, decode_request, detect_protocol, encode_answer

logger = logging.getLogger("reward_plugins.serving")

# Bodies up to this size are decoded on the event loop (well under a millisecond for a few small images),
# except pickles: their opcode pre-scan is pure Python.
INLINE_DECODE_BYTES = 256 * 1024


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def served_default_dimension(reward: RewardModel) -> str:
    """The dimension `scores` answers with: the served selection when it is one dimension."""
    sel = reward.selection
    return next(iter(sel)) if len(sel) == 1 else reward.default_dimension


def create_app(reward: RewardModel, limits: ServeLimits | None = None, *, model: str | None = None) -> Starlette:
    """An ASGI app scoring with `reward` (one model per process), batching concurrent requests.

    Args:
        reward: a frozen reward (from `create_reward`), already on its device and dtype.
        limits: batching and size limits (defaults: `ServeLimits()`).
        model: what `/info` reports as the model (e.g. the checkpoint path); default the reward's class.

    The app's state holds the batcher (``app.state.batcher``) and error counters (``app.state.errors``).
    """
    from reward_plugins import __version__

    limits = limits or ServeLimits()
    dimensions = tuple(reward.dimensions)
    requires_prompts = bool(reward.requires_prompts)
    name = reward.name

    def score_fn(images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        return reward.score(images, prompts if requires_prompts else None)

    batcher = DynamicBatcher(score_fn, limits)
    errors: Counter[int] = Counter()

    def info() -> dict[str, Any]:
        return {
            "reward": name,
            "dimensions": list(dimensions),
            "default_dimension": served_default_dimension(reward),
            "selection": reward.selection,
            "requires_prompts": requires_prompts,
            "served_is_differentiable": bool(reward.is_differentiable),
            "score_range": list(reward.score_range) if reward.score_range else None,
            "model": model or type(reward).__name__,
            "dtype": str(reward.dtype).removeprefix("torch."),
            "device": str(reward.device),
            "version": __version__,
            "protocols": list(PROTOCOLS),
            "limits": limits.as_dict(),
            "stats": {**batcher.stats(), "errors": {str(k): v for k, v in sorted(errors.items())}},
        }

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
            raise RequestError(413, f"the body is {declared} bytes; the limit is {limits.max_request_bytes}. "
                                    "Send fewer or smaller images per request.")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_request_bytes:
                raise RequestError(413, f"the body exceeds {limits.max_request_bytes} bytes. "
                                        "Send fewer or smaller images per request.")
            chunks.append(chunk)
        return b"".join(chunks)

    async def score(request: Request) -> Response:
        try:
            body = await read_body(request)
            # Decoding (unpickling, JPEG/PNG) of large bodies runs off the event loop so it overlaps with
            # scoring; small ones are decoded inline, cheaper than a thread hop.
            ctype = request.headers.get("content-type")
            if len(body) > INLINE_DECODE_BYTES or (body and detect_protocol(ctype, body) == "pickle"):
                req = await run_in_threadpool(decode_request, body, ctype, limits)
            else:
                req = decode_request(body, ctype, limits)
            prompts = req.prompts
            if prompts is None:
                if requires_prompts:
                    raise RequestError(400, f"reward {name!r} scores image-text agreement and needs 'prompts', one str "
                                            f"per image ({len(req.images)}); the request has none.")
                prompts = [""] * len(req.images)
            out = await batcher.submit(req.images, prompts)
        except RequestError as e:
            errors[e.status] += 1
            return _error(e.status, e.message)
        except Overloaded as e:
            errors[503] += 1
            return _error(503, str(e), headers={"Retry-After": str(e.retry_after)})
        except ClientDisconnect:
            errors[499] += 1
            return Response(status_code=400)
        except Exception as e:  # the model itself failed: a server error, logged with its traceback
            logger.exception("scoring failed")
            errors[500] += 1
            return _error(500, f"scoring failed on the server: {type(e).__name__}: {e}")
        body, media_type = encode_answer(req.protocol, out, dimensions, name)  # a few floats: inline
        return Response(body, media_type=media_type)

    async def health(request: Request) -> Response:
        if batcher.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok", "reward": name})

    async def get_info(request: Request) -> Response:
        return JSONResponse(info())

    async def not_served(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return _error(status, f"{request.method} {request.url.path} is not served. Score with POST / ({EXPECTED}); "
                              "GET /health and GET /info describe the server.")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await batcher.start()
        try:
            yield
        finally:
            # Runs after uvicorn stopped accepting and in-flight requests finished: drain, then stop.
            await batcher.close()

    routes = [
        Route("/", score, methods=["POST"]),
        Route("/score", score, methods=["POST"]),
        Route("/", get_info, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/info", get_info, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_served, 405: not_served})
    app.state.batcher = batcher
    app.state.errors = errors
    app.state.info = info
    return app
