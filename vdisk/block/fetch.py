"""Fetches from network sources: in parallel, in worker threads, each range once.

A remote chain's data is fetched outside the device's locks (vdisk.engine.plan), so a
slow or dead server holds up only the requests that need its data. Large pieces are
cut into FETCH_PIECE requests that run concurrently, at most `inflight` at a time per
device; a request for a range that an in-flight fetch already covers waits for that
fetch instead of asking the server again. The window adapts to the latency: a stream
step asks for `window` pieces, as many as the bandwidth-delay product of the measured
latency at TARGET_RATE (a server 20 ms away: the whole `inflight`; loopback: 2).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from vdisk.engine.remote import RemoteSource

log = logging.getLogger("vdisk.fetch")
T = TypeVar("T")

FETCH_PIECE = 1 << 20  # bytes per request to a server
TARGET_RATE = 1 << 30  # bytes/s a window aims at: the bandwidth-delay product sizes it
DEFAULT_INFLIGHT = 16  # requests in flight per device, at most
LOG_EVERY = 10.0  # seconds between two log lines about the same failing source


@dataclass(eq=False)
class _InFlight:
    source: RemoteSource
    host: int
    length: int
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None  # kept for the fetches that joined (the owner's buffer
    joiners: int = 0  # may be reused once it is told)
    error: OSError | None = None


async def first_error(aw: Awaitable[T]) -> T:
    """Await aw; an exception group of OSErrors from its nursery becomes its first one
    (one error for the caller: the first read error)."""
    try:
        return await aw
    except BaseExceptionGroup as eg:
        err = eg.subgroup(OSError)
        if err is None:
            raise
        first: BaseException = err
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


class Fetcher:
    """The fetches of one device."""

    def __init__(self, drive_id: str, inflight: int = DEFAULT_INFLIGHT) -> None:
        self.drive_id = drive_id
        self.inflight = max(1, inflight)
        self._limiter = trio.CapacityLimiter(self.inflight)
        self._running: list[_InFlight] = []
        self._logged: dict[str, float] = {}
        self._latency = 0.0  # seconds a request takes (moving average)
        self.requests = 0  # sent to servers (for tests and statistics)
        self.joined = 0  # answered by a fetch already in flight

    async def fetch_into(self, buf: memoryview, source: RemoteSource, host: int) -> None:
        """Fill buf from host of source, in FETCH_PIECE requests run concurrently; OSError
        (naming the URL) if the data cannot be had."""
        n = len(buf)

        async def part(off: int) -> None:
            await self._one(buf[off:off + min(FETCH_PIECE, n - off)], source, host + off)

        if n <= FETCH_PIECE:
            await part(0)
            return

        async def all_parts() -> None:
            async with trio.open_nursery() as nursery:
                for off in range(0, n, FETCH_PIECE):
                    nursery.start_soon(part, off)

        await first_error(all_parts())

    async def _one(self, view: memoryview, source: RemoteSource, host: int) -> None:
        """Fill view from host: joins a fetch in flight that covers it, else reads (into
        view itself when the source has pread_into)."""
        length = len(view)
        for f in self._running:
            if f.source is source and f.host <= host and host + length <= f.host + f.length:
                self.joined += 1
                f.joiners += 1
                await f.done.wait()
                if f.data is None:  # failed, or cancelled before it could start
                    raise f.error or OSError(errno.EIO, f"{source.url}: fetch cancelled")
                view[:] = f.data[host - f.host:host - f.host + length]
                return
        f = _InFlight(source, host, length)
        self._running.append(f)
        self.requests += 1
        into = getattr(source, "pread_into", None)
        try:
            t0 = time.monotonic()
            if into is not None:
                await trio.to_thread.run_sync(into, view, host, limiter=self._limiter)
            else:
                view[:] = await trio.to_thread.run_sync(source.pread, length, host,
                                                        limiter=self._limiter)
            took = time.monotonic() - t0
            self._latency = took if not self._latency else 0.8 * self._latency + 0.2 * took
            if f.joiners:
                f.data = bytes(view)
        except OSError as e:
            f.error = e
            self._failed(source, e)
            raise
        finally:
            self._running.remove(f)
            f.done.set()

    def _failed(self, source: RemoteSource, e: OSError) -> None:
        now = time.monotonic()
        if now - self._logged.get(source.url, -LOG_EVERY) >= LOG_EVERY:
            self._logged[source.url] = now
            log.warning("%s: reading %s failed: %s", self.drive_id, source.url, e)

    @property
    def window(self) -> int:
        """Requests a stream step asks for: the bandwidth-delay product, up to twice what
        may be in flight (the second half is fetched while the first is written)."""
        return max(8, min(2 * self.inflight,
                          round(2 * self._latency * TARGET_RATE / FETCH_PIECE)))

    @property
    def step(self) -> int:
        """Bytes a stream step should fetch now."""
        return self.window * FETCH_PIECE
