"""A fault-injecting loopback proxy for the judge tests (the real server: `reward_plugins.judge.local_server`)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultProxy:
    """Forwards to `upstream`, except that chat requests first consume `plan`: '500' answers HTTP 500,
    'sleep' holds the request past the client's timeout, 'malformed' answers 200 with a non-JSON body,
    'nochoices' answers 200 with JSON lacking `choices`. `delay` is added to every forwarded request;
    `max_inflight` is the most chat requests seen at once."""

    def __init__(self, upstream: str, plan=(), delay: float = 0.0, sleep: float = 2.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.plan = list(plan)
        self.delay = delay
        self.sleep = sleep
        self.lock = threading.Lock()
        self.inflight = 0
        self.max_inflight = 0
        self.chat_calls = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _release(self) -> None:
                # A request stops counting as in flight before its answer goes out: the client may send its
                # next request the moment it has read this one, before this thread gets to run again.
                if getattr(self, "_counted", False):
                    self._counted = False
                    with proxy.lock:
                        proxy.inflight -= 1

            def _send(self, code: int, body: bytes) -> None:
                if self.command == "POST":
                    self._release()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _forward(self, body: bytes | None) -> None:
                req = urllib.request.Request(proxy.upstream + self.path.removeprefix("/v1"), data=body,
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        self._send(r.status, r.read())
                except urllib.error.HTTPError as e:
                    self._send(e.code, e.read())

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy.lock:
                    proxy.chat_calls += 1
                    proxy.inflight += 1
                    proxy.max_inflight = max(proxy.max_inflight, proxy.inflight)
                    fault = proxy.plan.pop(0) if proxy.plan else None
                self._counted = True
                try:
                    if fault == "500":
                        self._send(500, b'{"error": "injected"}')
                    elif fault == "sleep":
                        time.sleep(proxy.sleep)
                        self._send(200, b"{}")
                    elif fault == "malformed":
                        self._send(200, b"<html>not json")
                    elif fault == "nochoices":
                        self._send(200, json.dumps({"object": "error"}).encode())
                    else:
                        time.sleep(proxy.delay)
                        self._forward(body)
                finally:
                    self._release()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
