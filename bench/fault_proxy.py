"""An HTTP proxy on 127.0.0.1 in front of the benchmark's S3 server that injects transient
faults into a seeded fraction of requests (the benchmark's own copy; the tests have theirs):

- ``slowdown``: answer 503 SlowDown (S3's error XML) without forwarding
- ``reset``: forward, send the status line, headers and half of the body, then reset the
  connection (SO_LINGER 0); with no body, reset with nothing sent

With no rates it only forwards, so a clean run through it pays the same proxy costs. ``delay``
holds every request (faults included) that many seconds first, as a far endpoint would.
``GET /__fault_proxy__`` answers this proxy's counters as JSON: requests and faults by kind.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATS_PATH = "/__fault_proxy__"
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>")


class FaultProxy:
    def __init__(self, upstream_port: int, rates: dict[str, float] | None = None, seed: int = 0,
                 delay: float = 0.0) -> None:
        unknown = set(rates or {}) - {"slowdown", "reset"}
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}")
        self.upstream_port = upstream_port
        self.delay = delay
        self.rates = dict(rates or {})
        self.counts = {"requests": 0, "slowdown": 0, "reset": 0}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        owner = self

        class Handler(_Handler):
            proxy = owner

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def draw(self) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            x, acc = self._rng.random(), 0.0
            for name, rate in self.rates.items():
                acc += rate
                if x < acc:
                    self.counts[name] += 1
                    return name
            return None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # clients that hung up: expected
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def log_message(self, *args) -> None:
        pass

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == STATS_PATH:
            with self.proxy._lock:
                data = json.dumps(self.proxy.counts).encode()
            return self._send(200, "OK", [("Content-Type", "application/json")], data, data)
        fault = self.proxy.draw()
        if self.proxy.delay:
            time.sleep(self.proxy.delay)
        if fault == "slowdown":
            return self._send(503, "Slow Down", [("Content-Type", "application/xml")], _SLOWDOWN, _SLOWDOWN)
        try:
            status, reason, headers, data = self._forward(body)
        except OSError:
            return self._reset()
        if fault == "reset":
            if len(data) >= 2:
                self._send(status, reason, headers, data, data[: len(data) // 2])
            return self._reset()
        self._send(status, reason, headers, data, data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        for attempt in (0, 1):  # the kept upstream connection may have been closed
            conn = getattr(self, "_upstream", None)
            if conn is None:
                conn = self._upstream = http.client.HTTPConnection("127.0.0.1", self.proxy.upstream_port, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.reason, resp.getheaders(), resp.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                self._upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes, payload: bytes) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            if k.lower() not in _HOP and not (k.lower() == "content-length" and self.command != "HEAD"):
                self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.wfile.flush()

    def _reset(self) -> None:
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()


def stats(endpoint: str) -> dict[str, int]:
    """The counters of the proxy at ``endpoint``."""
    conn = http.client.HTTPConnection(endpoint.split("://", 1)[1], timeout=10)
    try:
        conn.request("GET", STATS_PATH)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()
