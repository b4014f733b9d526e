"""A scriptable stand-in SAM2 service: a real threaded HTTP server on a free 127.0.0.1 port.

Each test queues canned replies per (method, path) and reads back every request it received
(method, path, headers, body, client port). Unscripted requests get a 404 that says so.

    with SamServer() as server:
        server.add("POST", "/segment", Reply(json={"masks": [...]}))
        ... server.url ...
        server.requests[0].headers["Authorization"]
"""

from __future__ import annotations

import json as jsonlib
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One canned answer. `json` wins over `body`; `delay` holds the answer back (a slow service)."""

    status: int = 200
    json: Any = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    chunk_delay: float = 0.0  # send the body a few bytes at a time, this long apart (a trickling service)

    def payload(self) -> tuple[bytes, str]:
        if self.json is not None:
            return jsonlib.dumps(self.json).encode(), "application/json"
        return self.body, self.headers.get("Content-Type", "application/octet-stream")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int
    at: float = field(default_factory=time.monotonic)  # when it arrived (time.monotonic)

    def json(self) -> Any:
        return jsonlib.loads(self.body)


class SamServer:
    """Start on enter, stop on exit; `url` is http://127.0.0.1:<port>."""

    def __init__(self) -> None:
        self._replies: dict[tuple[str, str], deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self.requests: list[Recorded] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="sam2-test-server", daemon=True
        )

    def __enter__(self) -> SamServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()  # wakes delayed handlers
        self._httpd.shutdown()
        self._httpd.server_close()

    def add(self, method: str, path: str, *replies: Reply) -> None:
        """Queue replies for method + path (path without query), answered in order, each once."""
        with self._lock:
            self._replies[(method.upper(), path)].extend(replies)

    def requests_to(self, method: str, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.method == method.upper() and r.path == path]

    def wait_for(self, method: str, path: str, count: int = 1, timeout: float = 10.0) -> list[Recorded]:
        """Block until `count` requests to method + path have arrived (or the timeout passes)."""
        with self._arrived:
            self._arrived.wait_for(lambda: len(self._matching(method, path)) >= count, timeout)
            return self._matching(method, path)

    def _matching(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method.upper() and r.path == path]

    def _take(self, recorded: Recorded) -> Reply:
        with self._arrived:
            self.requests.append(recorded)
            self._arrived.notify_all()
            queue = self._replies.get((recorded.method, recorded.path))
            if queue:
                return queue.popleft()
        return Reply(404, json={"detail": f"nothing scripted for {recorded.method} {recorded.path}"})


def _handler_for(server: SamServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse can be observed

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = self.path.split("?", 1)[0]
            recorded = Recorded(self.command, path, dict(self.headers.items()), body, self.client_address[1])
            reply = server._take(recorded)
            if reply.delay and server._stopping.wait(reply.delay):
                return
            data, kind = reply.payload()
            try:
                self.send_response(reply.status)
                headers = {"Content-Type": kind, "Content-Length": str(len(data)), **reply.headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if reply.chunk_delay:
                    for start in range(0, len(data), 4):
                        self.wfile.write(data[start : start + 4])
                        self.wfile.flush()
                        if server._stopping.wait(reply.chunk_delay):
                            return
                else:
                    self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up first: that is what the slow-reply tests are about

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output quiet

    return Handler
