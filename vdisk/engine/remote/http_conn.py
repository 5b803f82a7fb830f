"""The data reads of an HttpSource: range GETs over a small pool of keep-alive connections
of our own, the body read with recv_into straight into the caller's buffer.

httpx does the open (redirects, auth, cookies, the checks of range support); what it sent
last (the final URL and its headers: Host, Authorization, Cookie...) is the template of
every data request here. A request is written and its answer's head parsed with h11; a
206 of known Content-Length is then read by recv_into (no Python parsing, no copies, the
GIL released), so several threads read at once. Anything else is checked as httpx's path
checks it; a connection that is not sure to be clean afterwards is closed, not reused.
A kept-alive connection the server closed meanwhile is retried at once on a new one.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass

import h11

CONNECT_LIMIT = 10.0  # seconds a connect may take (at most: the deadline comes first)
HEAD_READ = 16 << 10  # bytes read at once while the answer's head is incomplete
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class RetryableError(Exception):
    """A failed attempt that may succeed if made again."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class FatalError(Exception):
    """A failed attempt that will fail again."""


class _Stale(Exception):
    """A kept-alive connection failed before its answer began: the server had closed it."""


def describe(e: BaseException) -> str:
    """e's message without its "[Errno N] " prefix."""
    text = str(e) or type(e).__name__
    return re.sub(r"^\[Errno -?\d+\] ", "", text)


