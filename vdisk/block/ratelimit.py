"""A byte-rate limiter that works in time slices (100 ms by default).

Each slice may carry `speed * slice` bytes. Work dispatched past that quota stretches
the current slice in proportion, and `delay()` tells the caller how long to wait
before dispatching more. The caller never runs ahead by more than one slice's
quota plus one dispatch, so keeping each dispatch within `quota()` bounds bursts
to about one slice. A speed of 0 means unlimited. Pure logic: the clock is passed in.
"""

from __future__ import annotations

SLICE = 0.1  # seconds


class RateLimiter:
    """Slice-based limiter; times are seconds on any monotonic clock."""

    def __init__(self, speed: int = 0, slice_time: float = SLICE) -> None:
        if slice_time <= 0:
            raise ValueError("slice_time must be positive")
        self.slice_time = slice_time
        self.speed = 0
        self._start = 0.0
        self._end = 0.0
        self._dispatched = 0
        self.set_speed(speed)

    def set_speed(self, speed: int) -> None:
        """Change the limit (bytes/s, 0 = unlimited); starts a fresh slice."""
        if speed < 0:
            raise ValueError("speed must be non-negative")
        self.speed = speed
        self._start = self._end = 0.0
        self._dispatched = 0

    def quota(self) -> int:
        """Bytes one slice may carry (0 when unlimited)."""
        return int(self.speed * self.slice_time)

    def charge(self, nbytes: int, now: float) -> None:
        """Record nbytes dispatched at time now."""
        if self.speed == 0 or nbytes <= 0:
            return
        if now >= self._end:
            self._start, self._end, self._dispatched = now, now + self.slice_time, 0
        self._dispatched += nbytes

    def delay(self, now: float) -> float:
        """Seconds to wait (from now) before the next dispatch; 0 when allowed now."""
        if self.speed == 0:
            return 0.0
        if now >= self._end:
            return 0.0
        quota = self.speed * self.slice_time
        if self._dispatched < quota:
            return 0.0
        # The slice carried more than its quota: stretch it so the average holds.
        self._end = self._start + self.slice_time * (self._dispatched / quota)
        return max(0.0, self._end - now)
