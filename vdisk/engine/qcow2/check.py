"""check_qcow2: verify refcounts against references and COPIED flags, like qemu-img check.

References counted: the header cluster, the active L1 table and every L2 table and data
(or compressed) cluster under it, the snapshot table, each snapshot's L1 and what it
references, the refcount table and refcount blocks, and the bitmap directory and tables
when the bitmaps autoclear bit is set. A stored refcount above the count is a leak; below
it a corruption. COPIED must be set exactly on active L1/L2 entries whose refcount is 1.
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass, field

from vdisk.engine import blocking
from vdisk.engine.locking import lock_image, perms_for, unlock_image
from vdisk.engine.qcow2.fileio import ImageFile
from vdisk.engine.qcow2.header import AUTOCLEAR_BITMAPS, EXT_BITMAPS, Header
from vdisk.engine.qcow2.layout import COMPRESSED, COPIED, OFFSET_MASK, compressed_range
from vdisk.engine.qcow2.refcount import Refcounts, decode_block
from vdisk.errors import ImageError


@dataclass
class CheckResult:
    """Counts as `qemu-img check --output=json` reports them, plus the messages."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.leaks or self.check_errors)


class _Checker:
    def __init__(self, f: ImageFile, h: Header) -> None:
        self.f = f
        self.h = h
        self.cb = h.cluster_bits
        self.cs = 1 << self.cb
        self.ew = 2 if h.extended_l2 else 1
        self.nb = -(-f.size // self.cs)
        self.refs = array("I", bytes(4 * self.nb))
        self.extra: dict[int, int] = {}
        self.res = CheckResult()

    def msg(self, text: str) -> None:
        self.res.messages.append(text)

    def inc(self, off: int, size: int) -> None:
        if size <= 0:
            return
        for c in range(off >> self.cb, ((off + size - 1) >> self.cb) + 1):
            if c < self.nb:
                self.refs[c] += 1
            else:
                self.extra[c] = self.extra.get(c, 0) + 1

    def table(self, off: int, count: int) -> array[int]:
        t = array("Q", self.f.pread(count * 8, off))
        t.byteswap()
        return t

    def walk_l1(self, l1_off: int, l1_size: int) -> None:
        for e in self.table(l1_off, l1_size):
            off = e & OFFSET_MASK
            if not off:
                continue
            if off & (self.cs - 1):
                self.msg(f"ERROR l2_offset={off:x}: Table is not cluster aligned; "
                         f"L1 entry corrupted")
                self.res.corruptions += 1
                continue
            self.inc(off, self.cs)
            l2 = self.table(off, self.cs // 8)
            for i in range(0, len(l2), self.ew):
                self.l2_entry(l2[i], l2[i + 1] if self.ew == 2 else 0)

    def l2_entry(self, e: int, bm: int) -> None:
        if e & COMPRESSED:
            if e & COPIED:
                self.msg(f"ERROR: coffset=0x{e & ~COPIED:x}: copied flag must never be set "
                         f"for compressed clusters")
                self.res.corruptions += 1
            if bm:
                self.msg("ERROR compressed cluster with non-zero subcluster allocation bitmap")
                self.res.corruptions += 1
            self.inc(*compressed_range(e & ~COPIED, self.cb))
            return
        off = e & OFFSET_MASK
        if not off:
            return
        if off & (self.cs - 1):
            self.msg(f"ERROR offset={off:x}: Cluster is not properly aligned; "
                     f"L2 entry corrupted")
            self.res.corruptions += 1
            return
        self.inc(off, self.cs)

    def snapshots(self) -> None:
        h = self.h
        if not h.nb_snapshots:
            return
        pos = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            hdr = self.f.pread(40, pos)
            l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", hdr, 0)
            extra_len = struct.unpack_from(">I", hdr, 36)[0]
            pos += 40 + extra_len + id_len + name_len
            pos = (pos + 7) & ~7
            if l1_off & (self.cs - 1) or l1_size * 8 > 32 << 20:
                self.msg(f"ERROR snapshot L1 table at 0x{l1_off:x} is invalid")
                self.res.corruptions += 1
                continue
            self.inc(l1_off, l1_size * 8)
            self.walk_l1(l1_off, l1_size)
        self.inc(h.snapshots_offset, pos - h.snapshots_offset)

    def bitmaps(self) -> None:
        ext = self.h.ext(EXT_BITMAPS)
        if ext is None or not self.h.autoclear & AUTOCLEAR_BITMAPS or len(ext) < 24:
            return
        nb, _, dir_size, dir_off = struct.unpack_from(">IIQQ", ext, 0)
        if dir_off % self.cs or dir_off + dir_size > self.f.size or dir_size > 64 << 20:
            self.msg("ERROR bitmap directory lies outside the image")
            self.res.corruptions += 1
            return
        self.inc(dir_off, dir_size)
        d = self.f.pread(dir_size, dir_off)
        pos = 0
        for _ in range(nb):
            if pos + 24 > len(d):
                break
            t_off, t_size, _flags, _typ, _gran, name_len, extra_len = struct.unpack_from(
                ">QIIBBHI", d, pos)
            pos = (pos + 24 + extra_len + name_len + 7) & ~7
            if t_off % self.cs or t_off + t_size * 8 > self.f.size:
                self.msg("ERROR bitmap table lies outside the image")
                self.res.corruptions += 1
                continue
            self.inc(t_off, t_size * 8)
            for e in self.table(t_off, t_size):
                if e & OFFSET_MASK:
                    self.inc(e & OFFSET_MASK, self.cs)

    def refcount_structures(self, rc: Refcounts) -> None:
        self.inc(self.h.refcount_table_offset, self.h.refcount_table_clusters * self.cs)
        for i, e in enumerate(rc.table):
            off = e & OFFSET_MASK
            if not off:
                continue
            if off & (self.cs - 1):
                self.msg(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                         f"entry corrupted")
                self.res.corruptions += 1
                rc.table[i] = 0
            elif off >= self.f.size:
                self.msg(f"ERROR refcount block {i} is outside image")
                self.res.corruptions += 1
                rc.table[i] = 0
            else:
                self.inc(off, self.cs)

    def count(self, rc: Refcounts) -> None:
        h = self.h
        self.inc(0, self.cs)
        if h.l1_size:
            self.inc(h.l1_table_offset, h.l1_size * 8)
            self.walk_l1(h.l1_table_offset, h.l1_size)
        self.snapshots()
        self.bitmaps()
        self.refcount_structures(rc)

    def _fix(self, rc: Refcounts, c: int, s: int, r: int, fix_leaks: bool,
             fix_all: bool) -> None:
        leak = s > r
        if fix_leaks if leak else fix_all:
            self.msg(f"Repairing cluster {c} refcount={s} reference={r}")
            rc.change(c, 1, r - s)
            if leak:
                self.res.leaks_fixed += 1
            else:
                self.res.corruptions_fixed += 1
        elif leak:
            self.msg(f"Leaked cluster {c} refcount={s} reference={r}")
            self.res.leaks += 1
        else:
            self.msg(f"ERROR cluster {c} refcount={s} reference={r}")
            self.res.corruptions += 1

    def compare(self, rc: Refcounts, fix_leaks: bool, fix_all: bool) -> None:
        n = self.nb
        per = rc.per_block
        self.res.total_clusters = n + len(self.extra)
        for b in range(-(-n // per)):
            lo, hi = b * per, min(n, (b + 1) * per)
            blk = rc.block(b) if b < len(rc.table) and rc.table[b] & OFFSET_MASK else None
            stored = decode_block(blk, rc.w)[: hi - lo] if blk is not None else [0] * (hi - lo)
            refs = self.refs[lo:hi].tolist()
            self.res.allocated_clusters += sum(1 for v in stored if v)
            if stored == refs:
                continue
            for k, (s, r) in enumerate(zip(stored, refs, strict=True)):
                if s != r:
                    self._fix(rc, lo + k, s, r, fix_leaks, fix_all)
        for c in sorted(self.extra):  # referenced clusters past the end of the file
            try:
                s = rc.get(c)
            except OSError:
                s = 0
            if s != self.extra[c]:
                self._fix(rc, c, s, self.extra[c], False, False)

    def oflag_copied(self, rc: Refcounts, fix: bool) -> None:
        h = self.h
        if not h.l1_size:
            return
        l1 = self.table(h.l1_table_offset, h.l1_size)
        for i, e in enumerate(l1):
            off = e & OFFSET_MASK
            if not off or off & (self.cs - 1):
                continue
            r = rc.get(off >> self.cb)
            if (r == 1) != bool(e & COPIED):
                if fix:
                    ne = (e | COPIED) if r == 1 else (e & ~COPIED)
                    self.f.pwrite(struct.pack(">Q", ne), h.l1_table_offset + i * 8)
                    self.res.corruptions_fixed += 1
                else:
                    self.msg(f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} "
                             f"refcount={r}")
                    self.res.corruptions += 1
            l2 = self.table(off, self.cs // 8)
            for j in range(0, len(l2), self.ew):
                le = l2[j]
                doff = le & OFFSET_MASK
                if le & COMPRESSED or not doff or doff & (self.cs - 1):
                    continue
                r = rc.get(doff >> self.cb)
                if (r == 1) != bool(le & COPIED):
                    if fix:
                        ne = (le | COPIED) if r == 1 else (le & ~COPIED)
                        self.f.pwrite(struct.pack(">Q", ne), off + j * 8)
                        self.res.corruptions_fixed += 1
                    else:
                        self.msg(f"ERROR OFLAG_COPIED data cluster: l2_entry={le:x} "
                                 f"refcount={r}")
                        self.res.corruptions += 1


def _run(path: str, fd: int, fix_leaks: bool, fix_all: bool) -> CheckResult:
    from vdisk.engine.qcow2.open import read_header

    h = read_header(path, fd)
    f = ImageFile(fd, path)

    def set_table(off: int, clusters: int) -> None:
        f.pwrite(struct.pack(">QI", off, clusters), 48)

    rc = Refcounts(f, h.cluster_bits, h.refcount_order, h.refcount_table_offset,
                   h.refcount_table_clusters, set_table)
    ck = _Checker(f, h)
    ck.count(rc)
    ck.compare(rc, fix_leaks, fix_all)
    ck.oflag_copied(rc, fix_all)
    return ck.res


def check_qcow2(path: str, repair: str | None = None, *,
                force_share: bool = False) -> CheckResult:
    """Check (and with repair='leaks' or 'all', repair) a qcow2 image like qemu-img check.

    force_share checks without taking locks (qemu-img check -U); it cannot repair.
    """
    if repair not in (None, "leaks", "all"):
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    if force_share and repair is not None:
        raise ValueError("force_share cannot repair")
    path = os.path.abspath(path)
    writable = repair is not None
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(path, f"cannot open: {e.strerror}") from None
    try:
        if not force_share:
            lock_image(fd, path, *perms_for(writable=writable, metadata=True))
        try:
            res = _run(path, fd, writable, repair == "all")
            if writable and (res.leaks_fixed or res.corruptions_fixed):
                blocking.fdatasync(fd)
                again = _run(path, fd, False, False)
                again.leaks_fixed, again.corruptions_fixed = res.leaks_fixed, \
                    res.corruptions_fixed
                again.messages = res.messages + again.messages
                res = again
            return res
        finally:
            if not force_share:
                unlock_image(fd)
    except OSError as e:
        raise ImageError(path, f"cannot check: {e.strerror}") from None
    finally:
        os.close(fd)