@dataclass(frozen=True)
class Target:
    """Where and how data requests go: the final URL after the open's redirects."""

    host: str
    port: int
    path: bytes  # the request target: path and query
    headers: tuple[tuple[bytes, bytes], ...]  # every header but Range
    tls: ssl.SSLContext | None


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reused = False
        self.answered = False  # a byte of the current request's answer came

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _set_deadline(sock: socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    sock.settimeout(left)


class RangePool:
    """At most `size` connections to target, each carrying one request at a time."""

    def __init__(self, target: Target, size: int) -> None:
        self.target = target
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[_Conn] = []
        self._closed = False

    def read_into(self, view: memoryview, offset: int, total: int, deadline: float) -> None:
        """Fill view with bytes [offset, offset + len(view)) of a file of total bytes;
        RetryableError or FatalError (view then holds anything) if not."""
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise RetryableError("timed out waiting for a free connection", timed_out=True)
        try:
            conn = self._take()
            try:
                if conn is not None:
                    try:
                        self._exchange(conn, view, offset, total, deadline)
                        return
                    except _Stale:
                        pass  # closed by the server while idle: once more on a new one
                conn = self._connect(deadline)
                self._exchange(conn, view, offset, total, deadline)
            except _Stale as e:
                raise RetryableError(str(e.__cause__ or e)) from None
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    # -- internals --------------------------------------------------------------------

    def _take(self) -> _Conn | None:
        """An idle connection that still looks open, or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn = self._idle.pop()
            try:  # readable while idle: the server closed it (or sent garbage)
                readable = select.select([conn.sock], [], [], 0)[0]
            except (OSError, ValueError):
                readable = [conn.sock]
            if not readable:
                return conn
            conn.close()

    def _give_back(self, conn: _Conn) -> None:
        conn.reused = True
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self, deadline: float) -> _Conn:
        t = self.target
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            sock = socket.create_connection((t.host, t.port), timeout=min(left, CONNECT_LIMIT))
        except TimeoutError:
            raise RetryableError("timed out (connect)", timed_out=True) from None
        except OSError as e:
            raise RetryableError(describe(e)) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if t.tls is not None:
                _set_deadline(sock, deadline)
                sock = t.tls.wrap_socket(sock, server_hostname=t.host)
        except ssl.SSLCertVerificationError as e:
            sock.close()
            raise FatalError("TLS certificate does not verify: "
                             f"{e.verify_message or describe(e)}") from None
        except TimeoutError:
            sock.close()
            raise RetryableError("timed out (TLS handshake)", timed_out=True) from None
        except OSError as e:
            sock.close()
            raise RetryableError(describe(e)) from None
        return _Conn(sock)

    def _exchange(self, conn: _Conn, view: memoryview, offset: int, total: int,
                  deadline: float) -> None:
        """One request on conn; conn is given back if clean, else closed."""
        keep = False
        conn.answered = False
        try:
            keep = self._request(conn, view, offset, total, deadline)
        except TimeoutError:
            raise RetryableError("timed out (read)", timed_out=True) from None
        except h11.ProtocolError as e:
            raise RetryableError(f"bad answer from the server: {e}") from None
        except (EOFError, OSError) as e:
            if conn.reused and not conn.answered:
                raise _Stale() from e
            raise RetryableError(describe(e)) from None
        finally:
            if keep:
                self._give_back(conn)
            else:
                conn.close()

    def _request(self, conn: _Conn, view: memoryview, offset: int, total: int,
                 deadline: float) -> bool:
        """Whether conn is reusable after the request; raises on any failure."""
        t, sock, n = self.target, conn.sock, len(view)
        h = h11.Connection(h11.CLIENT)
        headers = [*t.headers, (b"Range", b"bytes=%d-%d" % (offset, offset + n - 1))]
        out = h.send(h11.Request(method=b"GET", target=t.path, headers=headers))
        assert out is not None
        _set_deadline(sock, deadline)
        sock.sendall(out)
        h.send(h11.EndOfMessage())
        while True:  # the head
            ev = h.next_event()
            if ev is h11.NEED_DATA:
                _set_deadline(sock, deadline)
                chunk = sock.recv(HEAD_READ)
                if not chunk:
                    raise EOFError("the server closed the connection")
                conn.answered = True
                h.receive_data(chunk)
            elif isinstance(ev, h11.Response):
                break
            elif not isinstance(ev, h11.InformationalResponse):
                raise h11.RemoteProtocolError(f"unexpected {type(ev).__name__}")
        reason = f"HTTP {ev.status_code} {ev.reason.decode('latin-1')}".rstrip()
        if ev.status_code in RETRIED_STATUS:
            raise RetryableError(reason)
        if ev.status_code != 206:
            raise FatalError(f"{reason} to a range request")
        head = {k.decode("latin-1"): v.decode("latin-1") for k, v in ev.headers}  # lower case
        m = CONTENT_RANGE.fullmatch(head.get("content-range", ""))
        if not m or (int(m.group(1)), int(m.group(2))) != (offset, offset + n - 1):
            raise FatalError(f"the server answered another range "
                             f"({head.get('content-range')!r} for {offset}-{offset + n - 1})")
        if m.group(3) != str(total):
            raise FatalError(f"the file changed size on the server ({m.group(3)}, was {total})")
        if head.get("content-encoding", "identity").lower() != "identity":
            raise FatalError(f"the server encoded the answer ({head['content-encoding']})")
        length = head.get("content-length")
        got = 0
        while True:  # what h11 already holds of the body
            ev = h.next_event()
            if isinstance(ev, h11.Data):
                k = len(ev.data)
                if got + k > n:
                    raise RetryableError(f"long answer (more than {n} bytes)")
                view[got:got + k] = ev.data
                got += k
            elif isinstance(ev, h11.EndOfMessage):
                if got != n:
                    raise RetryableError(f"short answer ({got} of {n} bytes)")
                return _reusable(h, head)
            elif ev is h11.NEED_DATA:
                if length is not None:
                    break
                _set_deadline(sock, deadline)  # no length (chunked): through h11
                chunk = sock.recv(HEAD_READ)
                if not chunk:
                    raise RetryableError(f"short answer ({got} of {n} bytes)")
                h.receive_data(chunk)
            else:
                raise h11.RemoteProtocolError(f"unexpected {type(ev).__name__}")
        if int(length) != n:
            raise FatalError(f"the answer's length ({length}) is not the range's ({n})")
        while got < n:  # the rest, straight into view
            _set_deadline(sock, deadline)
            k = sock.recv_into(view[got:], n - got)
            if k == 0:
                raise RetryableError(f"short answer ({got} of {n} bytes)")
            got += k
        close = "close" in head.get("connection", "").lower()
        return not close and _speaks_http11(h)


def _speaks_http11(h: h11.Connection) -> bool:
    """Whether the server speaks HTTP/1.1 (keeps connections alive unless told not to)."""
    return h.their_http_version == b"1.1"


def _reusable(h: h11.Connection, head: dict[str, str]) -> bool:
    return h.their_state is h11.DONE and "close" not in head.get("connection", "").lower() \
        and _speaks_http11(h)
