"""Start `transformers serve` on a local model dir, on loopback, as an OpenAI-compatible judge server.

Needs transformers' serving dependencies (fastapi, uvicorn: ``pip install "transformers[serving]"``).
Used by the tests and the throughput benchmark; handy to try the HTTP backend without vLLM.

Example:
    >>> with TransformersServe("path/to/vlm") as server:                       # doctest: +SKIP
    ...     backend = make_backend("http", base_url=server.base_url)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port nobody listens on right now (on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TransformersServe:
    """`transformers serve <model_dir>` on 127.0.0.1 in a subprocess (offline, CPU unless `device`).

    Args:
        model_dir: a dir written by `save_pretrained` (model + processor).
        device: passed to `transformers serve --device`.
        extra_args: more `transformers serve` options (e.g. ``["--continuous-batching"]``).
        startup_timeout: seconds to wait for ``GET /v1/models`` to answer.
        log: where the server's output goes (default: serve.log beside the model).
    """

    def __init__(self, model_dir: str | os.PathLike, *, device: str = "cpu", extra_args: list[str] | None = None,
                 startup_timeout: float = 120.0, log: str | os.PathLike | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = Path(log) if log else Path(model_dir) / "serve.log"
        self._log = open(self.log_path, "w")
        env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", os.fspath(model_dir), "--host",
               "127.0.0.1", "--port", str(self.port), "--device", device, *(extra_args or [])]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(
                    f"transformers serve exited with code {self.proc.returncode}; see {self.log_path} (it needs "
                    "fastapi and uvicorn: pip install 'transformers[serving]')."
                )
            try:
                urllib.request.urlopen(self.base_url + "/models", timeout=2).read()
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"transformers serve did not answer within {startup_timeout:g} s; see {self.log_path}") from None
                time.sleep(0.3)

    def close(self) -> None:
        """Stop the server (terminate, then kill after 20 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> TransformersServe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
