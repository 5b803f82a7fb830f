"""The layout qemu-img 7.2 gives a new qcow2 image with -o preallocation=... .

metadata (block/qcow2.c, preallocate_co): after the L1 table, each L2 table followed by
the clusters it maps, in guest order; entries are plain data clusters (the file has holes
there); the file ends at the end of the last data cluster.
falloc/full (qcow2_co_truncate): a refcount area (new refcount blocks, then a new
refcount table, QEMU's qcow2_refcount_area) after the L1 table, the old table freed, the
data clusters after the area, then the L2 tables, each at the first free cluster (the
first one in the old table's place); entries are plain data. Refcounts are built here as
one bit string over every refcount block.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from vdisk.engine.qcow2.layout import COPIED
from vdisk.engine.qcow2.refcount import get_entry, set_entry


@dataclass
class Layout:
    """What create_qcow2 writes: pieces at offsets, the file length, the table pointer."""

    pieces: list[tuple[int, bytes]] = field(default_factory=list)
    length: int = 0
    reftable_offset: int = 0
    reftable_clusters: int = 0
    data: tuple[int, int] = (0, 0)  # host byte range to fallocate or zero-fill


def _metadata_size(clusters: int, cs: int, bits: int) -> tuple[int, int]:
    """qcow2_refcount_metadata_size (exact): (refcount blocks, table clusters)."""
    per_table, per_block = cs // 8, cs * 8 // bits
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table)
        n = clusters + blocks + table
        if n == last:
            return blocks, table


class _Refs:
    def __init__(self, cs: int, bits: int) -> None:
        self.cs, self.bits = cs, bits
        self.per = cs * 8 // bits
        self.buf = bytearray()

    def _cover(self, c: int) -> None:
        need = (c // self.per + 1) * self.cs
        if len(self.buf) < need:
            self.buf += bytes(need - len(self.buf))

    def set(self, first: int, count: int, value: int = 1) -> None:
        self._cover(first + count)
        for c in range(first, first + count):
            set_entry(self.buf, c, self.bits, value)

    def used(self, c: int) -> bool:
        self._cover(c)
        return get_entry(self.buf, c, self.bits) != 0

    def block(self, b: int) -> bytes:
        self._cover(b * self.per)
        return bytes(self.buf[b * self.cs:(b + 1) * self.cs])


def _l2_tables(size: int, cs: int, ew: int) -> list[int]:
    """Data clusters mapped by each L2 table, in guest order."""
    per = cs // (8 * ew)
    n = -(-size // cs)
    return [min(per, n - i) for i in range(0, n, per)]


def _entries(hosts: range, cs: int, ew: int, flags: int) -> bytes:
    vals: list[int] = []
    for c in hosts:
        vals.append(COPIED | c * cs | flags)
        if ew == 2:
            vals.append(0)  # qemu-img leaves the subcluster bitmap of preallocated ones 0
    a = array("Q", vals + [0] * (cs // 8 - len(vals)))
    a.byteswap()
    return a.tobytes()


def preallocate(mode: str, *, size: int, cs: int, bits: int, v3: bool, ew: int,
                rt: int, rb: int, l1_off: int, l1_clusters: int) -> Layout:
    """The layout of a new image (header at 0, table at cluster 1 of rt clusters, rb
    blocks after it, L1 at l1_off) after qemu-img's preallocation in mode."""
    out = Layout(reftable_offset=cs, reftable_clusters=rt)
    refs = _Refs(cs, bits)
    # header, table, blocks, L1 (an image of size 0 has no L1 table: l1_off may be 0)
    first_free = max(l1_off // cs + l1_clusters, 1 + rt + rb)
    refs.set(0, first_free)
    tables = _l2_tables(size, cs, ew)
    l1: list[int] = []
    reftable = [(1 + k) * cs + rt * cs for k in range(rb)]
    if mode == "metadata":
        cur = first_free
        for n in tables:
            l1.append(COPIED | cur * cs)
            out.pieces.append((cur * cs, _entries(range(cur + 1, cur + 1 + n), cs, ew, 0)))
            refs.set(cur, n + 1)
            cur += 1 + n
        out.length = cur * cs
        if ew == 2 and tables and size % cs:  # qemu-img: the last cluster's subclusters
            sc = cs // 32
            out.length = (cur - 1) * cs + -(-(size % cs) // sc) * sc
        if cur > rb * refs.per:
            raise ValueError("preallocation=metadata of an image that needs more than its "
                             "first refcount blocks is not supported; use falloc or full")
    else:
        n_data = -(-size // cs)
        blocks, _ = _metadata_size(first_free + n_data + len(tables) + 1, cs, bits)
        table_size = -(-blocks * 8 // cs) * cs // 8
        clusters = table_size * 8 // cs
        extra = max(0, blocks - len(reftable))  # new refcount blocks, at the area's start
        reftable += [(first_free + i) * cs for i in range(extra)]
        table_c = first_free + extra
        end_c = table_c + clusters
        refs.set(first_free, end_c - first_free)
        refs.set(1, rt, 0)  # the old table is freed
        out.reftable_offset, out.reftable_clusters = table_c * cs, clusters
        refs.set(end_c, n_data)
        out.data = (end_c * cs, n_data * cs)
        free, host = 1, end_c
        length = (end_c + n_data) * cs
        for n in tables:
            while refs.used(free):
                free += 1
            refs.set(free, 1)
            l1.append(COPIED | free * cs)
            out.pieces.append((free * cs, _entries(range(host, host + n), cs, ew, 0)))
            length = max(length, (free + 1) * cs)
            host += n
        out.length = length
        rt_bytes = array("Q", reftable + [0] * (table_size - len(reftable)))
        rt_bytes.byteswap()
        out.pieces.append((table_c * cs, rt_bytes.tobytes()))
    if l1:
        a = array("Q", l1)
        a.byteswap()
        out.pieces.append((l1_off, a.tobytes()))
    for b, off in enumerate(reftable):
        out.pieces.append((off, refs.block(b)))
    return out
