"""Where an image's metadata lives: QEMU's overlap check before any write to a cluster.

Before data (or a new table) is written to a host cluster, the driver asks `find` whether
that cluster holds metadata: the header cluster, the active L1 table, the refcount table,
a refcount block, an active L2 table, the snapshot table, a snapshot's L1 table or one of
its L2 tables. A hit means an L1/L2/refcount entry is corrupt: the write must not happen.
"""

from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable

from vdisk.engine.qcow2.fileio import ImageFile
from vdisk.engine.qcow2.header import MAX_L1_BYTES, Header
from vdisk.engine.qcow2.layout import OFFSET_MASK

MAX_INACTIVE_L1_ENTRIES = 1 << 20  # above this, snapshot L2 tables are not tracked
MAX_SNAPSHOT_TABLE = 64 << 20


def _count_in(keys: Iterable[int], n: int, first: int, end: int) -> list[int]:
    """Members of a collection of n keys in [first, end), scanning whichever is smaller."""
    if end - first <= n:
        s = keys if isinstance(keys, set | Counter) else set(keys)
        return [c for c in range(first, end) if c in s]
    return [c for c in keys if first <= c < end]


class MetadataMap:
    """Host clusters holding metadata. Active L2 tables and refcount blocks are live sets
    the driver keeps up to date; the rest is fixed at open (vdisk never moves the L1 table
    nor touches snapshots) except the refcount table, read from the Refcounts object."""

    def __init__(self, f: ImageFile, h: Header, l1: Iterable[int]) -> None:
        self.cb = cb = h.cluster_bits
        cs = 1 << cb
        fixed: list[tuple[int, int, str]] = [(0, 1, "header")]

        def add(off: int, length: int, name: str) -> None:
            if length > 0:
                fixed.append((off >> cb, ((off + length - 1) >> cb) + 1, name))

        add(h.l1_table_offset, h.l1_size * 8, "active L1 table")
        self.inactive_l2: set[int] = set()
        if h.nb_snapshots:
            self._snapshots(f, h, add)
        fixed.sort()
        self.fixed = fixed
        self.starts = [s for s, _, _ in fixed]
        self.longest = max(e - s for s, e, _ in fixed)
        self.l2: Counter[int] = Counter()
        for e in l1:
            off = e & OFFSET_MASK
            if off and not off & (cs - 1):
                self.l2[off >> cb] += 1
        self.reftable = (0, 0)
        self.refblocks: set[int] = set()

    def _snapshots(self, f: ImageFile, h: Header, add) -> None:  # type: ignore[no-untyped-def]
        cs = 1 << h.cluster_bits
        pos = h.snapshots_offset
        end = min(f.size, pos + MAX_SNAPSHOT_TABLE)
        l1s: list[tuple[int, int]] = []
        for _ in range(h.nb_snapshots):
            if pos + 40 > end:
                break
            l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", f.pread(40, pos))
            extra = struct.unpack_from(">I", f.pread(4, pos + 36))[0]
            pos = (pos + 40 + extra + id_len + name_len + 7) & ~7
            if (l1_off and not l1_off & (cs - 1) and l1_size * 8 <= MAX_L1_BYTES
                    and l1_off + l1_size * 8 <= f.size):
                add(l1_off, l1_size * 8, "inactive L1 table")
                l1s.append((l1_off, l1_size))
        add(h.snapshots_offset, min(pos, end) - h.snapshots_offset, "snapshot table")
        if sum(n for _, n in l1s) > MAX_INACTIVE_L1_ENTRIES:
            return
        for off, n in l1s:
            raw = f.pread(n * 8, off)
            for (e,) in struct.iter_unpack(">Q", raw):
                o = e & OFFSET_MASK
                if o and not o & (cs - 1):
                    self.inactive_l2.add(o >> self.cb)

    # -- live updates -------------------------------------------------------------------
    def l1_changed(self, old: int, new: int) -> None:
        cs = 1 << self.cb
        for e, d in ((old, -1), (new, 1)):
            off = e & OFFSET_MASK
            if off and not off & (cs - 1):
                self.l2[off >> self.cb] += d
                if self.l2[off >> self.cb] <= 0:
                    del self.l2[off >> self.cb]

    # -- queries ------------------------------------------------------------------------
    def find(self, first: int, count: int, *, own: str = "", own_cluster: int = -1
             ) -> str | None:
        """The name of metadata in host clusters [first, first+count), else None.

        own names the structure being written (it does not overlap itself); own_cluster
        is the L2 table or refcount block being written, which may not be anything else.
        """
        end = first + count
        if count == 1 and (not own or (own == "active L2 table" and own_cluster == first)):
            # the common cases: one data cluster, or an L2 table about to be modified
            if first in self.refblocks:
                return "refcount block"
            if self.l2.get(first, 0) > (1 if own else 0):
                return "active L2 table"
            if first in self.inactive_l2:
                return "inactive L2 table"
            ts, tn = self.reftable
            if ts <= first < ts + tn:
                return "refcount table"
            i = bisect_right(self.starts, first) - 1
            while i >= 0 and self.starts[i] > first - self.longest:
                s, e, name = self.fixed[i]
                if e > first and name != own:
                    return name
                i -= 1
            return None
        lo = bisect_left(self.starts, first - self.longest + 1)
        for s, e, name in self.fixed[lo:]:
            if s >= end:
                break
            if e > first and name != own:
                return name
        ts, tn = self.reftable
        if ts < end and first < ts + tn and own != "refcount table":
            return "refcount table"
        for c in _count_in(self.refblocks, len(self.refblocks), first, end):
            if own != "refcount block" or c != own_cluster:
                return "refcount block"
        for c in _count_in(self.l2, len(self.l2), first, end):
            if own != "active L2 table" or c != own_cluster or self.l2[c] > 1:
                return "active L2 table"
        if self.inactive_l2 and _count_in(self.inactive_l2, len(self.inactive_l2), first, end):
            return "inactive L2 table"
        return None
