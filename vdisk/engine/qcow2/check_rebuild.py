"""Rebuilding the refcount structure from the counted references (qemu-img check -r all).

QEMU's rebuild_refcount_structure (block/qcow2-refcount.c, 7.1 and later), the same
steps in the same order so that the result is the same file: for each refcount block
that has a non-zero count, take the first free cluster of the in-memory table at or after
the block's first cluster and write the block there (a slice of the in-memory table);
then find room for the refcount table, write the blocks its clusters fall into again, and
repeat while the table had to grow; write the table, point the header at it. The old
structures are not freed: they are leaks, which the recount repairs.
"""

from __future__ import annotations

import struct
from array import array
from typing import TYPE_CHECKING

from vdisk.engine.qcow2.refcount import set_entry

if TYPE_CHECKING:
    from vdisk.engine.qcow2.check import Checker


class _Rebuild:
    def __init__(self, ck: Checker) -> None:
        self.ck = ck
        self.cs = ck.cs
        self.w = ck.rc.w
        self.per = ck.rc.per_block
        self.bits = ck.rc.block_bits
        self.reftable: list[int] = []

    def alloc(self, count: int, first_free: list[int]) -> int:
        """alloc_clusters_imrt: count contiguous free clusters from first_free[0]."""
        refs = self.ck.refs
        c = first_free[0]
        run = 0
        first_gap = True
        while c < len(refs) and run < count:
            if not refs[c]:
                run += 1
                if first_gap:
                    first_free[0] = c
                    first_gap = False
            else:
                run = 0
            c += 1
        if run < count:
            self.ck.grow(c + count - run)
        c -= run
        for i in range(count):
            refs[c + i] = 1
        return c * self.cs

    def block_bytes(self, index: int) -> bytes:
        lo = index * self.per
        vals = self.ck.refs[lo:lo + self.per].tolist()
        vals += [0] * (self.per - len(vals))
        if self.w >= 8:
            a = array({8: "B", 16: "H", 32: "I", 64: "Q"}[self.w], vals)
            if self.w > 8:
                a.byteswap()
            return a.tobytes()
        blk = bytearray(self.cs)
        for i, v in enumerate(vals):
            if v:
                set_entry(blk, i, self.w, v)
        return bytes(blk)

    def write_blocks(self, first: int, end: int) -> bool:
        """rebuild_refcounts_write_refblocks over clusters [first, end); True if the
        refcount table had to grow."""
        grown = False
        first_free = [0]
        c = first
        while c < end:
            if not self.ck.refs[c] if c < len(self.ck.refs) else True:
                c += 1
                continue
            index = c >> self.bits
            start = index << self.bits
            if index < len(self.reftable) and self.reftable[index]:
                off = self.reftable[index]
            else:
                first_free[0] = max(first_free[0], start)
                off = self.alloc(1, first_free)
                if off // self.cs >= end:
                    end = off // self.cs + 1
                if len(self.reftable) <= index:
                    n = -(-(index + 1) * 8 // self.cs) * self.cs // 8
                    self.reftable += [0] * (n - len(self.reftable))
                    grown = True
                self.reftable[index] = off
            self.ck.f.pwrite(self.block_bytes(index), off)
            c = start + self.per
        return grown

    def run(self) -> None:
        ck = self.ck
        ck.rc.cache.clear()
        self.write_blocks(0, len(ck.refs))
        while True:
            length = len(self.reftable) * 8
            clusters = -(-length // self.cs)
            table_off = self.alloc(clusters, [0])
            first = table_off // self.cs
            if not self.write_blocks(first, first + clusters):
                break
        ck.f.pwrite(struct.pack(f">{len(self.reftable)}Q", *self.reftable), table_off)
        ck.f.pwrite(struct.pack(">QI", table_off, clusters), 48)
        ck.f.sync()
        ck.h.refcount_table_offset = table_off
        ck.h.refcount_table_clusters = clusters


def rebuild_after_check(ck: Checker, fix_leaks: bool) -> None:
    """The rebuild branch of qcow2_check_refcounts: rebuild, recount, repair the leaks the
    old structures became; ck.res gets the fixed counts."""
    from vdisk.engine.qcow2.check import _refcounts

    res = ck.res
    old = res.counts()
    res.messages.append("Rebuilding refcount structure")
    _Rebuild(ck).run()
    res.corruptions = res.leaks = 0
    ck.rc = _refcounts(ck.f, ck.h)
    n = len(ck.refs)
    ck.refs = array("Q", bytes(8 * n))
    ck.file_len = max(ck.file_len, ck.f.size)
    if ck.calculate(False):
        pass
    fresh_leaks = 0
    if fix_leaks:
        saved = res.counts()
        res.set_counts((0, 0, 0, 0, 0))
        if ck.compare(True, False):
            res.messages.append("ERROR rebuilt refcount structure is still broken")
        fresh_leaks = res.leaks
        res.set_counts(saved)
    if res.corruptions < old[0]:
        res.corruptions_fixed += old[0] - res.corruptions
    if res.leaks < old[1]:
        res.leaks_fixed += old[1] - res.leaks
    res.leaks += fresh_leaks
