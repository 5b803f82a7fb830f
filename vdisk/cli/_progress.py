"""Progress display for long operations: a redrawn bar on a TTY, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30
PLAIN_INTERVAL = 1.0  # seconds between plain lines


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def render(label: str, done: int, total: int, rate: float | None = None, bar: bool = True) -> str:
    frac = done / total if total else 1.0
    frac = min(max(frac, 0.0), 1.0)
    parts = [label]
    if bar:
        filled = int(frac * WIDTH)
        parts.append("[" + "#" * filled + "." * (WIDTH - filled) + "]")
    parts.append(f"{frac * 100:5.1f}%")
    parts.append(f"{human(done)}/{human(total)}")
    if rate is not None:
        parts.append(f"{human(rate)}/s")
    return " ".join(parts)


class Progress:
    """Shows several named progress lines; redraws in place on a TTY."""

    def __init__(self, out: TextIO | None = None, tty: bool | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self._drawn = 0
        self._last_plain = 0.0
        self._rates: dict[str, tuple[float, int]] = {}

    def _rate(self, key: str, done: int) -> float | None:
        now = time.monotonic()
        prev = self._rates.setdefault(key, (now, done))
        dt = now - prev[0]
        return (done - prev[1]) / dt if dt > 0.2 else None

    def update(self, rows: list[tuple[str, int, int]], force: bool = False) -> None:
        """rows: (label, done, total). Plain mode prints at most once a second."""
        lines = [render(lbl, d, t, self._rate(lbl, d), bar=self.tty) for lbl, d, t in rows]
        if self.tty:
            if self._drawn:
                self.out.write(f"\x1b[{self._drawn}F")
            for line in lines:
                self.out.write("\x1b[2K" + line + "\n")
            self._drawn = len(lines)
        else:
            now = time.monotonic()
            if not force and now - self._last_plain < PLAIN_INTERVAL:
                return
            self._last_plain = now
            for line in lines:
                self.out.write(line + "\n")
        self.out.flush()

    def message(self, text: str) -> None:
        """A line that stays (printed below the bars, which are redrawn afterwards)."""
        if self.tty and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
        self.out.write(text + "\n")
        self.out.flush()
