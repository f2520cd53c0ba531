"""An HTTP proxy on 127.0.0.1 that forwards to an S3 server (tests/s3_server.py) and injects
storage faults, for the retry tests.

Every request is forwarded whole and answered from a private keep-alive connection to the
upstream server, except when a fault is drawn for it:

- ``slowdown`` / ``internal`` / ``throttle`` / ``forbidden``: answer 503 SlowDown / 500
  InternalError / 429 TooManyRequests / 403 AccessDenied (S3's error XML) without forwarding;
  ``proxy.errors`` holds these and takes more
- ``drop``: close the connection with a reset before forwarding (the request never arrives)
- ``reset``: forward, send the status line, headers and half of the body, then reset the
  connection (with no body: reset with nothing sent; a PUT has then taken effect)
- ``short``: forward a range GET, then answer with a Content-Length and body cut to half (a
  consistent but short answer, which only a length check can catch)
- ``stall``: hold the request for ``stall_seconds`` (past the client's timeout), then forward

Which requests get a fault: ``always`` maps a regular expression to a fault that every
request whose path it matches (``re.search``) gets; otherwise, for requests that ``eligible(method, path)`` accepts, a
seeded ``random.Random`` draws one from ``rates`` ({fault: fraction}). ``log`` holds
(method, path, fault or None) for every request.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "throttle": (429, "TooManyRequests", "Too many requests."),
    "forbidden": (403, "AccessDenied", "Access Denied"),
}
FAULTS = (*_ERRORS, "drop", "reset", "short", "stall")


class FaultProxy:
    def __init__(self, upstream_port: int, *, rates: dict[str, float] | None = None, seed: int = 0,
                 eligible: Callable[[str, str], bool] | None = None, stall_seconds: float = 2.0) -> None:
        self.upstream_port = upstream_port
        self.rates = dict(rates or {})
        self.always: dict[str, str] = {}
        self.eligible = eligible or (lambda method, path: True)
        self.stall_seconds = stall_seconds
        self.errors = dict(_ERRORS)  # fault -> (status, S3 error code, message); add kinds here
        self.log: list[tuple[str, str, str | None]] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def choose(self, method: str, path: str, ranged: bool = False) -> str | None:
        with self._lock:
            fault = next((f for pattern, f in self.always.items() if re.search(pattern, path)), None)
            if fault is None and self.rates and self.eligible(method, path):
                x, acc = self._rng.random(), 0.0
                for name, rate in self.rates.items():
                    acc += rate
                    if x < acc:
                        fault = name
                        break
            if fault == "short" and not (method == "GET" and ranged):
                fault = "reset"
            self.log.append((method, path, fault))
            return fault

    def faults(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, _, fault in list(self.log):
            if fault:
                out[fault] = out.get(fault, 0) + 1
        return out

    def requests_for(self, part: str) -> list[tuple[str, str, str | None]]:
        return [r for r in list(self.log) if part in r[1]]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client that gave up: expected here
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def _handle(self) -> None:
        body = self._read_body()
        fault = self.owner.choose(self.command, self.path, ranged="Range" in self.headers)
        if fault in self.owner.errors:
            return self._error(*self.owner.errors[fault])
        if fault == "drop":
            return self._reset()
        if fault == "stall":
            time.sleep(self.owner.stall_seconds)
        try:
            status, reason, headers, data = self._forward(body)
        except OSError:
            return self._reset()
        if fault == "reset":
            if len(data) < 2:
                return self._reset()
            self._send(status, reason, headers, data, len(data), data[: len(data) // 2])
            return self._reset()
        if fault == "short" and len(data) >= 2:
            half = data[: len(data) // 2]
            return self._send(status, reason, headers, half, len(half), half)
        self._send(status, reason, headers, data, None, data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = getattr(self, "_upstream", None)
        for attempt in (0, 1):  # a pooled upstream connection may have been closed by the server
            if conn is None:
                conn = self._upstream = http.client.HTTPConnection("127.0.0.1", self.owner.upstream_port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            except (http.client.HTTPException, OSError):
                conn.close()
                conn = self._upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes, length: int | None,
              payload: bytes) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            if k.lower() in _HOP or (k.lower() == "content-length" and self.command != "HEAD"):
                continue
            self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.wfile.flush()

    def _error(self, status: int, code: str, message: str) -> None:
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
               f"<RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)
        self.wfile.flush()

    def _reset(self) -> None:
        """Close with RST (SO_LINGER 0), as a dropped connection looks to the client."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()
