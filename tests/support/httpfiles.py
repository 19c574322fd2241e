"""A standard-library HTTP file server in a thread, with faults, for the HTTP tests.

    server = FileServer().start()
    url = server.put("/d/a.jsonl", data, etag='"v1"')          # or last_modified=..., chunked=True
    server.arm("/d/a.jsonl", "503")                            # the next GET answers 503
    server.arm("/d/b.jsonl", "short")                          # the next GET: the length
                                                               # promised, half sent, closed

HEAD gives the length (and ETag / Last-Modified when set); GET honours one `Range: bytes=a-b`
(206) unless the resource has `ranges=False`, which answers 200 with the whole body and says
nothing about ranges, as `python -m http.server` does. An `If-Range` that names another
version than the resource's (ETag or Last-Modified) gets the whole body (200), as RFC 9110
says. A `chunked` resource's GET bodies
are sent with Transfer-Encoding: chunked. Faults: "503"; "short" (a Content-Length larger
than what is sent, then the connection closes); "cut" (a chunked body that stops without its
last chunk).
"""

from __future__ import annotations

import dataclasses
import http.server
import re
import threading
from typing import Any

from tests.support.processes import free_port

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclasses.dataclass
class Resource:
    body: bytes
    etag: str | None = None
    last_modified: str | None = None
    chunked: bool = False
    ranges: bool = True  # False: a Range header is ignored (200, the whole body)


@dataclasses.dataclass
class Fault:
    path: str
    kind: str
    remaining: int
    after_byte: int = 0
    fired: int = 0


class FileServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.files: dict[str, Resource] = {}
        self.log: list[tuple[str, str, int]] = []  # (method, path, status)
        self.ranges: list[str | None] = []  # the Range header of each GET answered
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    def put(self, path: str, body: bytes, **options: Any) -> str:
        with self._lock:
            self.files[path] = Resource(body, **options)
        return self.base + path

    def arm(self, path: str, kind: str, *, times: int = 1, after_byte: int = 0) -> Fault:
        """Fault the next `times` GETs of `path` whose range starts at `after_byte` or later."""
        fault = Fault(path, kind, times, after_byte)
        with self._lock:
            self._faults.append(fault)
        return fault

    def start(self) -> FileServer:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        server.handle_error = lambda request, address: None  # type: ignore[method-assign]
        self._server = server
        threading.Thread(target=server.serve_forever, name="httpfiles", daemon=True).start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _fault_for(self, path: str, start: int) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining and fault.path == path and start >= fault.after_byte:
                    fault.remaining -= 1
                    fault.fired += 1
                    return fault
        return None


def _handler(files: FileServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _status(self, code: int, length: int) -> None:
            files.log.append((self.command, self.path, code))
            self.send_response(code)
            self.send_header("Content-Length", str(length))

        def do_HEAD(self) -> None:
            resource = files.files.get(self.path)
            if resource is None:
                self._status(404, 0)
                self.end_headers()
                return
            self._status(200, len(resource.body))
            self._validators(resource)
            self.end_headers()

        def do_GET(self) -> None:
            resource = files.files.get(self.path)
            if resource is None:
                self._status(404, 0)
                self.end_headers()
                return
            body, start, code = resource.body, 0, 200
            if_range = self.headers.get("If-Range")
            current = if_range in (resource.etag, resource.last_modified)
            if (
                resource.ranges
                and (if_range is None or current)
                and (match := _RANGE.match(self.headers.get("Range", "")))
            ):
                start = int(match.group(1))
                end = min(int(match.group(2) or len(body) - 1), len(body) - 1)
                body, code = resource.body[start : end + 1], 206
            fault = files._fault_for(self.path, start)
            if fault is not None and fault.kind == "503":
                self._status(503, 0)
                self.end_headers()
                return
            files.log.append((self.command, self.path, code))
            files.ranges.append(self.headers.get("Range"))
            self.send_response(code)
            if code == 206:
                end = start + len(body) - 1
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(resource.body)}")
            self._validators(resource)
            if resource.chunked:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                half = len(body) // 2
                for piece in (body[:half], body[half:]):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    if fault is not None and fault.kind == "cut":
                        self.close_connection = True
                        return
                self.wfile.write(b"0\r\n\r\n")
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if fault is not None and fault.kind == "short":
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

        def _validators(self, resource: Resource) -> None:
            if resource.ranges:
                self.send_header("Accept-Ranges", "bytes")
            if resource.etag:
                self.send_header("ETag", resource.etag)
            if resource.last_modified:
                self.send_header("Last-Modified", resource.last_modified)

    return Handler
