"""The HTTP reward server: any reward, served to any trainer (flow_grpo's pickle protocol included).

The server needs the optional extra ``pip install 'reward-plugins[serve]'`` (Starlette + uvicorn);
the client reward, ``create_reward("remote", url=...)``, needs nothing beyond the standard library.

Example:
    >>> from reward_plugins.serving import BackgroundServer, ServeLimits
    >>> with BackgroundServer(create_reward("lescore-tiny"), limits=ServeLimits(max_batch_size=16)) as s:
    ...     remote = create_reward("remote", url=s.url)
"""

from __future__ import annotations

from typing import Any

from .limits import ServeLimits
from .safe_pickle import RefusedGlobalError, loads_plain

__all__ = ["BackgroundServer", "ServeLimits", "RefusedGlobalError", "create_app", "loads_plain", "serve"]

_NEEDS_EXTRA = {"create_app": ".app", "serve": ".runner", "BackgroundServer": ".runner"}


def require_serve_extra() -> None:
    """Raise a clear ImportError when Starlette or uvicorn is missing."""
    missing = []
    for mod in ("starlette", "uvicorn"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ImportError(
            f"the reward server needs {' and '.join(missing)}, which are not installed; install the extra: "
            "pip install 'reward-plugins[serve]'."
        )


def __getattr__(name: str) -> Any:
    # The web stack is imported only when a server is built, so the client and the rest of the
    # library work without the extra.
    if name in _NEEDS_EXTRA:
        require_serve_extra()
        import importlib

        return getattr(importlib.import_module(_NEEDS_EXTRA[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
