"""Bounded LRU caches for metadata tables, and the L2 write-back cache (QEMU: qcow2-cache.c).

An LRUCache's optional `on_evict(key, value)` hook runs before an entry is dropped for
space; if it raises, the entry stays cached.

L2Cache holds L2 tables by host offset. A changed table stays in memory, dirty: the span
of entries [lo, hi) to write. Dirty tables go to the file (one pwrite per table span) in
write_back(), which runs on flush, before a dirty table is evicted, and before queued
frees are applied; it starts with barrier(data=True), so an L2 entry on disk only ever
names clusters whose refcount, data and file size are on disk already.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from vdisk.engine.qcow2.fileio import ImageFile

K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most `capacity` entries; the least recently used one is dropped first."""

    def __init__(self, capacity: int, on_evict: Callable[[K, V], None] | None = None) -> None:
        self.capacity = max(1, capacity)
        self.on_evict = on_evict
        self._d: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: K, value: V) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.capacity:
            old, v = next(iter(self._d.items()))
            if self.on_evict is not None:
                self.on_evict(old, v)
            self._d.pop(old, None)

    def drop(self, key: K) -> None:
        self._d.pop(key, None)

    def clear(self) -> None:
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d


@dataclass(slots=True)
class DirtySpan:
    """The entries [lo, hi) of a cached L2 table that differ from the file."""

    table: array[int]
    lo: int
    hi: int


class L2Cache(LRUCache[int, "array[int]"]):
    """L2 tables by host offset, written back lazily (see the module docstring).

    `words` is the number of 64-bit words per entry (2 with extended L2); `frozen()` is
    true once the image is marked corrupt: its metadata is then left alone.
    """

    def __init__(self, f: ImageFile, capacity: int, words: int,
                 frozen: Callable[[], bool]) -> None:
        super().__init__(capacity, self._evict)
        self.f = f
        self.words = words
        self.dirty: dict[int, DirtySpan] = {}
        self._frozen = frozen

    def mark_dirty(self, offset: int, table: array[int], lo: int, hi: int) -> None:
        """Entries [lo, hi) of table (the L2 table at offset) changed in memory."""
        if self.get(offset) is not table:
            # table left the cache during this request (written back first if it was
            # dirty) and may have been read in again: this object has the new entries
            self.put(offset, table)
        d = self.dirty.get(offset)
        if d is None:
            self.dirty[offset] = DirtySpan(table, lo, hi)
            return
        d.table = table
        if lo < d.lo:
            d.lo = lo
        if hi > d.hi:
            d.hi = hi

    def forget(self, offset: int) -> None:
        """The table at offset is no longer in use (replaced by a copy): drop it unwritten."""
        self.drop(offset)
        self.dirty.pop(offset, None)

    def write_back(self) -> None:
        """Write every dirty table span, after syncing what their entries depend on."""
        if not self.dirty or self._frozen():
            return
        # the refcounts and data of the clusters the entries name reach the disk first
        self.f.barrier(data=True)
        words = self.words
        for offset in list(self.dirty):
            d = self.dirty[offset]
            part = d.table[d.lo * words:d.hi * words]
            part.byteswap()
            self.f.pwrite(part.tobytes(), offset + d.lo * words * 8)
            del self.dirty[offset]

    def _evict(self, offset: int, table: array[int]) -> None:
        """The LRU drops a table: if it is dirty, write all dirty tables back first."""
        if offset in self.dirty:
            self.write_back()
            self.dirty.pop(offset, None)  # corrupt: dropped unwritten
