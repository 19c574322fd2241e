"""An HTTP reverse proxy in a thread that injects storage faults, for the S3 tests.

    proxy = FaultProxy("http://127.0.0.1:8333").start()
    proxy.arm("bkt/p/a.jsonl", "503", times=3)    # the next 3 requests for that key: 503
    proxy.arm("bkt/p/b.jsonl", "cut", times=2)    # headers and half the body, then a reset
    proxy.before("bkt/p/c.jsonl", delete_it)      # run once before the first request for it

Requests are forwarded as they came, Host header included, so an AWS signature made for the
proxy's address still verifies upstream. Each request is logged (method, path, status, body
bytes sent) so a test can tell how an object was read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import http.server
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

from tests.support.processes import free_port

_S3_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
    b"<Message>injected by the test proxy</Message></Error>"
)
# Hop-by-hop headers, and the length: the proxy sends the body it read with its own length.
_DROPPED = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclasses.dataclass
class Fault:
    match: str
    kind: str  # "503", "reset" (no answer at all) or "cut" (half the body, then a reset)
    remaining: int  # -1: for ever
    methods: frozenset[str] | None = None
    fired: int = 0
    armed: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.armed = self.remaining


@dataclasses.dataclass(frozen=True)
class Logged:
    method: str
    path: str
    status: int | None  # None: the connection was reset
    body_bytes: int


class FaultProxy:
    """Forwards 127.0.0.1:<port> to `upstream` (an http:// URL) with the faults armed."""

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log: list[Logged] = []
        self._faults: list[Fault] = []
        self._hooks: list[tuple[str, Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    # -- control ----------------------------------------------------------------------------

    def arm(
        self, match: str, kind: str, *, times: int = 1, methods: tuple[str, ...] | None = None
    ) -> Fault:
        """Fault the next `times` requests whose path contains `match` (-1: all of them)."""
        fault = Fault(match, kind, times, frozenset(methods) if methods else None)
        with self._lock:
            self._faults.append(fault)
        return fault

    def before(self, match: str, hook: Callable[[], None]) -> None:
        """Run `hook` once, before forwarding the first request whose path contains `match`."""
        with self._lock:
            self._hooks.append((match, hook))

    def disarm(self, fault: Fault) -> None:
        with self._lock:
            fault.remaining = 0

    def requests_for(self, match: str) -> list[Logged]:
        with self._lock:
            return [entry for entry in self.log if match in entry.path]

    def start(self) -> FaultProxy:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        # A reset connection makes the handler's final flush fail: expected, not news.
        server.handle_error = lambda request, address: None  # type: ignore[method-assign]
        self._server = server
        threading.Thread(target=server.serve_forever, name="faultproxy", daemon=True).start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- decisions --------------------------------------------------------------------------

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining == 0 or fault.match not in path:
                    continue
                if fault.methods is not None and method not in fault.methods:
                    continue
                if fault.remaining > 0:
                    fault.remaining -= 1
                fault.fired += 1
                return fault
        return None

    def _hook_for(self, path: str) -> Callable[[], None] | None:
        with self._lock:
            for index, (match, hook) in enumerate(self._hooks):
                if match in path:
                    del self._hooks[index]
                    return hook
        return None

    def _record(self, method: str, path: str, status: int | None, body: int) -> None:
        with self._lock:
            self.log.append(Logged(method, urllib.parse.unquote(path), status, body))


def _handler(proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _reset(self) -> None:
            # SO_LINGER 0: close() sends a RST, as a dropped connection does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

        def _handle(self) -> None:
            method, path = self.command, self.path
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            plain = urllib.parse.unquote(path)
            if hook := proxy._hook_for(plain):
                hook()
            fault = proxy._fault_for(method, plain)
            if fault is not None and fault.kind == "reset":
                proxy._record(method, path, None, 0)
                self._reset()
                return
            if fault is not None and fault.kind == "503":
                data = b"" if method == "HEAD" else _S3_ERROR
                self.send_response_only(503, "Service Unavailable")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                proxy._record(method, path, 503, len(data))
                return
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
            try:
                upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in ("connection", "keep-alive"):
                        upstream.putheader(name, value)
                upstream.endheaders(body)
                response = upstream.getresponse()
                data = response.read()
                headers = response.getheaders()
            finally:
                upstream.close()
            self.send_response_only(response.status, response.reason)
            for name, value in headers:
                if name.lower() not in _DROPPED:
                    self.send_header(name, value)
            if method == "HEAD":
                # No body: the length is the object's, as the upstream said it.
                if (size := response.getheader("Content-Length")) is not None:
                    self.send_header("Content-Length", size)
                self.end_headers()
                proxy._record(method, path, response.status, 0)
                return
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if fault is not None and fault.kind == "cut" and len(data) > 1:
                with contextlib.suppress(OSError):
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                proxy._record(method, path, None, len(data) // 2)
                self._reset()
                return
            self.wfile.write(data)
            proxy._record(method, path, response.status, len(data))

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

    return Handler
