"""Async byte-range locks: overlapping holders are serialized, disjoint ones run in parallel.

Waiters are served in arrival order among those that overlap (a request never
overtakes an earlier overlapping one), so a stream of small reads cannot starve a
whole-device lock and vice versa.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

WHOLE = (0, 1 << 63)


class _Entry:
    __slots__ = ("start", "end", "event", "granted")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.event = trio.Event()
        self.granted = False

    def overlaps(self, other: _Entry) -> bool:
        return self.start < other.end and other.start < self.end


class RangeLock:
    """Exclusive locks on half-open byte ranges [start, end)."""

    def __init__(self) -> None:
        self._entries: list[_Entry] = []  # held and waiting, in arrival order

    @property
    def busy(self) -> bool:
        """True while any range is held or awaited."""
        return bool(self._entries)

    def _grantable(self, entry: _Entry) -> bool:
        for other in self._entries:
            if other is entry:
                return True
            if other.overlaps(entry):
                return False
        return True

    def _wake(self) -> None:
        for entry in self._entries:
            if not entry.granted and self._grantable(entry):
                entry.granted = True
                entry.event.set()

    @asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        """Hold [start, end) for the body of the `async with`."""
        if end <= start:
            end = start + 1
        entry = _Entry(start, end)
        self._entries.append(entry)
        try:
            if self._grantable(entry):
                entry.granted = True
                await trio.lowlevel.checkpoint()
            else:
                await entry.event.wait()
            yield
        finally:
            self._entries.remove(entry)
            self._wake()

    def hold_all(self) -> AbstractAsyncContextManager[None]:
        """Hold the whole device (excludes every other holder)."""
        return self.hold(*WHOLE)
