"""Page-aligned buffers for bulk copies, reused rather than allocated per copy.

A copy's buffer is filled from the network or a file and written into the top through
the O_DIRECT fd (vdisk.engine.qcow2.fileio), which needs page-aligned memory; mmap
gives that. Reuse matters too: measured here, memory that is freed and allocated again
costs a page fault per 4 KiB page (about 1 ms per MiB).
"""

from __future__ import annotations

import mmap


class BufferPool:
    """Buffers of `size` bytes; at most `keep` idle ones are kept. Not thread-safe: take
    and give on one thread (the event loop); the views may be filled in any thread."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._idle: list[mmap.mmap] = []

    def take(self, n: int) -> memoryview:
        """A view of n bytes (contents undefined); a pooled buffer when n <= size."""
        if n > self.size:
            return memoryview(mmap.mmap(-1, n))
        buf = self._idle.pop() if self._idle else mmap.mmap(-1, self.size)
        return memoryview(buf)[:n]

    def give(self, view: memoryview) -> None:
        """Return a view from take(); the caller must not use it after this."""
        buf = view.obj
        view.release()
        if isinstance(buf, mmap.mmap) and len(buf) == self.size \
                and len(self._idle) < self.keep:
            self._idle.append(buf)
