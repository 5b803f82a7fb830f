"""The daemon's event bus: `emit` fans events out to every subscribed QMP connection.

`EventBus.emit(name, data)` is synchronous and never blocks: call it from any task of the
daemon's trio run (from another thread, go through `trio.from_thread.run_sync`). Each
connection subscribes with a bounded channel; a subscriber whose channel is full is
dropped (its channel is closed, so its connection ends) instead of slowing the emitter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from control.protocol import Event

DEFAULT_SUBSCRIBER_BUFFER = 256


class EventBus:
    """Fan-out of events to subscribers; owned by the daemon."""

    def __init__(self, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._clock_ns = clock_ns
        self._subscribers: set[trio.MemorySendChannel[Event]] = set()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> Event:
        """Timestamp the event now and queue it for every subscriber; returns the event.

        `data` is copied (so later changes by the caller do not leak into queued events);
        data that is not plain JSON raises ValueError here, in the emitter.
        """
        ns = self._clock_ns()
        try:
            copied = json.loads(json.dumps(data or {}, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"event {name}: data is not JSON: {e}") from None
        event = Event(name, copied, ns // 1_000_000_000, (ns % 1_000_000_000) // 1000)
        for chan in list(self._subscribers):
            try:
                chan.send_nowait(event)
            except trio.WouldBlock:
                # Too slow: drop the subscriber; its receiver sees the channel end.
                self._subscribers.discard(chan)
                chan.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(chan)
        return event

    @contextmanager
    def subscribe(
        self, max_buffer: int = DEFAULT_SUBSCRIBER_BUFFER
    ) -> Iterator[trio.MemoryReceiveChannel[Event]]:
        """A channel receiving every event emitted while the block runs.

        The channel ends (EndOfChannel) early if the subscriber fell `max_buffer` behind.
        """
        send, recv = trio.open_memory_channel[Event](max_buffer)
        self._subscribers.add(send)
        try:
            yield recv
        finally:
            self._subscribers.discard(send)
            send.close()
            recv.close()
