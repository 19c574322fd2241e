"""A fake PostgreSQL server that refuses every startup with one FATAL error, as a pooler does
that does not accept a startup parameter (PgBouncer: `unsupported startup parameter`, 08P01)."""

from __future__ import annotations

import socket
import struct
import threading

from tests.support.processes import free_port

# The request codes a client may send before its startup packet (SSL, GSS encryption).
_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104


class RefusingServer:
    """Answers every connection's startup with an ErrorResponse (`sqlstate`, `message`)."""

    def __init__(
        self, sqlstate: str = "08P01", message: str = "unsupported startup parameter: options"
    ) -> None:
        self.sqlstate = sqlstate
        self.message = message
        self.port = free_port()
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RefusingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._refuse, args=(conn,), daemon=True).start()

    def _refuse(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    length = struct.unpack("!I", _read(conn, 4))[0]
                    body = _read(conn, length - 4)
                    code = struct.unpack("!I", body[:4])[0]
                    if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                        conn.sendall(b"N")  # no encryption: the client sends its startup next
                        continue
                    fields = b"".join(
                        kind + text.encode() + b"\0"
                        for kind, text in (
                            (b"S", "FATAL"),
                            (b"V", "FATAL"),
                            (b"C", self.sqlstate),
                            (b"M", self.message),
                        )
                    )
                    payload = fields + b"\0"
                    conn.sendall(b"E" + struct.pack("!I", len(payload) + 4) + payload)
                    return
            except (OSError, struct.error):
                return


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data
