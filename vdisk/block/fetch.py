"""Fetches from network sources: in parallel, in worker threads, each range once.

A remote chain's data is fetched outside the device's locks (vdisk.engine.plan), so a
slow or dead server holds up only the requests that need its data. Large pieces are
cut into FETCH_PIECE requests that run concurrently, at most `inflight` at a time per
device; a request for a range that an in-flight fetch already covers waits for that
fetch instead of asking the server again. The window adapts: a stream step asks for
`window` pieces, and the window doubles while that raises the throughput and halves
when it does not.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from vdisk.engine.remote import RemoteSource

log = logging.getLogger("vdisk.fetch")

FETCH_PIECE = 1 << 20  # bytes per request to a server
DEFAULT_INFLIGHT = 16  # requests in flight per device, at most
LOG_EVERY = 10.0  # seconds between two log lines about the same failing source


@dataclass(eq=False)
class _InFlight:
    source: RemoteSource
    host: int
    length: int
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: OSError | None = None


class Fetcher:
    """The fetches of one device."""

    def __init__(self, drive_id: str, inflight: int = DEFAULT_INFLIGHT) -> None:
        self.drive_id = drive_id
        self.inflight = max(1, inflight)
        self._limiter = trio.CapacityLimiter(self.inflight)
        self._running: list[_InFlight] = []
        self._logged: dict[str, float] = {}
        self.window = min(4, self.inflight)  # pieces per stream step
        self._last_rate = 0.0
        self.requests = 0  # sent to servers (for tests and statistics)
        self.joined = 0  # answered by a fetch already in flight

    async def fetch(self, source: RemoteSource, host: int, length: int) -> bytes:
        """length bytes at host of source; OSError (naming the URL) if it cannot be had."""
        if length <= FETCH_PIECE:
            return await self._one(source, host, length)
        parts: list[bytes] = [b""] * (-(-length // FETCH_PIECE))

        async def part(i: int) -> None:
            off = i * FETCH_PIECE
            parts[i] = await self._one(source, host + off, min(FETCH_PIECE, length - off))

        try:
            async with trio.open_nursery() as nursery:
                for i in range(len(parts)):
                    nursery.start_soon(part, i)
        except BaseExceptionGroup as eg:  # one error for the caller: the first read error
            err = eg.subgroup(OSError)
            if err is None:
                raise
            first: BaseException = err
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        return b"".join(parts)

    async def _one(self, source: RemoteSource, host: int, length: int) -> bytes:
        for f in self._running:
            if f.source is source and f.host <= host and host + length <= f.host + f.length:
                self.joined += 1
                await f.done.wait()
                if f.error is not None:
                    raise f.error
                assert f.data is not None
                return f.data[host - f.host:host - f.host + length]
        f = _InFlight(source, host, length)
        self._running.append(f)
        self.requests += 1
        try:
            f.data = await trio.to_thread.run_sync(source.pread, length, host,
                                                   limiter=self._limiter)
            return f.data
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

    def step_done(self, nbytes: int, seconds: float) -> None:
        """Adapt the window to the throughput of the last stream step."""
        if nbytes <= 0 or seconds <= 0:
            return
        rate = nbytes / seconds
        if rate > self._last_rate * 1.1:
            self.window = min(self.window * 2, self.inflight)
        elif rate < self._last_rate * 0.7:
            self.window = max(1, self.window // 2)
        self._last_rate = rate

    @property
    def step(self) -> int:
        """Bytes a stream step should fetch now."""
        return self.window * FETCH_PIECE
