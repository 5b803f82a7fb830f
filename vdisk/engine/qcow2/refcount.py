"""Refcount table and refcount blocks of any width (1..64 bits): lookup, update, allocation.

Updates are written through (one pwrite per touched block span). Allocation takes the
lowest free clusters from a hint. A missing refcount block for block b is placed at the
first cluster it covers (free by definition, since b has no block) and describes itself;
when the table is full, a new area at the first uncovered cluster holds new refcount
blocks followed by a bigger table, which is synced, then the header is switched to it,
synced, and only then the old table is freed.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable

from vdisk.engine.qcow2.cache import LRUCache
from vdisk.engine.qcow2.fileio import ImageFile
from vdisk.engine.qcow2.header import MAX_HOST_OFFSET, MAX_REFTABLE_BYTES
from vdisk.engine.qcow2.layout import OFFSET_MASK

# For widths < 8: byte value -> b"\0" if it holds a zero entry, else b"\1".
_HAS_ZERO = {
    w: bytes(0 if any(((v >> (i * w)) & ((1 << w) - 1)) == 0 for i in range(8 // w)) else 1
             for v in range(256))
    for w in (1, 2, 4)
}
_FMT = {8: "B", 16: ">H", 32: ">I", 64: ">Q"}


def get_entry(block: bytes | bytearray, i: int, w: int) -> int:
    if w >= 8:
        n = w >> 3
        return int.from_bytes(block[i * n:(i + 1) * n], "big")
    per = 8 // w
    return (block[i // per] >> ((i % per) * w)) & ((1 << w) - 1)


def set_entry(block: bytearray, i: int, w: int, value: int) -> None:
    if w >= 8:
        n = w >> 3
        block[i * n:(i + 1) * n] = value.to_bytes(n, "big")
        return
    per = 8 // w
    shift = (i % per) * w
    mask = ((1 << w) - 1) << shift
    block[i // per] = (block[i // per] & ~mask) | (value << shift)


def byte_span(i: int, j: int, w: int) -> tuple[int, int]:
    """Bytes [lo, hi) holding entries [i, j)."""
    return (i * w) >> 3, ((j * w) + 7) >> 3


def find_zero(block: bytes | bytearray, start: int, entries: int, w: int) -> int:
    """Index of the first zero entry at or after start, or -1."""
    if w >= 8:
        n = w >> 3
        pat = bytes(n)
        pos = start * n
        while True:
            pos = block.find(pat, pos)
            if pos < 0:
                return -1
            if pos % n == 0:
                return pos // n
            pos += n - pos % n
    per = 8 // w
    flags = bytes(block).translate(_HAS_ZERO[w])
    i = start
    while i < entries:
        if i % per == 0:
            b = flags.find(b"\0", i // per)
            if b < 0:
                return -1
            i = b * per
        if get_entry(block, i, w) == 0:
            return i
        i += 1
    return -1


def decode_block(block: bytes | bytearray, w: int) -> list[int]:
    """Every entry of a refcount block as a list of ints."""
    if w == 8:
        return list(block)
    if w > 8:
        code = {16: "H", 32: "I", 64: "Q"}[w]
        a = array(code, bytes(block))
        a.byteswap()
        return a.tolist()
    per = 8 // w
    m = (1 << w) - 1
    return [(b >> (k * w)) & m for b in block for k in range(per)]


class Refcounts:
    """Refcounts of one open image; `set_header_table` rewrites the header's table pointer."""

    def __init__(self, f: ImageFile, cluster_bits: int, refcount_order: int,
                 table_offset: int, table_clusters: int,
                 set_header_table: Callable[[int, int], None] | None,
                 cache_bytes: int = 2 << 20) -> None:
        self.f = f
        self.cluster_bits = cluster_bits
        self.cs = 1 << cluster_bits
        self.w = 1 << refcount_order
        self.max = (1 << self.w) - 1
        self.per_block = self.cs * 8 // self.w
        self.block_bits = self.per_block.bit_length() - 1
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        raw = f.pread(table_clusters * self.cs, table_offset)
        t = array("Q", raw)
        t.byteswap()
        self.table = t
        self.cache: LRUCache[int, bytearray] = LRUCache(max(4, cache_bytes // self.cs))
        self.hint = 0
        self._set_header_table = set_header_table
        # Set by a writable image: guard(first, count, what, own_cluster) raises before a
        # write would land on other metadata; corrupt(reason) marks the image corrupt and
        # returns the OSError to raise.
        self.guard: Callable[[int, int, str, int], None] | None = None
        self.corrupt: Callable[[str], OSError] | None = None
        self.on_block: Callable[[int], None] | None = None  # a refcount block was placed
        self._guarded: set[int] = set()

    def _corrupt(self, reason: str) -> OSError:
        return self.corrupt(reason) if self.corrupt is not None else self.f.eio(reason)

    # -- blocks -----------------------------------------------------------------------
    def block_offset(self, b: int) -> int:
        if b >= len(self.table):
            return 0
        off = self.table[b] & OFFSET_MASK
        if off & (self.cs - 1):
            raise self._corrupt(f"refcount block {b} offset 0x{self.table[b]:x} is unaligned")
        return off

    def block(self, b: int) -> bytearray | None:
        blk = self.cache.get(b)
        if blk is not None:
            return blk
        off = self.block_offset(b)
        if not off:
            return None
        if off + self.cs > self.f.size:
            raise self.f.eio(f"refcount block {b} (offset 0x{off:x}) lies beyond the end of "
                             f"file")
        blk = bytearray(self.f.pread(self.cs, off))
        self.cache.put(b, blk)
        return blk

    def get(self, cluster: int) -> int:
        blk = self.block(cluster >> self.block_bits)
        if blk is None:
            return 0
        return get_entry(blk, cluster & (self.per_block - 1), self.w)

    # -- updates ----------------------------------------------------------------------
    def change(self, start: int, count: int, delta: int) -> None:
        """Add delta to the refcounts of clusters [start, start+count); write through."""
        c = start
        end = start + count
        while c < end:
            b = c >> self.block_bits
            blk = self.block(b)
            if blk is None:
                if delta < 0:
                    raise self.f.eio(f"refcount underflow at cluster {c}")
                self._create_block(b)
                blk = self.block(b)
                assert blk is not None
            i0 = c & (self.per_block - 1)
            i1 = min(self.per_block, i0 + (end - c))
            if self.guard is not None and b not in self._guarded:
                boff = self.block_offset(b) >> self.cluster_bits
                self.guard(boff, 1, "refcount block", boff)
                self._guarded.add(b)
            lo, hi = byte_span(i0, i1, self.w)
            if (delta == 1 and self.w >= 8 and self.max >= 1
                    and blk[lo:hi] == bytes(hi - lo)):  # allocating free clusters: all 0 -> 1
                blk[lo:hi] = (1).to_bytes(self.w >> 3, "big") * (i1 - i0)
                self.f.pwrite(memoryview(blk)[lo:hi], self.block_offset(b) + lo)
                self.f.unsynced = True
                c += i1 - i0
                continue
            for i in range(i0, i1):  # check first: an error leaves the block unchanged
                v = get_entry(blk, i, self.w) + delta
                if v < 0:
                    raise self._corrupt(f"refcount underflow at cluster "
                                        f"{(b << self.block_bits) + i} (freeing a cluster "
                                        f"whose refcount is 0)")
                if v > self.max:
                    raise self.f.eio(f"refcount overflow at cluster {(b << self.block_bits) + i}")
            for i in range(i0, i1):
                v = get_entry(blk, i, self.w) + delta
                set_entry(blk, i, self.w, v)
                if v == 0 and (b << self.block_bits) + i < self.hint:
                    self.hint = (b << self.block_bits) + i
            lo, hi = byte_span(i0, i1, self.w)
            self.f.pwrite(memoryview(blk)[lo:hi], self.block_offset(b) + lo)
            self.f.unsynced = True
            c += i1 - i0

    def free(self, start: int, count: int) -> None:
        self.change(start, count, -1)

    # -- allocation -------------------------------------------------------------------
    def _free_run(self, want: int) -> tuple[int, int]:
        """(start, n) of the first run of free clusters from the hint, 1 <= n <= want."""
        c = self.hint
        while True:
            b = c >> self.block_bits
            blk = self.block(b) if b < len(self.table) else None
            if blk is None:
                start = c
            else:
                i = find_zero(blk, c & (self.per_block - 1), self.per_block, self.w)
                if i < 0:
                    c = (b + 1) << self.block_bits
                    continue
                start = (b << self.block_bits) + i
            self.hint = start
            n = 1
            if blk is not None and self.w >= 8:  # the zero entries that follow, in one slice
                nb = self.w >> 3
                i = start & (self.per_block - 1)
                k = min(want, self.per_block - i)
                if k > 1 and blk[(i + 1) * nb:(i + k) * nb] == bytes((k - 1) * nb):
                    n = k
            while n < want and self.get(start + n) == 0:
                n += 1
            return start, n

    def alloc(self, want: int) -> tuple[int, int]:
        """Allocate 1..want contiguous clusters (refcount 1, written through)."""
        while True:
            start, n = self._free_run(want)
            b0 = start >> self.block_bits
            b1 = (start + n - 1) >> self.block_bits
            missing = [b for b in range(b0, b1 + 1) if not self.block_offset(b)]
            if missing:
                self._create_block(missing[0])
                continue
            if (start + n) << self.cluster_bits > MAX_HOST_OFFSET:
                raise OSError(27, f"{self.f.path}: image file would exceed the qcow2 limit")
            self.change(start, n, 1)
            self.hint = start + n
            return start, n

    def _create_block(self, b: int) -> None:
        """Create refcount block b at the first cluster it covers (self-describing)."""
        if b >= len(self.table):
            self._grow_table(b)
            if self.block_offset(b):
                return
        pos = b << self.block_bits
        if self.guard is not None:
            self.guard(pos, 1, "", -1)
        blk = bytearray(self.cs)
        set_entry(blk, 0, self.w, 1)
        self.f.pwrite(blk, pos << self.cluster_bits)
        self.f.unsynced = True
        self.f.barrier()  # the block's content before the table entry naming it
        self.table[b] = pos << self.cluster_bits
        self.f.pwrite(struct.pack(">Q", self.table[b]), self.table_offset + b * 8)
        self.f.unsynced = True
        self.cache.put(b, blk)
        self._guarded.add(b)
        if self.on_block is not None:
            self.on_block(pos)

    def _grow_table(self, b: int) -> None:
        old_n = len(self.table)
        area = old_n << self.block_bits  # first cluster no block of the old table covers
        new_n = max(b + 1, old_n * 2)
        while True:
            tcl = -(-new_n * 8 // self.cs)
            nblocks = 1
            while -(-(nblocks + tcl) // self.per_block) > nblocks:
                nblocks += 1
            last_block = (area + nblocks + tcl - 1) >> self.block_bits
            if last_block < new_n:
                break
            new_n = last_block + 1
        tcl = -(-new_n * 8 // self.cs)
        if tcl * self.cs > MAX_REFTABLE_BYTES:
            raise OSError(27, f"{self.f.path}: refcount table would exceed 8 MiB")
        new_n = tcl * self.cs // 8
        table = array("Q", self.table)
        table.extend([0] * (new_n - old_n))
        total = nblocks + tcl
        if self.guard is not None:
            self.guard(area, total, "", -1)
        for k in range(nblocks):
            bi = old_n + k
            blk = bytearray(self.cs)
            lo = max(area, bi << self.block_bits)
            hi = min(area + total, (bi + 1) << self.block_bits)
            for c in range(lo, hi):
                set_entry(blk, c & (self.per_block - 1), self.w, 1)
            self.f.pwrite(blk, (area + k) << self.cluster_bits)
            table[bi] = (area + k) << self.cluster_bits
            self.cache.put(bi, blk)
            self._guarded.add(bi)
            if self.on_block is not None:
                self.on_block(area + k)
        be = array("Q", table)
        be.byteswap()
        new_off = (area + nblocks) << self.cluster_bits
        self.f.pwrite(be.tobytes(), new_off)
        self.f.unsynced = True
        self.f.barrier()  # new blocks and table before the header points at them
        assert self._set_header_table is not None
        self._set_header_table(new_off, tcl)
        self.f.sync()  # the header switch before the old table is freed
        old_off, old_cl = self.table_offset, self.table_clusters
        self.table = table
        self.table_offset, self.table_clusters = new_off, tcl
        self.free(old_off >> self.cluster_bits, old_cl)
