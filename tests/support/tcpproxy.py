"""A small threaded TCP proxy whose link can be cut and restored, to simulate a database outage.

    proxy = TcpProxy(upstream_port=5432).start()
    url = f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/db"
    proxy.cut()       # every open connection is reset, new ones are refused
    proxy.restore()   # new connections reach the upstream again
    proxy.blackhole() # nothing moves any more, and nothing is closed: a silent network
    proxy.unblock()   # the bytes held flow on, as TCP would deliver them once the path is back

`cut` closes the listening socket, so a client trying to connect during the outage gets
"connection refused" at once, as it would from a stopped server; both ends of every relayed
connection are shut down, so the server side sees the client go away and rolls back.

`blackhole` is the other outage, the one no reset announces (a NAT or a route dropping
packets): the relays stop reading and writing but keep every socket open, and new
connections are accepted and then left silent. A client waits until its own timeouts end
the wait. (On loopback the proxy's kernel still acknowledges what the client sends, so
keepalives and `tcp_user_timeout` cannot see this one: only a deadline above the socket can.)
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

import sqlalchemy as sa

from tests.support.processes import free_port


class TcpProxy:
    """Forwards 127.0.0.1:<port> to upstream_host:upstream_port, one thread pair per link.

    An `upstream_host` that is a path (a folder, as libpq's `host=` takes it) means the unix
    socket `.s.PGSQL.<upstream_port>` in it: the embedded Postgres listens on no TCP port.
    """

    def __init__(
        self, upstream_port: int, *, upstream_host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.upstream_unix = (
            f"{upstream_host}/.s.PGSQL.{upstream_port}" if upstream_host.startswith("/") else None
        )
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._links: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self.accepted = 0
        self.cuts = 0
        self._flowing = threading.Event()
        self._flowing.set()

    def _connect_upstream(self) -> socket.socket:
        if self.upstream_unix is None:
            return socket.create_connection(self.upstream, timeout=5)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5)
            sock.connect(self.upstream_unix)
        except OSError:
            sock.close()
            raise
        return sock

    # -- control ------------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        """Listen (again) and forward new connections."""
        with self._lock:
            if self._listener is not None:
                return self
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(128)
            self._listener = listener
            self._accept_thread = threading.Thread(
                target=self._accept_loop, args=(listener,), name="tcpproxy-accept", daemon=True
            )
            self._accept_thread.start()
        return self

    def cut(self) -> int:
        """Reset every open connection and refuse new ones; returns how many were cut."""
        with self._lock:
            listener, self._listener = self._listener, None
            links, self._links = self._links, set()
            self.cuts += 1
        if listener is not None:
            _close(listener)
        for sock in links:
            _close(sock)
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        return len(links) // 2

    def restore(self) -> None:
        """Accept and forward connections again (same port)."""
        self.start()

    def blackhole(self) -> None:
        """Stop moving bytes in both directions, every socket left open."""
        self._flowing.clear()

    def unblock(self) -> None:
        """Move bytes again (those held included)."""
        self._flowing.set()

    def close(self) -> None:
        self.unblock()
        self.cut()

    @property
    def open_links(self) -> int:
        with self._lock:
            return len(self._links) // 2

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- relaying -----------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed by cut()
            try:
                upstream = self._connect_upstream()
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:
                    # cut() ran while we were connecting: this link must not survive it.
                    _close(client)
                    _close(upstream)
                    return
                self._links.update((client, upstream))
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(src, dst), name="tcpproxy-pump", daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._links.discard(src)
                self._links.discard(dst)
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def upstream_of(database_url: str) -> tuple[str, int]:
    """(host, port) a proxy or a pooler in front of `database_url` forwards to: the unix socket
    folder in the query's `host` (the embedded server of the offline pass listens on no TCP
    port), else the URL's host; and its port."""
    url = sa.make_url(database_url)
    return str(url.query.get("host") or url.host or "127.0.0.1"), url.port or 5432


def url_via(database_url: str, port: int) -> str:
    """`database_url` through 127.0.0.1:`port` (a proxy or a pooler), its socket folder dropped."""
    url = sa.make_url(database_url).difference_update_query(["host"])
    return url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
