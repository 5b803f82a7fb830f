"""The write planner (QEMU: qcow2_co_pwritev_part and qcow2_alloc_host_offset): data
writes, zero clusters, and copies from another file, one L2 table at a time.

A write to one table is planned before anything is written: each cluster is written in
place (owned and fully allocated), filled (owned, but zero or partly allocated: the rest
comes from the guest view), or copied into a new cluster (unallocated, shared or
compressed). Then the data goes out, new clusters in contiguous runs with their head
and tail filled from the current guest view, and only then are the L2 entries set in the
cached table (see cache.L2Cache for when they reach the file). A failed data write
returns its new clusters to the reserve: no request is ever half applied.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Callable
from typing import Final, NamedTuple

from vdisk.engine.image import Image
from vdisk.engine.qcow2.alloc import Allocator
from vdisk.engine.qcow2.cluster import ClusterMap
from vdisk.engine.qcow2.fileio import ImageFile
from vdisk.engine.qcow2.layout import ALL_ALLOC, ALL_ZERO, COMPRESSED, COPIED, OFFSET_MASK, ZERO
from vdisk.engine.qcow2.refcount import Refcounts

INPLACE: Final = 0  # owned, fully allocated: overwrite
FILL: Final = 1  # owned, zero or partly allocated: write the whole cluster in place
NEW: Final = 2  # not owned: a new cluster, the old one (if any) is freed

_ZEROS = bytes(1 << 21)
Updates = dict[int, tuple[int, int]]  # L2 index -> (entry, extended L2 bitmap)


class ClusterPlan(NamedTuple):
    """What a write does to one guest cluster."""

    cluster: int  # guest cluster index
    action: int  # INPLACE, FILL or NEW
    host: int  # host offset of the cluster now (0: none)
    head: bytes  # guest view before the written bytes (not INPLACE), else b""
    tail: bytes  # guest view after the written bytes (not INPLACE), else b""
    entry: int  # the L2 entry now (freed when a NEW cluster replaces it)


class Writer:
    """Writes of one writable image. view(offset, n) is the current guest view (zeroes
    past the virtual size); guard(first, count) refuses writes onto metadata; prepare()
    runs before the first change to the image (it may rewrite the header)."""

    def __init__(self, f: ImageFile, cmap: ClusterMap, alloc: Allocator, rc: Refcounts,
                 virtual_size: int, guard: Callable[[int, int], None],
                 view: Callable[[int, int], bytes], prepare: Callable[[], None]) -> None:
        self.f = f
        self.map = cmap
        self.alloc = alloc
        self.rc = rc
        self.virtual_size = virtual_size
        self.cluster_bits = cmap.cluster_bits
        self.cluster_size = cmap.cluster_size
        self.extended = cmap.extended
        self.v3 = cmap.v3
        self._guard = guard
        self._view = view
        self._prepare = prepare

    # -- what a write will need --------------------------------------------------------------
    def may_block(self, offset: int, length: int, backing: Image | None,
                  zeroes: bool = False) -> bool:
        """True if a write (zeroes: a zero write) of the range may sync: a new or copied L2
        table, a table not in the cache (its entries are unknown here), more new clusters
        than the reserve holds, a free queue that fills up, or a head or tail read from a
        backing file that blocks. Counts every cluster not written in place as new (and as
        a free if it names one), and with zeroes every cluster as a free: an over-estimate
        only sends a call to a thread."""
        cmap = self.map
        cb = self.cluster_bits
        mask = cmap.l2_entries - 1
        l1 = cmap.l1
        if not zeroes and not self.extended and (offset & (self.cluster_size - 1)) + length \
                <= self.cluster_size:  # the hot path: a write inside one owned cluster
            l1i = offset >> cmap.chunk_bits
            t = cmap.l2.get(l1[l1i] & OFFSET_MASK) if l1i < len(l1) and l1[l1i] & COPIED \
                else None
            if t is not None:
                e = t[(offset >> cb) & mask]
                if (e & COPIED and e & OFFSET_MASK and not e & COMPRESSED
                        and not (self.v3 and e & ZERO)):
                    return False
        news = frees = 0
        for a, b in cmap.chunks(offset, offset + length):
            l1i = a >> cmap.chunk_bits
            if l1i >= len(l1) or not l1[l1i] & COPIED:
                return True
            t = cmap.l2.get(l1[l1i] & OFFSET_MASK)
            if t is None:
                return True
            for ci in range(a >> cb, ((b - 1) >> cb) + 1):
                idx = ci & mask
                if self.extended:
                    e, bm = t[idx * 2], t[idx * 2 + 1]
                    inplace = (bm & ALL_ALLOC) == ALL_ALLOC
                else:
                    e = t[idx]
                    inplace = not (self.v3 and e & ZERO)
                if zeroes and e & (OFFSET_MASK | COMPRESSED):
                    frees += 1
                if e & COPIED and e & OFFSET_MASK and not e & COMPRESSED and inplace:
                    continue
                news += 1
                if not zeroes and e & (OFFSET_MASK | COMPRESSED):
                    frees += 1
        if frees and not self.alloc.frees_fit(frees):
            return True
        if not news:
            return False
        if not self.alloc.fits(news):
            return True
        cs = self.cluster_size
        start = offset & ~(cs - 1)
        return backing is not None and backing.may_block(
            "read", start, min(-(-(offset + length) // cs) * cs, self.virtual_size) - start)

    # -- data -----------------------------------------------------------------------------
    def write(self, offset: int, data: memoryview, direct: bool = False) -> None:
        """direct: bulk data may go through the O_DIRECT fd (ImageFile.pwritev)."""
        for a, b in self.map.chunks(offset, offset + len(data)):
            self.write_chunk(a, data[a - offset:b - offset], direct)

    def write_chunk(self, offset: int, data: memoryview, direct: bool = False) -> None:
        """Write data at offset, within one L2 table."""
        l2off, l2 = self.map.writable_table(offset >> self.map.chunk_bits)
        if self._overwrite(l2, offset, data):
            return
        plans = self._plan(l2, offset, offset + len(data))
        for p in plans:  # before anything is written: no half-done request
            if p.action != NEW:
                self._guard(p.host >> self.cluster_bits, 1)
        updates: Updates = {}
        frees: list[int] = []
        i = 0
        while i < len(plans):
            if plans[i].action == INPLACE:
                i = self._write_in_place(plans, i, offset, data)
            else:
                i = self._write_cow(plans, i, offset, data, updates, frees, direct)
        if updates:
            self.commit(l2off, l2, updates, names_data=True)
        for e in frees:
            self.alloc.free_entry(e)

    def _overwrite(self, l2: array[int], offset: int, data: memoryview) -> bool:
        """The fast paths: data lies in owned plain clusters (one, or a contiguous run),
        written in place with no metadata to touch. False: plan the write."""
        if self.extended:
            return False
        cb, cs = self.cluster_bits, self.cluster_size
        idx = (offset >> cb) & (self.map.l2_entries - 1)
        inner = offset & (cs - 1)
        n = len(data)
        if inner + n <= cs:  # inside one cluster: in place if owned
            e = l2[idx]
            off = e & OFFSET_MASK
            if (e & COPIED and off and not e & COMPRESSED and not off & (cs - 1)
                    and not (self.v3 and e & ZERO) and off + cs <= self.f.size):
                self._guard(off >> cb, 1)
                self.f.pwrite(data, off + inner)
                return True
            return False
        if n > cs and l2[idx] & COPIED:
            host = self.map.contiguous_run(l2, offset, offset + n)
            if host is not None and host + n <= self.f.size:
                self._guard(host >> cb, ((host + n - 1) >> cb) - (host >> cb) + 1)
                self.f.pwrite(data, host)
                return True
        return False

    def _plan(self, l2: array[int], offset: int, end: int) -> list[ClusterPlan]:
        cb, cs = self.cluster_bits, self.cluster_size
        mask = self.map.l2_entries - 1
        zero_ok = self.v3 and not self.extended
        plans = []
        for ci in range(offset >> cb, ((end - 1) >> cb) + 1):
            e, bm = self.map.entry(l2, ci & mask)
            c0 = ci << cb
            off = e & OFFSET_MASK
            owned = False
            if off and not e & COMPRESSED:
                owned = bool(e & COPIED) or self.rc.get(off >> cb) == 1
            if not owned:
                action = NEW
            elif e & COPIED and ((bm & ALL_ALLOC) == ALL_ALLOC if self.extended
                                 else not (zero_ok and e & ZERO)):
                action = INPLACE
            else:
                action = FILL
            head = tail = b""
            if action != INPLACE:
                a, b = max(offset, c0), min(end, c0 + cs)
                if a > c0:
                    head = self._view(c0, a - c0)
                if b < c0 + cs:
                    tail = self._view(b, c0 + cs - b)
            plans.append(ClusterPlan(ci, action, off, head, tail, e))
        return plans

    def _write_in_place(self, plans: list[ClusterPlan], i: int, offset: int,
                        data: memoryview) -> int:
        """Write the run of INPLACE clusters from plans[i] that are contiguous on the host;
        the index after it."""
        cb = self.cluster_bits
        first = plans[i]
        j = i + 1
        while (j < len(plans) and plans[j].action == INPLACE
               and plans[j].host == first.host + ((j - i) << cb)):
            j += 1
        c0 = first.cluster << cb
        a = max(offset, c0)
        b = min(offset + len(data), (plans[j - 1].cluster + 1) << cb)
        self.f.pwrite(data[a - offset:b - offset], first.host + (a - c0))
        return j

    def _write_cow(self, plans: list[ClusterPlan], i: int, offset: int, data: memoryview,
                   updates: Updates, frees: list[int], direct: bool = False) -> int:
        """Write plans[i] (FILL: in place) or the run of NEW clusters from it (into newly
        allocated clusters), head and tail included; note the entries to set and to free.
        The index after what was written."""
        cb = self.cluster_bits
        first = plans[i]
        if first.action == FILL:
            k, host, start = 1, first.host, -1
        else:
            j = i + 1
            while j < len(plans) and plans[j].action == NEW:
                j += 1
            start, k = self.alloc.alloc(j - i)
            host = start << cb
        last = plans[i + k - 1]
        a = max(offset, first.cluster << cb)
        b = min(offset + len(data), (last.cluster + 1) << cb)
        bufs: list[bytes | memoryview] = []
        if first.head:
            bufs.append(first.head)
        bufs.append(data[a - offset:b - offset])
        if last.tail:
            bufs.append(last.tail)
        try:
            self.f.pwritev(bufs, host, direct)
        except OSError:
            if start >= 0:  # ENOSPC, EIO: the new clusters were never referenced
                self.alloc.unalloc(start, k)
            raise
        mask = self.map.l2_entries - 1
        for t in range(k):
            p = plans[i + t]
            updates[p.cluster & mask] = ((host + (t << cb)) | COPIED, ALL_ALLOC)
            if p.action == NEW:
                frees.append(p.entry)
        return i + k

    def commit(self, l2off: int, l2: array[int], updates: Updates, names_data: bool) -> None:
        """Set L2 entries in the cached table (dirty). names_data: they name cluster data
        just written, which must be synced before the table is written back."""
        if names_data:
            self.f.named_data = True
        for idx, (e, bm) in updates.items():
            if self.extended:
                l2[idx * 2] = e
                l2[idx * 2 + 1] = bm
            else:
                l2[idx] = e
        self.map.l2.mark_dirty(l2off, l2, min(updates), max(updates) + 1)

    # -- copies from another file (the O_DIRECT fd) ------------------------------------
    def write_from(self, offset: int, fd: int, src: int, length: int,
                   has_backing: bool, direct: bool = False) -> int:
        """Image.write_from for a range that passed the image's checks (see there)."""
        cb, cs = self.cluster_bits, self.cluster_size
        cmap = self.map
        end = min(offset + length, ((offset >> cmap.chunk_bits) + 1) << cmap.chunk_bits)
        if (self.extended or offset & (cs - 1) or end <= offset
                or (end & (cs - 1) and end != self.virtual_size)):
            return 0
        if not cmap.l1[offset >> cmap.chunk_bits] & OFFSET_MASK and not has_backing:
            return 0  # unusual for a copy-up; keep to the general path
        self._prepare()
        l2off, l2 = cmap.writable_table(offset >> cmap.chunk_bits)
        mask = cmap.l2_entries - 1
        c0, c1 = offset >> cb, ((end - 1) >> cb) + 1
        for ci in range(c0, c1):
            if l2[ci & mask]:
                return 0
        start, k = self.alloc.alloc(c1 - c0)
        host = start << cb
        n = min(end - offset, k << cb)
        try:
            self.f.copy_in(fd, src, n, host, direct)
        except OSError as e:
            self.alloc.unalloc(start, k)
            if e.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return 0
            raise
        used = -(-n >> cb)
        if used < k:
            self.alloc.unalloc(start + used, k - used)
        if host + (used << cb) > self.f.size:  # a partial last cluster: pad the file
            self.f.size = max(self.f.size, host + n)
            if n & (cs - 1):
                tail = cs - (n & (cs - 1))
                self.f.pwrite(bytes(tail), host + n)
        else:
            self.f.size = max(self.f.size, host + n)
        updates = {(c0 + t) & mask: ((host + (t << cb)) | COPIED, ALL_ALLOC) for t in range(used)}
        self.commit(l2off, l2, updates, names_data=True)
        return n

    # -- zeroes -----------------------------------------------------------------------------
    def write_zeroes(self, offset: int, length: int, unmap: bool, has_backing: bool) -> None:
        cb, cs = self.cluster_bits, self.cluster_size
        end = offset + length
        fc0 = (offset + cs - 1) >> cb
        fc1 = (end >> cb) if end < self.virtual_size else ((end + cs - 1) >> cb)
        if fc0 >= fc1:
            self.write_zero_data(offset, end)
            return
        if offset < fc0 << cb:
            self.write_zero_data(offset, fc0 << cb)
        zero_end = min(fc1 << cb, self.virtual_size)
        for a, b in self.map.chunks(fc0 << cb, zero_end):
            self._zero_chunk(a, b, unmap, has_backing)
        if zero_end < end:
            self.write_zero_data(zero_end, end)

    def write_zero_data(self, a: int, b: int) -> None:
        step = 1 << 20
        while a < b:
            n = min(step, b - a)
            self.write(a, memoryview(_ZEROS)[:n])
            a += n

    def _zero_chunk(self, a: int, b: int, unmap: bool, has_backing: bool) -> None:
        """Make whole clusters [a, b) read as zeroes (b may be the unaligned virtual end)."""
        cb = self.cluster_bits
        cmap = self.map
        l1i = a >> cmap.chunk_bits
        if not self.v3 and has_backing:
            self.write_zero_data(a, b)
            return
        if not (cmap.l1[l1i] & OFFSET_MASK) and not has_backing:
            return  # unallocated without a backing file already reads as zeroes
        l2off, l2 = cmap.writable_table(l1i)
        mask = cmap.l2_entries - 1
        updates: Updates = {}
        frees: list[int] = []
        for ci in range(a >> cb, ((b - 1) >> cb) + 1):
            idx = ci & mask
            e, bm = cmap.entry(l2, idx)
            off = e & OFFSET_MASK
            keep = (not unmap and self.v3 and off and e & COPIED and not e & COMPRESSED)
            if not self.v3:
                new = (0, 0)
            elif self.extended:
                new = ((off | COPIED) if keep else 0, ALL_ZERO)
            else:
                new = (((off | COPIED) if keep else 0) | ZERO, 0)
            if new != (e, bm):
                updates[idx] = new
                if not keep:
                    frees.append(e)
        if updates:  # zero flags or no cluster at all: no data to order before them
            self.commit(l2off, l2, updates, names_data=False)
        for e in frees:
            self.alloc.free_entry(e)


