"""Cluster mapping (QEMU: qcow2-cluster.c): the L1 table, L2 lookups, guest ranges as runs
of one kind, and L2 tables made writable (allocated, or copied when shared).

A guest range is looked up one L2 table at a time ("chunks": the guest bytes one L2
table maps). Entries that point at an unaligned offset or outside the file are refused
(corruption), never followed.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from vdisk.engine.image import Status
from vdisk.engine.qcow2.alloc import Allocator
from vdisk.engine.qcow2.cache import L2Cache
from vdisk.engine.qcow2.fileio import ImageFile
from vdisk.engine.qcow2.header import Header
from vdisk.engine.qcow2.layout import (
    ALL_ALLOC,
    COMP,
    COMPRESSED,
    COPIED,
    DATA,
    OFFSET_MASK,
    UNALLOC,
    ZERO,
    ZEROES,
    compressed_range,
)
from vdisk.engine.qcow2.overlap import MetadataMap
from vdisk.engine.qcow2.refcount import Refcounts

Guard = Callable[[int, int, str, int], None]  # (first cluster, count, own, own cluster)
Corruption = Callable[[str], OSError]  # marks the image corrupt; the error to raise


@dataclass(slots=True)
class Run:
    """Guest bytes [guest, guest+length) of one kind (layout.UNALLOC, ZEROES, DATA, COMP)
    within one L2 table. host: for DATA the host offset of `guest`, for COMP the L2 entry
    (one cluster per run), else 0."""

    guest: int
    length: int
    kind: int
    host: int


class L2Entry(NamedTuple):
    entry: int
    bitmap: int  # extended L2: the subcluster bitmap; 0 for standard entries


class L2Ref(NamedTuple):
    """A cached L2 table and its host offset."""

    offset: int
    table: array[int]


class ClusterMap:
    """L1/L2 lookups of one image. The L1 table is in memory (`l1`); L2 tables come from
    the L2Cache. `alloc`, `rc` and `meta` are only used to make tables writable."""

    def __init__(self, f: ImageFile, hdr: Header, l2: L2Cache, rc: Refcounts,
                 alloc: Allocator | None, meta: MetadataMap | None, guard: Guard,
                 corruption: Corruption) -> None:
        self.f = f
        self.l2 = l2
        self.rc = rc
        self.alloc = alloc
        self.meta = meta
        self.l1_offset = hdr.l1_table_offset
        self.cluster_bits = cb = hdr.cluster_bits
        self.cluster_size = 1 << cb
        self.extended = hdr.extended_l2
        self.v3 = hdr.version >= 3
        self.ew = 2 if self.extended else 1  # 64-bit words per L2 entry
        self.l2_bits = cb - 3 - (1 if self.extended else 0)
        self.l2_entries = 1 << self.l2_bits
        self.chunk_bits = cb + self.l2_bits  # guest bytes one L2 table maps
        self.sc_bits = cb - 5  # subcluster bits (extended L2)
        raw = f.pread(hdr.l1_size * 8, hdr.l1_table_offset) if hdr.l1_size else b""
        self.l1 = array("Q", raw)
        self.l1.byteswap()
        self._guard = guard
        self._corruption = corruption

    # -- lookups ------------------------------------------------------------------------
    def table(self, l1i: int) -> array[int] | None:
        """The L2 table of L1 index l1i (read into the cache), None if unallocated."""
        if l1i >= len(self.l1):
            return None
        off = self.l1[l1i] & OFFSET_MASK
        if not off:
            return None
        t = self.l2.get(off)
        if t is not None:
            return t
        cs = self.cluster_size
        if off & (cs - 1):
            raise self._corruption(f"L2 table offset 0x{off:x} (L1 index {l1i}) is unaligned")
        if off + cs > self.f.size:
            raise self.f.eio(f"L2 table offset 0x{off:x} (L1 index {l1i}) lies beyond the end "
                             f"of file")
        t = array("Q", self.f.pread(cs, off))
        t.byteswap()
        self.l2.put(off, t)
        return t

    def chunks(self, offset: int, end: int) -> list[tuple[int, int]]:
        """[offset, end) cut at L2 table boundaries: (start, end) pairs."""
        out = []
        pos = offset
        cb = self.chunk_bits
        while pos < end:
            ce = min(((pos >> cb) + 1) << cb, end)
            out.append((pos, ce))
            pos = ce
        return out

    def table_offsets(self, offset: int, end: int, limit: int = 1 << 30) -> list[int]:
        """Host offsets of the allocated L2 tables mapping [offset, end), at most limit."""
        out: list[int] = []
        l1 = self.l1
        for l1i in range(offset >> self.chunk_bits,
                         min(((end - 1) >> self.chunk_bits) + 1, len(l1))):
            off = l1[l1i] & OFFSET_MASK
            if off:
                out.append(off)
                if len(out) >= limit:
                    break
        return out

    def entry(self, l2: array[int], idx: int) -> L2Entry:
        """Entry idx of table l2, refusing entries that point outside the file."""
        if self.extended:
            e, bm = l2[idx * 2], l2[idx * 2 + 1]
        else:
            e, bm = l2[idx], 0
        if e & COMPRESSED:
            host = compressed_range(e, self.cluster_bits)[0]
            if host >= self.f.size:
                raise self.f.eio(f"compressed cluster at 0x{host:x} lies beyond the end of file")
        else:
            off = e & OFFSET_MASK
            if off & (self.cluster_size - 1):
                raise self._corruption(f"L2 entry 0x{e:x} has an unaligned cluster offset")
            if off and off + self.cluster_size > self.f.size:
                raise self.f.eio(f"L2 entry 0x{e:x} points beyond the end of file")
        return L2Entry(e, bm)

    def map(self, offset: int, end: int) -> list[Run]:
        """The runs of [offset, end), which lies within one L2 table."""
        l2 = self.table(offset >> self.chunk_bits)
        if l2 is None:
            return [Run(offset, end - offset, UNALLOC, 0)]
        if not self.extended and end - offset > self.cluster_size:
            host = self.contiguous_run(l2, offset, end)
            if host is not None:
                return [Run(offset, end - offset, DATA, host)]
        segs: list[Run] = []
        pos = offset
        cb, cs = self.cluster_bits, self.cluster_size
        mask = self.l2_entries - 1
        while pos < end:
            cstart = pos & ~(cs - 1)
            cend = min(cstart + cs, end)
            idx = (pos >> cb) & mask
            e = l2[idx * self.ew]
            if e & COMPRESSED:
                segs.append(Run(pos, cend - pos, COMP, e))
            elif not self.extended:
                self._map_standard(segs, e, pos, cstart, cend)
            else:
                self._map_extended(segs, e, l2[idx * 2 + 1], pos, cstart, cend)
            pos = cend
        return segs

    def _map_standard(self, segs: list[Run], e: int, pos: int, cstart: int, cend: int) -> None:
        off = e & OFFSET_MASK
        if self.v3 and e & ZERO:
            _add(segs, pos, cend - pos, ZEROES, 0)
        elif not off:
            _add(segs, pos, cend - pos, UNALLOC, 0)
        else:
            if off & (self.cluster_size - 1):
                raise self._corruption(f"data cluster offset 0x{off:x} is unaligned")
            _add(segs, pos, cend - pos, DATA, off + pos - cstart)

    def _map_extended(self, segs: list[Run], e: int, bm: int, pos: int, cstart: int,
                      cend: int) -> None:
        off = e & OFFSET_MASK
        alloc, zero = bm & ALL_ALLOC, bm >> 32
        if alloc & zero or (alloc and (not off or off & (self.cluster_size - 1))):
            raise self._corruption(f"invalid extended L2 entry 0x{e:x}/0x{bm:x}")
        if alloc == ALL_ALLOC:
            _add(segs, pos, cend - pos, DATA, off + pos - cstart)
        elif zero == ALL_ALLOC:
            _add(segs, pos, cend - pos, ZEROES, 0)
        elif not alloc and not zero:
            _add(segs, pos, cend - pos, UNALLOC, 0)
        else:
            sb = self.sc_bits
            p = pos
            while p < cend:
                s = (p - cstart) >> sb
                se = min(cstart + ((s + 1) << sb), cend)
                if alloc >> s & 1:
                    _add(segs, p, se - p, DATA, off + p - cstart)
                elif zero >> s & 1:
                    _add(segs, p, se - p, ZEROES, 0)
                else:
                    _add(segs, p, se - p, UNALLOC, 0)
                p = se

    def first_run(self, a: int, b: int) -> tuple[Status, int] | None:
        """(status, length) of the first run of [a, b) (one L2 table, standard entries) with
        one status; None if an entry needs map()'s checks (an unaligned data offset)."""
        l2 = self.table(a >> self.chunk_bits)
        if l2 is None:
            return Status.UNALLOCATED, b - a
        cb = self.cluster_bits
        mask = self.l2_entries - 1
        i0 = (a >> cb) & mask
        i1 = ((b - 1) >> cb) & mask
        zbit = ZERO if self.v3 else 0
        lowbits = self.cluster_size - 1

        def kind(e: int) -> int:  # 0 unallocated, 1 zero, 2 data; -1: let map() decide
            if e & COMPRESSED:
                return 2
            if e & zbit:
                return 1
            off = e & OFFSET_MASK
            if not off:
                return 0
            return -1 if off & lowbits else 2

        k = kind(l2[i0])
        if k < 0:
            return None
        i = i0 + 1
        while i <= i1:
            k2 = kind(l2[i])
            if k2 != k:
                if k2 < 0:
                    return None
                break
            i += 1
        end = min(b, ((a >> cb) + (i - i0)) << cb)
        return (Status.UNALLOCATED, Status.ZERO, Status.DATA)[k], end - a

    def contiguous_run(self, l2: array[int], offset: int, end: int) -> int | None:
        """Host offset of `offset` if [offset, end) (one L2 table, standard entries) is a
        single run of contiguous plain data clusters, else None. One fast scan."""
        cb = self.cluster_bits
        mask = self.l2_entries - 1
        i0 = (offset >> cb) & mask
        i1 = ((end - 1) >> cb) & mask
        first = l2[i0]
        off = first & OFFSET_MASK
        if (not off or first & COMPRESSED or (self.v3 and first & ZERO)
                or off & (self.cluster_size - 1)):
            return None
        k = first
        step = 1 << cb
        for e in l2[i0 + 1:i1 + 1]:
            k += step
            if e != k:
                return None
        return off + (offset & (self.cluster_size - 1))

    # -- tables for writing -------------------------------------------------------------
    def write_l1(self, l1i: int, value: int) -> None:
        if self.meta is not None:
            ent = (self.l1_offset + l1i * 8) >> self.cluster_bits
            self._guard(ent, 1, "active L1 table", -1)
            self.meta.l1_changed(self.l1[l1i], value)
        self.l1[l1i] = value
        self.f.pwrite(struct.pack(">Q", value), self.l1_offset + l1i * 8)

    def writable_table(self, l1i: int) -> L2Ref:
        """The L2 table for l1i, allocated or copied so that it may be modified."""
        assert self.alloc is not None
        e = self.l1[l1i]
        off = e & OFFSET_MASK
        if off:
            t = self.table(l1i)
            assert t is not None
            c = off >> self.cluster_bits
            if e & COPIED:
                self._guard(c, 1, "active L2 table", c)
                return L2Ref(off, t)
            if self.rc.get(c) == 1:
                self._guard(c, 1, "active L2 table", c)
                self.write_l1(l1i, off | COPIED)
                return L2Ref(off, t)
            src = array("Q", t)
        else:
            src = array("Q", bytes(self.cluster_size))
        start, _ = self.alloc.alloc(1)
        new = start << self.cluster_bits
        be = array("Q", src)
        be.byteswap()
        try:
            self.f.pwrite(be.tobytes(), new)
        except OSError:
            self.alloc.unalloc(start, 1)
            raise
        self.f.unsynced = True
        self.f.barrier()  # refcount and table content before the L1 entry
        self.write_l1(l1i, new | COPIED)
        self.l2.put(new, src)
        if off:
            self.l2.forget(off)
            self.alloc.queue_free(off >> self.cluster_bits, 1)
        return L2Ref(new, src)


def _add(segs: list[Run], g: int, n: int, k: int, h: int) -> None:
    """Append a run, merged into the last one when it continues it."""
    if segs:
        last = segs[-1]
        if last.kind == k and k != COMP and (k != DATA or last.host + last.length == h):
            last.length += n
            return
    segs.append(Run(g, n, k, h))
