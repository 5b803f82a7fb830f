"""Persistent dirty bitmaps of a qcow2 image (docs/interop/qcow2.rst "Bitmaps"; QEMU's
qcow2-bitmap.c): the bitmaps extension and directory, the in-use protocol, writing out.

At open the directory is read and checked as QEMU checks it (a bad one fails the open),
and every bitmap is loaded into memory (vdisk.engine.dirty_bitmap). A bitmap whose
in_use flag is set was not saved by the program that last had the image open: its data
is unknown, so it is kept as *inconsistent* (listed, never recording, refused by clear;
remove deletes it), as QEMU does, and a warning says so.

The in-use protocol: before the first change (the first write, or a QMP change) the
in_use flag of every consistent bitmap is written into the directory in place, the way
QEMU does it: autoclear bit off (synced), directory, sync, autoclear bit on (synced). So
a crash from then on leaves the flags set and no program trusts the stale bitmaps. On a
clean close each bitmap's data goes to new clusters (refcounts and data written, then one
fdatasync), then a new directory that names them, synced, then the header extension
pointing at it (synced), and only then are the old directory, tables and data freed: a
crash at any step leaves either the old directory (in use) or the new one, and at worst
leaked clusters. Nothing is written on flush: while in_use is set, the on-disk copy is
by definition not trusted, so writing it before the close would buy nothing (QEMU also
stores bitmaps only on close or inactivation).
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from vdisk.engine.dirty_bitmap import MAX_NAME, BitmapError, BitmapSet, DirtyBitmap
from vdisk.engine.qcow2.fileio import ImageFile
from vdisk.engine.qcow2.header import AUTOCLEAR_BITMAPS, EXT_BITMAPS, Header
from vdisk.engine.qcow2.refcount import Refcounts
from vdisk.errors import CorruptImageError

log = logging.getLogger("vdisk.qcow2")

_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, directory offset
_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, gbits, name, extra
FLAG_IN_USE = 1
FLAG_AUTO = 2
RESERVED_FLAGS = 0xFFFFFFFC
TYPE_DIRTY = 1
TABLE_RESERVED = 0xFF000000000001FE
TABLE_OFFSET = 0x00FFFFFFFFFFFE00
TABLE_ALL_ONES = 1
MAX_BITMAPS = 65535
MAX_DIR_SIZE = 1024 * MAX_BITMAPS
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000
MIN_GBITS, MAX_GBITS = 9, 31


@dataclass
class DirEntry:
    """One bitmap directory entry as it is (or will be) on disk."""

    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    name: str

    def pack(self) -> bytes:
        name = self.name.encode()
        raw = _ENTRY.pack(self.table_offset, self.table_size, self.flags, TYPE_DIRTY,
                          self.granularity_bits, len(name), 0) + name
        return raw + bytes(-len(raw) % 8)


def _entry_size(name: str) -> int:
    return (_ENTRY.size + len(name.encode()) + 7) & ~7


class Qcow2Bitmaps(BitmapSet):
    """The bitmaps of one open qcow2 image, loaded at open, stored on close."""

    def __init__(self, path: str, f: ImageFile, hdr: Callable[[], Header],
                 write_header: Callable[[Header], None], rc: Refcounts,
                 guard: Callable[[int, int], None], read_only: bool) -> None:
        h = hdr()
        super().__init__(h.size, h.cluster_size)
        self.path = path
        self.f = f
        self._hdr = hdr
        self._write_header = write_header
        self.rc = rc
        self._guard = guard
        self.read_only = read_only
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        self.version = h.version
        self.entries: list[DirEntry] = []  # the directory on disk, in its order
        self.dir_offset = 0
        self.dir_size = 0
        self.prepared = False  # in_use flags are on disk
        self._load(h)

    # -- open ------------------------------------------------------------------------------
    def _bad(self, reason: str) -> CorruptImageError:
        return CorruptImageError(self.path, f"could not load the bitmaps: {reason}")

    def _load(self, h: Header) -> None:
        ext = h.ext(EXT_BITMAPS) if h.version >= 3 else None
        if ext is None:
            return
        if not h.autoclear & AUTOCLEAR_BITMAPS:
            log.warning("%s: a program lacking bitmap support modified this file, so all "
                        "bitmaps are now considered inconsistent", self.path)
            return
        if len(ext) < _EXT.size:
            raise self._bad("the bitmaps extension is too short")
        nb, _, size, off = _EXT.unpack_from(ext)
        if nb == 0:
            return
        if nb > MAX_BITMAPS:
            raise self._bad("too many bitmaps")
        if size == 0 or size > MAX_DIR_SIZE or off % self.cs or not off:
            raise self._bad("invalid bitmap directory offset or size")
        if off + size > self.f.size:
            raise self._bad("the bitmap directory lies beyond the end of file")
        raw = self.f.pread(size, off)
        self.dir_offset, self.dir_size = off, size
        pos = 0
        while pos < size:
            if pos + _ENTRY.size > size:
                raise self._bad("Broken bitmap directory")
            if len(self.entries) >= nb:
                raise self._bad("More bitmaps found than specified in header extension")
            toff, tsize, flags, btype, gbits, nlen, extra = _ENTRY.unpack_from(raw, pos)
            esize = (_ENTRY.size + nlen + extra + 7) & ~7
            if pos + esize > size:
                raise self._bad("Broken bitmap directory")
            if extra:
                raise self._bad("Bitmap extra data is not supported")
            name_raw = raw[pos + _ENTRY.size:pos + _ENTRY.size + nlen]
            name = name_raw.decode("utf-8", "replace")
            phys = tsize * self.cs
            if (not tsize or not toff or toff % self.cs or tsize > MAX_TABLE_SIZE
                    or not MIN_GBITS <= gbits <= MAX_GBITS or flags & RESERVED_FLAGS
                    or nlen > MAX_NAME or btype != TYPE_DIRTY or phys > MAX_PHYS_SIZE
                    or (not flags & FLAG_IN_USE and self.size > (phys * 8) << gbits)):
                raise self._bad(f"Bitmap '{name}' doesn't satisfy the constraints")
            self.entries.append(DirEntry(toff, tsize, flags, gbits, name))
            pos += esize
        if len(self.entries) != nb:
            raise self._bad("Less bitmaps found than specified in header extension")
        for e in self.entries:
            self._load_bitmap(e)
        self._changed()

    def _load_bitmap(self, e: DirEntry) -> None:
        bm = DirtyBitmap(e.name, self.size, e.granularity_bits,
                         enabled=bool(e.flags & FLAG_AUTO), persistent=True)
        bm.readonly = self.read_only
        self.bitmaps.insert(0, bm)
        if e.flags & FLAG_IN_USE:
            bm.inconsistent = True
            log.warning("%s: bitmap '%s' is in use (it was not saved: the program that had "
                        "the image open did not close it), so it is inconsistent and cannot "
                        "be used; block-dirty-bitmap-remove deletes it", self.path, e.name)
            return
        table = self._read_table(e)
        if len(table) != -(-len(bm.bits) // self.cs):
            raise self._bad(f"Could not read bitmap '{e.name}' from image")
        for i, entry in enumerate(table):
            off = entry & TABLE_OFFSET
            if off:
                if off + self.cs > self.f.size:
                    raise self._bad(f"Could not read bitmap '{e.name}' from image")
                bm.load(self.f.pread(self.cs, off), i * self.cs)
            elif entry & TABLE_ALL_ONES:
                bm.load(b"\xff" * self.cs, i * self.cs)

    def _read_table(self, e: DirEntry) -> list[int]:
        n = e.table_size
        if e.table_offset + n * 8 > self.f.size:
            raise self._bad(f"Could not read bitmap_table table from image for bitmap "
                            f"'{e.name}'")
        table = list(struct.unpack(f">{n}Q", self.f.pread(n * 8, e.table_offset)))
        for t in table:
            off = t & TABLE_OFFSET
            if t & TABLE_RESERVED or (off and (t & TABLE_ALL_ONES or off % self.cs)):
                raise self._bad(f"Could not read bitmap_table table from image for bitmap "
                                f"'{e.name}'")
        return table

    def _entry(self, name: str) -> DirEntry | None:
        return next((e for e in self.entries if e.name == name), None)

    # -- the in-use protocol ------------------------------------------------------------------
    def prepare(self) -> None:
        """Before the first change: set in_use on disk for every consistent bitmap."""
        if self.prepared or self.read_only:
            return
        self.prepared = True
        todo = [e for e in self.entries if not e.flags & FLAG_IN_USE]
        if not todo:
            return
        self._set_autoclear(False)
        for e in todo:
            e.flags |= FLAG_IN_USE
        raw = b"".join(e.pack() for e in self.entries)
        assert len(raw) == self.dir_size
        self._guard(self.dir_offset >> self.cb, -(-self.dir_size >> self.cb))
        self.f.pwrite(raw, self.dir_offset)
        self.f.sync()
        self._set_autoclear(True)

    def _set_autoclear(self, on: bool) -> None:
        h = self._hdr()
        bits = AUTOCLEAR_BITMAPS if on else 0
        self._write_header(dataclasses.replace(h, autoclear=bits,
                                               extensions=list(h.extensions)))

    def keeps_autoclear(self) -> int:
        """The autoclear bits a write must keep: the bitmaps bit while they are maintained."""
        return AUTOCLEAR_BITMAPS if self.entries else 0

    # -- QMP operations -------------------------------------------------------------------------
    def check_persistent(self, node: str, name: str, granularity_bits: int) -> None:
        def refuse(reason: str) -> BitmapError:
            return BitmapError(f"Can't make bitmap '{name}' persistent in '{node}': {reason}")

        if self.version < 3:
            raise refuse("Cannot store bitmaps in qcow2 v2 files")
        if granularity_bits > MAX_GBITS:
            raise refuse(f"Granularity exceeds maximum ({1 << MAX_GBITS} bytes)")
        granules = -(-self.size >> granularity_bits)
        nbytes = -(-granules // 8)
        if nbytes > MAX_PHYS_SIZE or nbytes > MAX_TABLE_SIZE * self.cs:
            raise refuse("Too much space will be occupied by the bitmap. Use larger "
                         "granularity")
        if len(name) > MAX_NAME:
            raise refuse(f"Name length exceeds maximum ({MAX_NAME} characters)")
        if len(self.entries) >= MAX_BITMAPS:
            raise refuse("Maximum number of persistent bitmaps is already reached")
        if self.dir_size + _entry_size(name) > MAX_DIR_SIZE:
            raise refuse("Not enough space in the bitmap directory")

    def clear(self, name: str) -> None:
        bm = self.find(name)
        self.check_usable(bm)
        if bm.persistent and self._entry(name) is not None:
            self.prepare()  # the copy on disk no longer matches
        bm.clear()

    def remove(self, name: str) -> None:
        """As QEMU: a bitmap stored in the image leaves its directory at once."""
        bm = self.find(name)
        self.check_usable(bm, inconsistent_ok=True)
        e = self._entry(name) if bm.persistent else None
        if e is not None:
            self._commit([x for x in self.entries if x is not e], drop=[e])
        super().remove(name)

    # -- writing out ----------------------------------------------------------------------------
    def store(self) -> None:
        """On a clean close: every consistent persistent bitmap to disk, in_use cleared."""
        new = [bm for bm in self.bitmaps if bm.persistent and self._entry(bm.name) is None]
        if self.read_only:
            for bm in new:
                log.error("%s: bitmap '%s' cannot be stored: the image is read-only",
                          self.path, bm.name)
            return
        by_name = {bm.name: bm for bm in self.bitmaps}
        changed = self.prepared and any(not by_name[e.name].inconsistent for e in self.entries)
        if not changed and not new:
            return  # nothing changed: the bitmaps on disk are up to date
        entries: list[DirEntry] = []
        drop: list[DirEntry] = []
        for e in self.entries:
            bm = by_name[e.name]
            if bm.inconsistent:
                entries.append(e)  # stays in use, as QEMU leaves it
                continue
            drop.append(e)
            entries.append(self._write_bitmap(bm))
        entries += [self._write_bitmap(bm) for bm in new]
        self._commit(entries, drop)
        self.prepared = False

    def _alloc(self, n: int) -> int:
        """n contiguous new clusters (refcount 1 written, not synced); the first one."""
        short: list[tuple[int, int]] = []
        try:
            while True:
                start, got = self.rc.alloc(n)
                if got == n:
                    self._guard(start, n)
                    return start
                short.append((start, got))
        finally:
            for s, k in short:
                self.rc.free(s, k)

    def _write_bitmap(self, bm: DirtyBitmap) -> DirEntry:
        cs = self.cs
        bits = bm.bits
        table = [0] * -(-len(bits) // cs)
        for i in range(len(table)):
            chunk = bits[i * cs:(i + 1) * cs]
            if chunk.count(0) == len(chunk):
                continue  # an all-zero cluster needs no data cluster
            c = self._alloc(1)
            self.f.pwrite(bytes(chunk) + bytes(cs - len(chunk)), c << self.cb)
            table[i] = c << self.cb
        tbytes = struct.pack(f">{len(table)}Q", *table)
        n = -(-len(tbytes) // cs)
        t = self._alloc(n)
        self.f.pwrite(tbytes + bytes(n * cs - len(tbytes)), t << self.cb)
        self.f.unsynced = True
        return DirEntry(t << self.cb, len(table), FLAG_AUTO if bm.enabled else 0,
                        bm.granularity_bits, bm.name)

    def _commit(self, entries: list[DirEntry], drop: list[DirEntry]) -> None:
        """Point the header at a new directory of `entries` (QEMU's update_ext_header_and_dir),
        then free the old directory and the tables (and data) of `drop`."""
        old = (self.dir_offset, self.dir_size)
        h = self._hdr()
        exts = [(t, d) for t, d in h.extensions if t != EXT_BITMAPS]
        if entries:
            raw = b"".join(e.pack() for e in entries)
            n = -(-len(raw) // self.cs)
            d = self._alloc(n)
            self.f.pwrite(raw + bytes(n * self.cs - len(raw)), d << self.cb)
            self.f.sync()  # data, tables, directory and their refcounts before the header
            exts.append((EXT_BITMAPS, _EXT.pack(len(entries), 0, len(raw), d << self.cb)))
            self.dir_offset, self.dir_size = d << self.cb, len(raw)
            autoclear = AUTOCLEAR_BITMAPS
        else:
            self.dir_offset, self.dir_size = 0, 0
            autoclear = 0
        self._write_header(dataclasses.replace(h, autoclear=autoclear, extensions=exts))
        self.entries = entries
        if old[1]:
            self.rc.free(old[0] >> self.cb, -(-old[1] >> self.cb))
        for e in drop:
            table = self._read_table(e)
            for t in table:
                if t & TABLE_OFFSET:
                    self.rc.free((t & TABLE_OFFSET) >> self.cb, 1)
            self.rc.free(e.table_offset >> self.cb, -(-(e.table_size * 8) >> self.cb))
