"""Running the reward server: in the foreground (`serve`, what the CLI calls) or on a background thread
of this process (`BackgroundServer`, for tests, benchmarks and the ``remote-tiny`` reward).

Shutdown is graceful either way: uvicorn stops accepting connections, waits for in-flight requests
(up to `graceful_timeout_s`), then the app's lifespan drains the batcher.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from reward_plugins.base import RewardModel

from .app import create_app
from .limits import ServeLimits


def _config(app: Any, host: str, port: int, log_level: str, graceful_timeout_s: float):
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
        timeout_graceful_shutdown=graceful_timeout_s, backlog=2048,
        # Keep connections of trainers that score every few seconds; idle ones cost nothing here.
        timeout_keep_alive=30,
    )


def serve(
    reward: RewardModel,
    *,
    host: str = "127.0.0.1",
    port: int = 18085,
    limits: ServeLimits | None = None,
    model: str | None = None,
    log_level: str = "info",
    graceful_timeout_s: float = 30.0,
) -> None:
    """Serve `reward` until SIGINT/SIGTERM, then finish in-flight requests and exit."""
    import uvicorn

    app = create_app(reward, limits, model=model)
    uvicorn.Server(_config(app, host, port, log_level, graceful_timeout_s)).run()


class BackgroundServer:
    """The reward server on a daemon thread of this process, on a free loopback port by default.

    Example:
        >>> with BackgroundServer(create_reward("lescore-tiny")) as server:
        ...     remote = create_reward("remote", url=server.url)
    """

    def __init__(
        self,
        reward: RewardModel,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: ServeLimits | None = None,
        model: str | None = None,
        log_level: str = "warning",
        graceful_timeout_s: float = 10.0,
    ) -> None:
        import uvicorn

        self.app = create_app(reward, limits, model=model)
        self.host = host
        self._server = uvicorn.Server(_config(self.app, host, port, log_level, graceful_timeout_s))
        self._thread: threading.Thread | None = None
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def stats(self) -> dict[str, Any]:
        return self.app.state.info()["stats"]

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        """Start serving; returns once the port is bound and the batcher runs."""
        self._thread = threading.Thread(target=self._server.run, name=f"reward-server:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the reward server on {self.host}:{self.port} failed to start (see its log above).")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the reward server on {self.host}:{self.port} did not start within {timeout_s} s.")
            time.sleep(0.01)
        # Port 0 asks the OS for a free port: read back the one it gave.
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful stop: in-flight requests are answered first."""
        if self._thread is None:
            return
        self._server.should_exit = True
        if threading.current_thread() is not self._thread:  # a finalizer may run on the server's own thread
            self._thread.join(timeout_s)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> BackgroundServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
