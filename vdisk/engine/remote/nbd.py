"""NbdSource: a remote image read from an NBD server (the RemoteSource of nbd:// URLs).

One connection (TCP or UNIX socket) carries every request, pipelined by handle: up to
MAX_IN_FLIGHT requests of any threads are in flight at once, which is what a server
shared by one client (qemu-nbd's default --shared=1) allows, and what QEMU's own client
does. A reader thread per connection feeds the sans-IO protocol (nbd_proto) and hands
each reply to the thread waiting for it.

Failures: every request has a deadline (`timeout` seconds). A connection that breaks
(reset, the server restarting, a protocol error, `timeout`/2 of silence with requests
in flight) fails its requests, which reconnect (exponential backoff) and retry, reads
being idempotent; a server error EIO/ENOMEM/ESHUTDOWN is retried too. When the deadline
passes: OSError(ETIMEDOUT or EIO, "<url>: <reason>"). Data is returned whole or not at
all. Start-up failures raise ImageError(url, reason).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass

from vdisk.engine import blocking
from vdisk.engine.remote import nbd_proto as proto
from vdisk.errors import ImageError

log = logging.getLogger("vdisk")

MAX_IN_FLIGHT = 16
RECV_SIZE = 1 << 20
BACKOFF_FIRST = 0.05  # seconds before the first retry; doubled up to BACKOFF_MAX
BACKOFF_MAX = 2.0
POLL = 0.5  # how often an idle reader looks at the clock
RETRIED_ERRORS = (errno.EIO, errno.ENOMEM, errno.ESHUTDOWN)


@dataclass(frozen=True)
class Address:
    host: str | None
    port: int | None
    socket_path: str | None

    def __str__(self) -> str:
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        return f"{self.host}:{self.port}"


class _Lost(Exception):
    """The connection broke; the request may be retried on a new one."""


class _Waiter:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: proto.Event | _Lost | None = None

    def set(self, result: proto.Event | _Lost) -> None:
        self.result = result
        self.done.set()


def _open_socket(address: Address, timeout: float) -> socket.socket:
    if address.socket_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address.socket_path)
        except BaseException:
            sock.close()
            raise
        return sock
    assert address.host is not None and address.port is not None
    sock = socket.create_connection((address.host, address.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Connection:
    """One handshaken connection and its reader thread."""

    def __init__(self, address: Address, export: str, connect_timeout: float,
                 stall: float) -> None:
        self._stall = stall
        self._sock = _open_socket(address, connect_timeout)
        self._client = proto.Client(export)
        try:
            self.export = self._handshake(time.monotonic() + connect_timeout)
        except BaseException as e:
            if isinstance(e, proto.Refused):
                try:  # NBD_OPT_ABORT
                    self._sock.sendall(self._client.data_to_send())
                except OSError:
                    pass
            self._sock.close()
            raise
        self._lock = threading.Lock()  # the client, the waiters, sending
        self._waiters: dict[int, _Waiter] = {}
        self._active = time.monotonic()  # last byte in, or first request after idling
        self.lost: str | None = None
        self._sock.settimeout(min(POLL, stall))
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"nbd-reader {address}")
        self._reader.start()

    def _handshake(self, deadline: float) -> proto.Export:
        while True:
            out = self._client.data_to_send()
            if out:
                self._sock.sendall(out)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the handshake took too long")
            self._sock.settimeout(left)
            data = self._sock.recv(65536)
            if not data:
                self._client.receive_eof()
                raise proto.ProtocolError("the server closed the connection")
            for event in self._client.receive_data(data):
                if isinstance(event, proto.HandshakeDone):
                    return event.export

    def submit(self, command: int, offset: int, length: int,
               into: memoryview | None = None) -> _Waiter:
        """Send a request; into: the buffer a read's reply is written to (see forget)."""
        waiter = _Waiter()
        with self._lock:
            if self.lost is not None:
                raise _Lost(self.lost)
            if command == proto.CMD_READ:
                handle = self._client.read(offset, length, into)
            else:
                handle = self._client.block_status(offset, length)
            if not self._waiters:
                self._active = time.monotonic()
            self._waiters[handle] = waiter
            try:
                self._sock.sendall(self._client.data_to_send())
            except OSError as e:
                self._fail_locked(f"sending failed: {e.strerror or e}")
        return waiter

    def forget(self, waiter: _Waiter) -> None:
        """The caller gave up on waiter: its reply, if it comes, is dropped (and no longer
        written to the caller's buffer)."""
        with self._lock:
            for handle, w in list(self._waiters.items()):
                if w is waiter:
                    del self._waiters[handle]
                    self._client.detach(handle)

    def _read_loop(self) -> None:
        reason = "the server closed the connection"
        # one receive buffer for the connection's life: a fresh 1 MiB per recv() costs
        # a page fault per 4 KiB (measured: the client topped out at 550 MiB/s)
        buf = memoryview(bytearray(RECV_SIZE))
        try:
            while True:
                try:
                    got = self._sock.recv_into(buf)
                    data = buf[:got]
                except TimeoutError:
                    with self._lock:
                        if self.lost is not None:
                            return
                        silent = time.monotonic() - self._active
                        if self._waiters and silent > self._stall:
                            reason = f"no answer from the server for {silent:.1f} s"
                            break
                    continue
                with self._lock:
                    if self.lost is not None:
                        return
                    if not data:
                        self._client.receive_eof()
                        break
                    self._active = time.monotonic()
                    for event in self._client.receive_data(data):
                        assert not isinstance(event, proto.HandshakeDone)
                        waiter = self._waiters.pop(event.handle, None)
                        if waiter is not None:
                            waiter.set(event)
        except proto.NbdError as e:
            reason = str(e)
        except OSError as e:
            reason = f"connection error: {e.strerror or e}"
        with self._lock:
            self._fail_locked(reason)

    def _fail_locked(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        for waiter in self._waiters.values():
            waiter.set(_Lost(reason))
        self._waiters.clear()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def fail(self, reason: str) -> None:
        with self._lock:
            self._fail_locked(reason)

    def close(self) -> None:
        """NBD_CMD_DISC, then close."""
        with self._lock:
            if self.lost is None:
                self._client.disconnect()
                try:
                    self._sock.sendall(self._client.data_to_send())
                except OSError:
                    pass
            self._fail_locked("the connection was closed")
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        self._sock.close()


def _startup_reason(address: Address, e: BaseException, connect_timeout: float) -> str:
    if isinstance(e, proto.Refused):
        return str(e)
    if isinstance(e, proto.ProtocolError):
        return f"bad NBD handshake: {e}"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve host '{address.host}': {e.strerror}"
    if isinstance(e, TimeoutError):
        return f"no answer from the NBD server at {address} within {connect_timeout:g} s"
    if isinstance(e, ConnectionRefusedError):
        return f"connection refused: no NBD server listens at {address}"
    if isinstance(e, FileNotFoundError):
        return f"no NBD server socket at {address.socket_path}"
    if isinstance(e, OSError):
        return f"cannot connect to {address}: {e.strerror or e}"
    return str(e)


class NbdSource:
    """A remote image on an NBD server (read-only), for several threads at once."""

    def __init__(self, url: str, address: Address, export_name: str, timeout: float,
                 connect_timeout: float, connection: _Connection) -> None:
        self.url = url
        self._address = address
        self._export_name = export_name
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._conn: _Connection | None = connection
        self.export = connection.export
        self.size = self.export.size
        self._conn_lock = threading.Lock()  # one thread reconnects, the others wait
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self._status_lock = threading.Lock()
        self._status_cache: tuple[int, tuple[tuple[int, int], ...]] = (0, ())
        self._closed = False

    @classmethod
    def connect(cls, *, host: str | None, port: int | None, socket_path: str | None,
                export: str, url: str, timeout: float, connect_timeout: float) -> NbdSource:
        """Connect and handshake once; ImageError(url, reason) if that fails."""
        address = Address(host, port, socket_path)
        if (socket_path is None) == (host is None):
            raise ImageError(url, "an NBD server is a host and port, or a socket path")
        try:
            conn = _Connection(address, export, connect_timeout, timeout / 2)
        except (OSError, proto.NbdError) as e:
            raise ImageError(url, _startup_reason(address, e, connect_timeout)) from None
        log.debug("%s: NBD export of %d bytes (%s)", url, conn.export.size, conn.export)
        return cls(url, address, export, timeout, connect_timeout, conn)

    # -- RemoteSource -----------------------------------------------------------------

    def pread(self, length: int, offset: int) -> bytes:
        if length <= 0:
            return b""
        blocking.about_to_block(f"NBD read of {length} bytes")
        end = min(offset + length, self.size)
        if offset >= end:
            return bytes(length)
        lo = self.export.min_block
        start = offset // lo * lo
        stop = min(-(-end // lo) * lo, self.size)
        deadline = time.monotonic() + self._timeout
        parts = []
        step = self.export.max_block
        for at in range(start, stop, step):
            event = self._request(proto.CMD_READ, at, min(step, stop - at), deadline)
            assert isinstance(event, proto.ReadDone)
            parts.append(event.data)
        data = b"".join(parts)[offset - start : end - start]
        return data + bytes(length - len(data))

    def pread_into(self, view: memoryview, offset: int) -> None:
        """pread() into view, the replies written straight into it where the range is
        aligned to the server's blocks (else through pread)."""
        n = len(view)
        end = min(offset + n, self.size)
        lo = self.export.min_block
        if n <= 0 or offset >= end or offset % lo or (end % lo and end != self.size):
            view[:] = self.pread(n, offset)
            return
        blocking.about_to_block(f"NBD read of {n} bytes")
        deadline = time.monotonic() + self._timeout
        step = self.export.max_block
        for at in range(offset, end, step):
            k = min(step, end - at)
            self._request(proto.CMD_READ, at, k, deadline, view[at - offset:at - offset + k])
        if end < offset + n:
            view[end - offset:] = bytes(offset + n - end)

    def block_status(self, offset: int, length: int) -> tuple[int, bool] | None:
        if self.export.meta_context is None or offset >= self.size or length <= 0:
            return None
        length = min(length, self.size - offset)
        found = self._cached_status(offset)
        if found is None:
            blocking.about_to_block("NBD block status")
            lo = self.export.min_block
            start = offset // lo * lo
            asked = min(self.size - start, proto.MAX_LENGTH // lo * lo)
            event = self._request(proto.CMD_BLOCK_STATUS, start, asked,
                                  time.monotonic() + self._timeout)
            assert isinstance(event, proto.StatusDone)
            with self._status_lock:
                self._status_cache = (start, event.extents)
            found = self._cached_status(offset)
            if found is None:  # the server described less than the block at offset
                return None
        run, flags = found
        return min(run, length), bool(flags & proto.STATE_ZERO)

    def close(self) -> None:
        with self._conn_lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- internals --------------------------------------------------------------------

    def _cached_status(self, offset: int) -> tuple[int, int] | None:
        with self._status_lock:
            pos, extents = self._status_cache
        for length, flags in extents:
            if pos <= offset < pos + length:
                return pos + length - offset, flags
            pos += length
        return None

    def _fail(self, code: int, reason: str) -> OSError:
        return OSError(code, f"{self.url}: {reason}")

    def _request(self, command: int, offset: int, length: int, deadline: float,
                 into: memoryview | None = None) -> proto.Event:
        """The reply to one request, retried on lost connections and transient errors;
        a read with into fills it (a retry fills it again)."""
        what = "read" if command == proto.CMD_READ else "block status"
        backoff = BACKOFF_FIRST
        tries = 0
        while True:
            tries += 1
            left = deadline - time.monotonic()
            if not self._slots.acquire(timeout=max(left, 0)):
                raise self._fail(errno.ETIMEDOUT, f"{what} timed out waiting for a slot")
            try:
                conn = self._connection(deadline)
                try:
                    waiter = conn.submit(command, offset, length, into)
                except _Lost as lost:
                    reason = str(lost)
                else:
                    if not waiter.done.wait(max(deadline - time.monotonic(), 0)):
                        conn.forget(waiter)
                        raise self._fail(errno.ETIMEDOUT, f"{what} of {length} bytes at "
                                         f"{offset}: no answer within {self._timeout:g} s")
                    result = waiter.result
                    if isinstance(result, proto.CommandFailed):
                        name = errno.errorcode.get(result.error, str(result.error))
                        reason = f"server error {name}" + (
                            f" ({result.message})" if result.message else "")
                        if result.error not in RETRIED_ERRORS:
                            raise self._fail(errno.EIO, f"{what} of {length} bytes at "
                                             f"{offset}: {reason}")
                        if result.error == errno.ESHUTDOWN:
                            conn.fail("the server is shutting down")
                    elif isinstance(result, _Lost):
                        reason = str(result)
                    else:
                        assert result is not None
                        return result
            finally:
                self._slots.release()
            log.warning("%s: %s of %d bytes at %d failed (%s); retrying", self.url, what,
                        length, offset, reason)
            if deadline - time.monotonic() <= backoff:  # no time left for another try
                raise self._fail(errno.EIO, f"{what} of {length} bytes at {offset} "
                                 f"failed {tries} times, last: {reason}")
            time.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _connection(self, deadline: float) -> _Connection:
        """The live connection, made anew (with backoff) if the last one broke."""
        if not self._conn_lock.acquire(timeout=max(deadline - time.monotonic(), 0)):
            raise self._fail(errno.ETIMEDOUT, "timed out waiting for the reconnection")
        try:
            if self._closed:
                raise self._fail(errno.EIO, "the source is closed")
            if self._conn is not None and self._conn.lost is None:
                return self._conn
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            return self._reconnect(deadline)
        finally:
            self._conn_lock.release()

    def _reconnect(self, deadline: float) -> _Connection:
        backoff = BACKOFF_FIRST
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                conn = _Connection(self._address, self._export_name,
                                   min(self._connect_timeout, left), self._timeout / 2)
            except (OSError, proto.NbdError) as e:
                reason = _startup_reason(self._address, e, min(self._connect_timeout,
                                                               max(left, 0)))
                if deadline - time.monotonic() <= backoff:
                    raise self._fail(errno.EIO, f"cannot reconnect: {reason}") from None
                log.debug("%s: reconnecting failed (%s)", self.url, reason)
                time.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if conn.export.size != self.size:
                conn.close()
                raise self._fail(errno.EIO, f"the export changed size from {self.size} "
                                 f"to {conn.export.size} bytes")
            log.warning("%s: reconnected to the NBD server", self.url)
            self._conn = conn
            self.export = conn.export
            return conn
