"""Qcow2Image: reads, copy-on-write writes, zero clusters, header rewrites.

Write ordering (crash safety), QEMU's way: refcounts are written through, L2 tables
are a write-back cache with one dependency. A SIGKILL at any point leaves at most
leaked clusters, and fdatasync barriers order the steps for power loss:
  1. new clusters come from a reserve: a run of clusters whose refcounts were set
     to 1 and written (not yet synced; the batch doubles up to ~8 MiB),
  2. guest data goes into them; new L2 tables are written (zeroed or copied) and
     synced before the L1 entry naming them is written,
  3. L2 entries change in the cached table only, which is marked dirty. Dirty tables
     go to the file (one pwrite per table span) on flush, before an eviction, and
     before queued frees are applied; each time, if refcounts were written since the
     last sync, or if a dirty entry names cluster data written since the last sync
     (a new or filled cluster: file.named_data), one fdatasync comes first. So an L2
     entry on disk only ever names clusters whose refcount, data and file size are
     already on disk (QEMU: data -> refcount -> fdatasync -> L2 -> fdatasync); a
     flush that only overwrote owned clusters in place syncs once,
  4. clusters that lose their last reference here (COW of shared or compressed
     clusters, discards) are only queued; applying them writes the dirty tables back,
     syncs (the L2 entries that dropped them reach the disk first), then lowers their
     refcounts; flush() syncs again.
A crash can leak the unused reserve, the clusters named only by unwritten L2 entries
and the queued frees (qemu-img check -r leaks repairs that); close() returns the
reserve. Writes not followed by a flush may be lost by a crash (a volatile write
cache, like QEMU's cache=writeback), never half-applied into corruption. flush()
always ends in fdatasync, so everything acknowledged by a flush survives a crash.
Measured in-process (512 MiB, 1 MiB sequential writes): a sync per ~8 MiB reserve
batch 0.48 s, no sync until flush 0.15 s + 0.25 s flush (the data reaches the disk
once, at the flush, instead of in pieces while the writer waits). In-place overwrites
do no metadata I/O at all.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import struct
from array import array
from typing import Any

from vdisk.engine.image import Extent, Image, Status
from vdisk.engine.locking import unlock_image
from vdisk.engine.qcow2.cache import LRUCache
from vdisk.engine.qcow2.compress import COMPRESSION_NAMES, decompress_cluster
from vdisk.engine.qcow2.fileio import ImageFile
from vdisk.engine.qcow2.header import (
    COMPAT_LAZY_REFCOUNTS,
    EXT_FEATURE_TABLE,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAX_BACKING_NAME,
    Header,
    serialize_header,
)
from vdisk.engine.qcow2.layout import (
    ALL_ALLOC,
    ALL_ZERO,
    COMP,
    COMPRESSED,
    COPIED,
    DATA,
    OFFSET_MASK,
    UNALLOC,
    ZERO,
    ZEROES,
    compressed_clusters,
    compressed_range,
)
from vdisk.engine.qcow2.overlap import MetadataMap
from vdisk.engine.qcow2.refcount import Refcounts
from vdisk.engine.raw import fallocate
from vdisk.errors import ReadOnlyError

_FALLOC_FL_KEEP_SIZE = 0x01

_ZEROS = bytes(1 << 21)
_STATUS = {UNALLOC: Status.UNALLOCATED, ZEROES: Status.ZERO, DATA: Status.DATA,
           COMP: Status.DATA}
# Actions planned for one cluster of a write.
_INPLACE, _FILL, _NEW = 0, 1, 2
_MAX_PENDING_FREES = 4096
_INCOMPAT_OFFSET = 72  # the v3 header's incompatible_features field

log = logging.getLogger("vdisk.qcow2")


def _zero(mv: memoryview) -> None:
    n = len(mv)
    pos = 0
    while pos < n:
        k = min(n - pos, len(_ZEROS))
        mv[pos:pos + k] = memoryview(_ZEROS)[:k]
        pos += k


class Qcow2Image(Image):
    """One open qcow2 file. Use vdisk.engine.qcow2.open_qcow2 to get one."""

    format_name = "qcow2"

    def __init__(self, path: str, fd: int, hdr: Header, read_only: bool,
                 l2_cache_bytes: int = 4 << 20, refblock_cache_bytes: int = 2 << 20) -> None:
        self.path = path
        self.read_only = read_only
        self.hdr = hdr
        self.f = ImageFile(fd, path)
        self.virtual_size = hdr.size
        self.cluster_bits = cb = hdr.cluster_bits
        self.cluster_size = cs = 1 << cb
        self.version = hdr.version
        self.refcount_bits = 1 << hdr.refcount_order
        self.extended_l2 = hdr.extended_l2
        self.dirty = bool(hdr.incompatible & INCOMPAT_DIRTY)
        self.corrupt = bool(hdr.incompatible & INCOMPAT_CORRUPT)
        self.compression_type = hdr.compression_type
        self.backing: Image | None = None
        self.backing_name = hdr.backing_name
        self.backing_format = hdr.backing_format if hdr.backing_name is not None else None
        self._ew = 2 if self.extended_l2 else 1  # 64-bit words per L2 entry
        self.l2_bits = cb - 3 - (1 if self.extended_l2 else 0)
        self.l2_entries = 1 << self.l2_bits
        self.chunk_bits = cb + self.l2_bits
        self.sc_bits = cb - 5
        raw = self.f.pread(hdr.l1_size * 8, hdr.l1_table_offset) if hdr.l1_size else b""
        self.l1 = array("Q", raw)
        self.l1.byteswap()
        self.l2_cache: LRUCache[int, array[int]] = LRUCache(max(4, l2_cache_bytes // cs),
                                                            self._evict_l2)
        # L2 offset -> (table, [lo, hi) entries to write); always also in l2_cache
        self._dirty: dict[int, tuple[array[int], list[int]]] = {}
        self.rc = Refcounts(self.f, cb, hdr.refcount_order, hdr.refcount_table_offset,
                            hdr.refcount_table_clusters, self._set_reftable,
                            refblock_cache_bytes)
        self._comp: tuple[int, bytes] | None = None
        self._reserve = (0, 0)  # (first cluster, count): refcount 1, synced, unused
        self._batch = 8
        self._max_batch = max(16, (8 << 20) >> cb)
        self._pending: list[tuple[int, int]] = []
        self._prepared = False
        self._hdr_len = len(serialize_header(dataclasses.replace(hdr)))
        self._closed = False
        self.meta: MetadataMap | None = None
        if not read_only:
            self.meta = MetadataMap(self.f, hdr, self.l1)
            for e in self.rc.table:
                off = e & OFFSET_MASK
                if off and not off & (cs - 1):
                    self.meta.refblocks.add(off >> cb)
            self.rc.guard = self._guard
            self.rc.corrupt = self._corruption
            self.rc.on_block = self.meta.refblocks.add

    # -- helpers ----------------------------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise OSError(errno.EINVAL, f"{self.path}: range {offset}+{length} is outside "
                          f"the virtual size {self.virtual_size}")

    def _check_writable(self) -> None:
        if self._closed:
            raise OSError(errno.EBADF, f"{self.path}: image is closed")
        if self.read_only:
            raise ReadOnlyError(self.path, "image is opened read-only")
        if self.corrupt:
            raise OSError(errno.EIO, f"{self.path}: image is marked corrupt, writes are refused "
                                     f"(repair it with 'qemu-img check -r all')")

    # -- corruption -------------------------------------------------------------------
    def _corruption(self, reason: str) -> OSError:
        """Metadata is inconsistent: on a writable image, set the corrupt bit (v3; v2 has
        none, so only in memory) and refuse every later write. The error to raise."""
        if self.read_only:
            return self.f.eio(reason)
        if not self.corrupt:
            self.corrupt = True
            log.error("%s: %s; marking the image corrupt, it is read-only from now on",
                      self.path, reason)
            if self.version >= 3:
                self.hdr.incompatible |= INCOMPAT_CORRUPT
                try:  # 8 bytes inside the header: never torn, never extends the file
                    self.f.pwrite(struct.pack(">Q", self.hdr.incompatible), _INCOMPAT_OFFSET)
                    self.f.sync()
                except OSError as e:
                    log.error("%s: could not set the corrupt bit: %s", self.path, e)
        return OSError(errno.EIO, f"{self.path}: {reason}; image marked corrupt")

    def _guard(self, first: int, count: int, own: str = "", own_cluster: int = -1) -> None:
        """QEMU's overlap check: refuse (and mark corrupt) a write onto metadata."""
        meta = self.meta
        if meta is None:
            return
        meta.reftable = (self.rc.table_offset >> self.cluster_bits, self.rc.table_clusters)
        hit = meta.find(first, count, own=own, own_cluster=own_cluster)
        if hit is not None:
            raise self._corruption(f"preventing invalid write on metadata at host offset "
                                   f"0x{first << self.cluster_bits:x} (overlaps with {hit})")

    def _l2(self, l1i: int) -> tuple[int, array[int] | None]:
        if l1i >= len(self.l1):
            return 0, None
        off = self.l1[l1i] & OFFSET_MASK
        if not off:
            return 0, None
        t = self.l2_cache.get(off)
        if t is not None:
            return off, t
        if off & (self.cluster_size - 1):
            raise self._corruption(f"L2 table offset 0x{off:x} (L1 index {l1i}) is unaligned")
        if off + self.cluster_size > self.f.size:
            raise self.f.eio(f"L2 table offset 0x{off:x} (L1 index {l1i}) lies beyond the end "
                             f"of file")
        t = array("Q", self.f.pread(self.cluster_size, off))
        t.byteswap()
        self.l2_cache.put(off, t)
        return off, t

    def _map(self, offset: int, end: int) -> list[list[int]]:
        """[guest offset, length, kind, host] runs for [offset, end) within one L2 table."""
        _, l2 = self._l2(offset >> self.chunk_bits)
        if l2 is None:
            return [[offset, end - offset, UNALLOC, 0]]
        segs: list[list[int]] = []
        cb, cs, ew = self.cluster_bits, self.cluster_size, self._ew
        v3 = self.version >= 3
        ext = self.extended_l2
        mask = self.l2_entries - 1
        if not ext and end - offset > cs:
            run = self._contiguous_run(l2, offset, end)
            if run is not None:
                return [[offset, end - offset, DATA, run]]

        def add(g: int, n: int, k: int, h: int) -> None:
            if segs:
                last = segs[-1]
                if last[2] == k and k != COMP and (k != DATA or last[3] + last[1] == h):
                    last[1] += n
                    return
            segs.append([g, n, k, h])

        pos = offset
        while pos < end:
            cstart = pos & ~(cs - 1)
            cend = min(cstart + cs, end)
            idx = (pos >> cb) & mask
            e = l2[idx * ew]
            if e & COMPRESSED:
                segs.append([pos, cend - pos, COMP, e])
            elif not ext:
                off = e & OFFSET_MASK
                if v3 and e & ZERO:
                    add(pos, cend - pos, ZEROES, 0)
                elif not off:
                    add(pos, cend - pos, UNALLOC, 0)
                else:
                    if off & (cs - 1):
                        raise self._corruption(f"data cluster offset 0x{off:x} is unaligned")
                    add(pos, cend - pos, DATA, off + pos - cstart)
            else:
                bm = l2[idx * 2 + 1]
                off = e & OFFSET_MASK
                alloc, zero = bm & ALL_ALLOC, bm >> 32
                if alloc & zero or (alloc and (not off or off & (cs - 1))):
                    raise self._corruption(f"invalid extended L2 entry 0x{e:x}/0x{bm:x}")
                if alloc == ALL_ALLOC:
                    add(pos, cend - pos, DATA, off + pos - cstart)
                elif zero == ALL_ALLOC:
                    add(pos, cend - pos, ZEROES, 0)
                elif not alloc and not zero:
                    add(pos, cend - pos, UNALLOC, 0)
                else:
                    sb = self.sc_bits
                    p = pos
                    while p < cend:
                        s = (p - cstart) >> sb
                        se = min(cstart + ((s + 1) << sb), cend)
                        if alloc >> s & 1:
                            add(p, se - p, DATA, off + p - cstart)
                        elif zero >> s & 1:
                            add(p, se - p, ZEROES, 0)
                        else:
                            add(p, se - p, UNALLOC, 0)
                        p = se
            pos = cend
        return segs

    def _first_run(self, a: int, b: int) -> tuple[Status, int] | None:
        """(status, length) of the first run of [a, b) (one L2 table, standard entries) with
        one status; None if an entry needs _map's checks (an unaligned data offset)."""
        _, l2 = self._l2(a >> self.chunk_bits)
        if l2 is None:
            return Status.UNALLOCATED, b - a
        cb = self.cluster_bits
        mask = self.l2_entries - 1
        i0 = (a >> cb) & mask
        i1 = ((b - 1) >> cb) & mask
        zbit = ZERO if self.version >= 3 else 0
        lowbits = self.cluster_size - 1

        def kind(e: int) -> int:  # 0 unallocated, 1 zero, 2 data; -1: let _map decide
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

    def _contiguous_run(self, l2: array[int], offset: int, end: int) -> int | None:
        """Host offset of `offset` if [offset, end) (one L2 table, standard entries) is a
        single run of contiguous plain data clusters, else None. One fast scan."""
        cb = self.cluster_bits
        mask = self.l2_entries - 1
        i0 = (offset >> cb) & mask
        i1 = ((end - 1) >> cb) & mask
        first = l2[i0]
        off = first & OFFSET_MASK
        if (not off or first & COMPRESSED or (self.version >= 3 and first & ZERO)
                or off & (self.cluster_size - 1)):
            return None
        k = first
        step = 1 << cb
        for e in l2[i0 + 1:i1 + 1]:
            k += step
            if e != k:
                return None
        return off + (offset & (self.cluster_size - 1))

    def _chunks(self, offset: int, end: int) -> list[tuple[int, int]]:
        out = []
        pos = offset
        while pos < end:
            ce = min(((pos >> self.chunk_bits) + 1) << self.chunk_bits, end)
            out.append((pos, ce))
            pos = ce
        return out

    # -- reads ------------------------------------------------------------------------
    def layer_status(self, offset: int, length: int) -> Extent:
        """The run at offset with one status (compressed counts as DATA). Stops early, with
        a shorter run of the same status, after looking at 8 allocated L2 tables."""
        if length <= 0 or offset < 0 or offset >= self.virtual_size:
            raise OSError(errno.EINVAL, f"{self.path}: bad status range {offset}+{length}")
        end = min(offset + length, self.virtual_size)
        status: Status | None = None
        n = 0
        tables = 0
        for a, b in self._chunks(offset, end):
            if self.l1[a >> self.chunk_bits] & OFFSET_MASK:
                tables += 1
                if tables > 8 and status is not None:  # bound the work: a shorter answer
                    break
            first = None if self.extended_l2 else self._first_run(a, b)
            if first is not None:  # standard entries: scan only as far as the status holds
                st, m = first
                if status is None:
                    status = st
                elif st is not status:
                    return Extent(offset, n, status)
                n += m
                if m < b - a:
                    return Extent(offset, n, status)
                continue
            for seg in self._map(a, b):
                st = _STATUS[seg[2]]
                if status is None:
                    status = st
                elif st is not status:
                    return Extent(offset, n, status)
                n += seg[1]
        assert status is not None
        return Extent(offset, n, status)

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        end = offset + length
        cs = self.cluster_size
        if length and (offset & (cs - 1)) + length <= cs and not self.extended_l2:
            data = self._read_in_cluster(offset, length)
            if data is not None:
                return data
        if length and (offset >> self.chunk_bits) == ((end - 1) >> self.chunk_bits):
            segs = self._map(offset, end)
            if len(segs) == 1:  # one run: no staging buffer, no copy
                kind, host = segs[0][2], segs[0][3]
                if kind == DATA and host + length <= self.f.size:
                    data = os.pread(self.f.fd, length, host)
                    if len(data) == length:
                        return data
                elif kind == ZEROES or (kind == UNALLOC and self.backing is None):
                    return bytes(length)
                elif kind == UNALLOC and self.backing is not None:
                    if end <= self.backing.virtual_size:
                        return self.backing.read(offset, length)
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def _read_in_cluster(self, offset: int, length: int) -> bytes | None:
        """Fast path for a read inside one cluster with a plain data or zero entry (a 4 KiB
        random read): one L2 lookup, no run list. None: take the general path."""
        l1i = offset >> self.chunk_bits
        if l1i >= len(self.l1) or not self.l1[l1i] & OFFSET_MASK:
            return None
        _, l2 = self._l2(l1i)
        if l2 is None:
            return None
        e = l2[(offset >> self.cluster_bits) & (self.l2_entries - 1)]
        off = e & OFFSET_MASK
        if e & COMPRESSED or off & (self.cluster_size - 1):
            return None
        if self.version >= 3 and e & ZERO:
            return bytes(length)
        if not off:
            return None
        host = off + (offset & (self.cluster_size - 1))
        if host + length > self.f.size:
            return None
        data = os.pread(self.f.fd, length, host)
        return data if len(data) == length else None

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Like read(), into a caller's writable buffer (avoids a copy)."""
        self._check_range(offset, len(buf))
        end = offset + len(buf)
        for a, b in self._chunks(offset, end):
            for g, n, kind, host in self._map(a, b):
                mv = buf[g - offset:g - offset + n]
                if kind == DATA:
                    if host + n > self.f.size:
                        raise self.f.eio(f"data cluster at 0x{host:x} lies beyond the end of "
                                         f"file")
                    self.f.pread_into(mv, host)
                elif kind == ZEROES:
                    _zero(mv)
                elif kind == UNALLOC:
                    self._read_backing(g, mv)
                else:
                    data = self._decompressed(host)
                    inner = g & (self.cluster_size - 1)
                    mv[:] = memoryview(data)[inner:inner + n]

    def _read_backing(self, goff: int, mv: memoryview) -> None:
        bk = self.backing
        n = len(mv)
        m = 0 if bk is None else max(0, min(n, bk.virtual_size - goff))
        if m and bk is not None:
            rinto = getattr(bk, "read_into", None)
            if rinto is not None:
                rinto(goff, mv[:m])
            else:
                mv[:m] = bk.read(goff, m)
        if m < n:
            _zero(mv[m:])

    def _decompressed(self, entry: int) -> bytes:
        if self._comp is not None and self._comp[0] == entry:
            return self._comp[1]
        off, size = compressed_range(entry, self.cluster_bits)
        if off >= self.f.size:
            raise self.f.eio(f"compressed cluster at 0x{off:x} lies beyond the end of file")
        data = decompress_cluster(self.compression_type, self.f.pread(size, off),
                                  self.cluster_size)
        self._comp = (entry, data)
        return data

    def _view(self, goff: int, n: int) -> bytes:
        """The current guest view of [goff, goff+n), zeroes past the virtual size."""
        buf = bytearray(n)
        m = max(0, min(n, self.virtual_size - goff))
        if m:
            self.read_into(goff, memoryview(buf)[:m])
        return bytes(buf)

    # -- metadata writes --------------------------------------------------------------
    def _set_reftable(self, off: int, clusters: int) -> None:
        self.hdr.refcount_table_offset = off
        self.hdr.refcount_table_clusters = clusters
        self.f.pwrite(struct.pack(">QI", off, clusters), 48)

    def _write_l1(self, l1i: int, value: int) -> None:
        if self.meta is not None:
            ent = (self.hdr.l1_table_offset + l1i * 8) >> self.cluster_bits
            self._guard(ent, 1, "active L1 table")
            self.meta.l1_changed(self.l1[l1i], value)
        self.l1[l1i] = value
        self.f.pwrite(struct.pack(">Q", value), self.hdr.l1_table_offset + l1i * 8)

    def _write_l2_entries(self, l2off: int, l2: array[int], lo: int, hi: int) -> None:
        """Mark entries [lo, hi) of table l2 dirty (written back later)."""
        if self.l2_cache.get(l2off) is not l2:
            # l2 left the cache during this request (written back first if it was dirty)
            # and may have been read in again: this object has the request's entries
            self.l2_cache.put(l2off, l2)
        d = self._dirty.get(l2off)
        if d is None:
            self._dirty[l2off] = (l2, [lo, hi])
        else:
            span = d[1]
            if d[0] is not l2:
                self._dirty[l2off] = (l2, span)
            if lo < span[0]:
                span[0] = lo
            if hi > span[1]:
                span[1] = hi

    def _write_back(self) -> None:
        """Write every dirty L2 table span, after syncing the refcounts they depend on."""
        if not self._dirty or self.corrupt:  # a corrupt image's metadata is left alone
            return
        # the refcounts and data of the clusters the entries name reach the disk first
        self.f.barrier(data=True)
        ew = self._ew
        for l2off in list(self._dirty):
            t, (lo, hi) = self._dirty[l2off]
            part = t[lo * ew:hi * ew]
            part.byteswap()
            self.f.pwrite(part.tobytes(), l2off + lo * ew * 8)
            del self._dirty[l2off]

    def _evict_l2(self, l2off: int, table: array[int]) -> None:
        """The LRU drops a table: if it is dirty, write all dirty tables back first."""
        if l2off in self._dirty:
            self._write_back()
            self._dirty.pop(l2off, None)  # corrupt: dropped unwritten

    def _writable_l2(self, l1i: int) -> tuple[int, array[int]]:
        """The L2 table for l1i, allocated or copied so that it may be modified."""
        e = self.l1[l1i]
        off = e & OFFSET_MASK
        if off:
            _, t = self._l2(l1i)
            assert t is not None
            c = off >> self.cluster_bits
            if e & COPIED:
                self._guard(c, 1, "active L2 table", c)
                return off, t
            if self.rc.get(c) == 1:
                self._guard(c, 1, "active L2 table", c)
                self._write_l1(l1i, off | COPIED)
                return off, t
            src = array("Q", t)
        else:
            src = array("Q", bytes(self.cluster_size))
        start, _ = self._alloc(1)
        new = start << self.cluster_bits
        be = array("Q", src)
        be.byteswap()
        try:
            self.f.pwrite(be.tobytes(), new)
        except OSError:
            self._unalloc(start, 1)
            raise
        self.f.unsynced = True
        self.f.barrier()  # refcount and table content before the L1 entry
        self._write_l1(l1i, new | COPIED)
        self.l2_cache.put(new, src)
        if off:
            self.l2_cache.drop(off)
            self._dirty.pop(off, None)
            self._queue_free(off >> self.cluster_bits, 1)
        return new, src

    def _alloc(self, want: int) -> tuple[int, int]:
        """1..want contiguous clusters whose refcount 1 is written (see _write_back)."""
        start, count = self._reserve
        if not count:  # refcounts written now, synced before any L2 entry naming them
            start, count = self.rc.alloc(max(want, self._batch))
            self._batch = min(self._batch * 2, self._max_batch)
        k = min(want, count)
        self._reserve = (start + k, count - k)
        self._guard(start, k)
        return start, k

    def _unalloc(self, start: int, count: int) -> None:
        """Give back clusters from _alloc that were never referenced (a write failed)."""
        rs, rn = self._reserve
        if start + count == rs or not rn:
            self._reserve = (start, count + rn)
        else:
            self.rc.free(start, count)

    def _return_reserve(self) -> None:
        start, count = self._reserve
        if count:
            self._reserve = (0, 0)
            self.rc.free(start, count)  # never referenced: no ordering needed

    def _queue_free(self, start: int, count: int) -> None:
        self._pending.append((start, count))
        if len(self._pending) >= _MAX_PENDING_FREES:
            self._apply_frees()

    def _free_entry(self, e: int) -> None:
        """Queue the refcount drop for whatever an (old) L2 entry pointed at."""
        if e & COMPRESSED:
            self._queue_free(*compressed_clusters(e, self.cluster_bits))
        elif e & OFFSET_MASK:
            self._queue_free((e & OFFSET_MASK) >> self.cluster_bits, 1)

    def _apply_frees(self) -> None:
        if not self._pending:
            return
        self._write_back()
        self.f.sync()  # the L2 entries that dropped these clusters are on disk first
        pending, self._pending = self._pending, []
        for start, count in pending:
            self.rc.free(start, count)
        self._comp = None

    def _before_write(self) -> None:
        if self._prepared:
            return
        if self.version >= 3 and self.hdr.autoclear:
            # We maintain no autoclear feature (bitmaps, raw external data): clear them.
            h = dataclasses.replace(self.hdr, autoclear=0)
            self._write_header(h)
        self._prepared = True

    def _write_header(self, h: Header) -> None:
        """Rewrite the header area in one pwrite inside the first cluster.

        The file never grows (the tables follow the first cluster), and its blocks are
        reserved first (fallocate), so a full file system fails the rewrite before a
        byte changes instead of tearing it halfway.
        """
        buf = serialize_header(h)
        if len(buf) > self.cluster_size:  # drop the optional feature name table
            h.extensions = [(t, d) for t, d in h.extensions if t != EXT_FEATURE_TABLE]
            buf = serialize_header(h)
        if len(buf) > self.cluster_size:
            raise OSError(errno.ENOSPC, f"{self.path}: header does not fit in the first cluster")
        pad = max(0, min(self.cluster_size, self._hdr_len) - len(buf))
        out = buf + bytes(pad)
        if len(out) > self.f.size:
            raise OSError(errno.EIO, f"{self.path}: the file is shorter than its header")
        try:
            fallocate(self.f.fd, _FALLOC_FL_KEEP_SIZE, 0, len(out))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(e.errno, f"{self.path}: cannot rewrite the header: "
                                       f"{e.strerror}") from None
        done = os.pwrite(self.f.fd, out, 0)
        if done != len(out):
            raise OSError(errno.EIO, f"{self.path}: short header write ({done} of {len(out)})")
        self.f.sync()
        self.hdr = h
        self._hdr_len = len(buf)

    # -- writes -----------------------------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_writable()
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        if not len(mv):
            return
        self._before_write()
        for a, b in self._chunks(offset, offset + len(mv)):
            self._write_chunk(a, mv[a - offset:b - offset])

    def _entry(self, l2: array[int], idx: int) -> tuple[int, int]:
        """(entry, bitmap) of L2 index idx, refusing entries that point outside the file."""
        if self.extended_l2:
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
        return e, bm

    def data_location(self, offset: int, length: int) -> tuple[int, int, int] | None:
        """(fd, host offset, n): the first n <= length bytes at offset are plain data stored
        contiguously in this file; None if not (unallocated, zero, compressed, ...)."""
        self._check_range(offset, length)
        if not length:
            return None
        end = min(offset + length, ((offset >> self.chunk_bits) + 1) << self.chunk_bits)
        g, n, kind, host = self._map(offset, end)[0]
        if kind != DATA or host + n > self.f.size:
            return None
        return self.f.fd, host, n

    def write_from(self, offset: int, fd: int, src: int, length: int) -> int:
        """Copy length bytes from fd at src into whole clusters at offset that this image
        does not hold (standard L2 entries, all unallocated) with copy_file_range: no
        bytes through user space. Returns the bytes done (a prefix); 0: use write()."""
        self._check_writable()
        self._check_range(offset, length)
        cb, cs = self.cluster_bits, self.cluster_size
        end = min(offset + length, ((offset >> self.chunk_bits) + 1) << self.chunk_bits)
        if (self.extended_l2 or offset & (cs - 1) or end <= offset
                or (end & (cs - 1) and end != self.virtual_size)):
            return 0
        if not self.l1[offset >> self.chunk_bits] & OFFSET_MASK and self.backing_name is None:
            return 0  # unusual for a copy-up; keep to the general path
        self._before_write()
        l2off, l2 = self._writable_l2(offset >> self.chunk_bits)
        mask = self.l2_entries - 1
        c0, c1 = offset >> cb, ((end - 1) >> cb) + 1
        for ci in range(c0, c1):
            if l2[ci & mask]:
                return 0
        start, k = self._alloc(c1 - c0)
        host = start << cb
        n = min(end - offset, k << cb)
        done = 0
        try:
            while done < n:
                got = os.copy_file_range(fd, self.f.fd, n - done, src + done, host + done)
                if got <= 0:
                    raise OSError(errno.EIO, "copy_file_range made no progress")
                done += got
        except OSError as e:
            self._unalloc(start, k)
            if e.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return 0
            raise
        used = -(-n >> cb)
        if used < k:
            self._unalloc(start + used, k - used)
        if host + (used << cb) > self.f.size:  # a partial last cluster: pad the file
            self.f.size = max(self.f.size, host + n)
            if n & (cs - 1):
                tail = cs - (n & (cs - 1))
                self.f.pwrite(bytes(tail), host + n)
        else:
            self.f.size = max(self.f.size, host + n)
        updates = {(c0 + t) & mask: ((host + (t << cb)) | COPIED, ALL_ALLOC) for t in range(used)}
        self._commit_entries(l2off, l2, updates, names_data=True)
        return n

    def _write_chunk(self, offset: int, data: memoryview) -> None:
        cb, cs = self.cluster_bits, self.cluster_size
        end = offset + len(data)
        l2off, l2 = self._writable_l2(offset >> self.chunk_bits)
        mask = self.l2_entries - 1
        ext = self.extended_l2
        inner = offset & (cs - 1)
        if not ext and inner + len(data) <= cs:  # inside one cluster: in place if owned
            e = l2[(offset >> cb) & mask]
            off = e & OFFSET_MASK
            if (e & COPIED and off and not e & COMPRESSED and not off & (cs - 1)
                    and not (self.version >= 3 and e & ZERO) and off + cs <= self.f.size):
                self._guard(off >> cb, 1)
                self.f.pwrite(data, off + inner)  # no metadata to touch
                return
        if not ext and len(data) > cs and l2[(offset >> cb) & mask] & COPIED:
            host = self._contiguous_run(l2, offset, end)
            if host is not None and host + len(data) <= self.f.size:
                self._guard(host >> cb, ((host + len(data) - 1) >> cb) - (host >> cb) + 1)
                self.f.pwrite(data, host)  # all in place: no metadata to touch
                return
        zero_ok = self.version >= 3 and not ext
        plans = []  # (cluster index, action, host offset, head fill, tail fill, old entry)
        for ci in range(offset >> cb, ((end - 1) >> cb) + 1):
            e, bm = self._entry(l2, ci & mask)
            c0 = ci << cb
            a, b = max(offset, c0), min(end, c0 + cs)
            off = e & OFFSET_MASK
            owned = False
            if off and not e & COMPRESSED:
                owned = bool(e & COPIED) or self.rc.get(off >> cb) == 1
            if owned:
                full = (bm & ALL_ALLOC) == ALL_ALLOC if ext else not (zero_ok and e & ZERO)
                action = _INPLACE if full and e & COPIED else _FILL
            else:
                action = _NEW
            head = tail = b""
            if action != _INPLACE:
                if a > c0:
                    head = self._view(c0, a - c0)
                if b < c0 + cs:
                    tail = self._view(b, c0 + cs - b)
            plans.append((ci, action, off, head, tail, e))
        for p in plans:  # before anything is written: no half-done request
            if p[1] != _NEW:
                self._guard(p[2] >> cb, 1)
        updates: dict[int, tuple[int, int]] = {}
        frees: list[int] = []
        i = 0
        while i < len(plans):
            ci, action, off, head, tail, e = plans[i]
            c0 = ci << cb
            if action == _INPLACE:
                j = i + 1
                while (j < len(plans) and plans[j][1] == _INPLACE
                       and plans[j][2] == off + ((j - i) << cb)):
                    j += 1
                a = max(offset, c0)
                b = min(end, (plans[j - 1][0] + 1) << cb)
                self.f.pwrite(data[a - offset:b - offset], off + (a - c0))
                i = j
                continue
            if action == _FILL:
                k, host, start = 1, off, -1
            else:
                j = i + 1
                while j < len(plans) and plans[j][1] == _NEW:
                    j += 1
                start, k = self._alloc(j - i)
                host = start << cb
            last = plans[i + k - 1]
            a = max(offset, c0)
            b = min(end, (last[0] + 1) << cb)
            bufs: list[bytes | memoryview] = []
            if head:
                bufs.append(head)
            bufs.append(data[a - offset:b - offset])
            if last[4]:
                bufs.append(last[4])
            try:
                self.f.pwritev(bufs, host)
            except OSError:
                if start >= 0:  # ENOSPC, EIO: the new clusters were never referenced
                    self._unalloc(start, k)
                raise
            for t in range(k):
                p = plans[i + t]
                updates[p[0] & mask] = ((host + (t << cb)) | COPIED, ALL_ALLOC)
                if p[1] == _NEW:
                    frees.append(p[5])
            i += k
        if updates:
            self._commit_entries(l2off, l2, updates, names_data=True)
        for e in frees:
            self._free_entry(e)

    def _commit_entries(self, l2off: int, l2: array[int], updates: dict[int, tuple[int, int]],
                        names_data: bool) -> None:
        """Set L2 entries in the cached table (dirty). names_data: they name cluster data
        just written, which must be synced before the table is written back."""
        if names_data:
            self.f.named_data = True
        for idx, (e, bm) in updates.items():
            if self.extended_l2:
                l2[idx * 2] = e
                l2[idx * 2 + 1] = bm
            else:
                l2[idx] = e
        self._write_l2_entries(l2off, l2, min(updates), max(updates) + 1)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._check_writable()
        self._check_range(offset, length)
        if not length:
            return
        self._before_write()
        cb, cs = self.cluster_bits, self.cluster_size
        end = offset + length
        fc0 = (offset + cs - 1) >> cb
        fc1 = (end >> cb) if end < self.virtual_size else ((end + cs - 1) >> cb)
        if fc0 >= fc1:
            self._write_zero_data(offset, end)
            return
        if offset < fc0 << cb:
            self._write_zero_data(offset, fc0 << cb)
        zero_end = min(fc1 << cb, self.virtual_size)
        for a, b in self._chunks(fc0 << cb, zero_end):
            self._zero_chunk(a, b, unmap)
        if zero_end < end:
            self._write_zero_data(zero_end, end)

    def _write_zero_data(self, a: int, b: int) -> None:
        step = 1 << 20
        while a < b:
            n = min(step, b - a)
            self.write(a, memoryview(_ZEROS)[:n])
            a += n

    def _zero_chunk(self, a: int, b: int, unmap: bool) -> None:
        """Make whole clusters [a, b) read as zeroes (b may be the unaligned virtual end)."""
        cb = self.cluster_bits
        l1i = a >> self.chunk_bits
        v3 = self.version >= 3
        if not v3 and self.backing_name is not None:
            self._write_zero_data(a, b)
            return
        if not (self.l1[l1i] & OFFSET_MASK) and self.backing_name is None:
            return  # unallocated without a backing file already reads as zeroes
        l2off, l2 = self._writable_l2(l1i)
        mask = self.l2_entries - 1
        updates: dict[int, tuple[int, int]] = {}
        frees: list[int] = []
        for ci in range(a >> cb, ((b - 1) >> cb) + 1):
            idx = ci & mask
            e, bm = self._entry(l2, idx)
            off = e & OFFSET_MASK
            keep = (not unmap and v3 and off and e & COPIED and not e & COMPRESSED)
            if not v3:
                new = (0, 0)
            elif self.extended_l2:
                new = ((off | COPIED) if keep else 0, ALL_ZERO)
            else:
                new = (((off | COPIED) if keep else 0) | ZERO, 0)
            if new != (e, bm):
                updates[idx] = new
                if not keep:
                    frees.append(e)
        if updates:  # zero flags or no cluster at all: no data to order before them
            self._commit_entries(l2off, l2, updates, names_data=False)
        for e in frees:
            self._free_entry(e)

    # -- durability, header, info -------------------------------------------------------
    def flush(self) -> None:
        if self._closed or self.read_only:
            return
        if not self.corrupt:  # a corrupt image's metadata is left alone
            self._write_back()
            self._apply_frees()
        self.f.sync()

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        self._check_writable()
        if name is not None and len(name.encode()) > MAX_BACKING_NAME:
            raise OSError(errno.ENAMETOOLONG, f"{self.path}: backing file name is too long")
        self._before_write()
        self.flush()  # what the top holds is on disk before the header may drop the backing
        h = dataclasses.replace(self.hdr, extensions=list(self.hdr.extensions))
        h.backing_name = name
        h.backing_format = fmt if name is not None else None
        self._write_header(h)
        self.backing_name = name
        self.backing_format = h.backing_format
        if name is None:
            self.backing = None

    def fileno(self) -> int:
        return self.f.fd

    def info(self) -> dict[str, Any]:
        st = os.fstat(self.f.fd)
        data: dict[str, Any]
        ctype = COMPRESSION_NAMES.get(self.compression_type, "zlib")
        if self.version >= 3:
            data = {"compat": "1.1", "compression-type": ctype,
                    "lazy-refcounts": bool(self.hdr.compatible & COMPAT_LAZY_REFCOUNTS),
                    "refcount-bits": self.refcount_bits, "corrupt": self.corrupt,
                    "extended-l2": self.extended_l2}
        else:
            data = {"compat": "0.10", "compression-type": ctype,
                    "refcount-bits": self.refcount_bits}
        out: dict[str, Any] = {
            "virtual-size": self.virtual_size, "filename": self.path, "cluster-size":
            self.cluster_size, "format": "qcow2", "actual-size": st.st_blocks * 512,
            "format-specific": {"type": "qcow2", "data": data}, "dirty-flag": self.dirty,
        }
        if self.backing_name is not None:
            out["backing-filename"] = self.backing_name
            if self.backing_format:
                out["backing-filename-format"] = self.backing_format
        return out

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only:
                if not self.corrupt:
                    self._write_back()
                    self._apply_frees()
                    self._return_reserve()
                self.f.sync()
        finally:
            self._closed = True
            unlock_image(self.f.fd)
            os.close(self.f.fd)
