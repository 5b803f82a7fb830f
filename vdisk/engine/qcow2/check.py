"""check_qcow2: verify refcounts against references and COPIED flags, as qemu-img check.

The walk, its messages and its repair follow QEMU's (block/qcow2-refcount.c): references
are counted into an in-memory refcount table (the header cluster, the active L1 table and
every L2 table and data or compressed cluster under it, each snapshot's L1 tree and the
snapshot table, the refcount table, the bitmap directory and tables when the bitmaps
autoclear bit is set, the refcount blocks). A reference to a region one cluster or more
past the end of the file is a corruption and is not counted. The stored refcounts are
then compared with the counts (a stored refcount above the count is a leak, below it a
corruption; a stored 0 that is referenced means the refcount structure must be rebuilt,
which only `repair="all"` does, see check_rebuild.py), and COPIED must be set exactly on
the active L1/L2 entries whose refcount is 1.
"""

from __future__ import annotations

import errno
import os
import struct
from array import array
from dataclasses import dataclass, field

from vdisk.engine import blocking
from vdisk.engine.locking import lock_image, perms_for, unlock_image
from vdisk.engine.qcow2.fileio import ImageFile
from vdisk.engine.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    INCOMPAT_OFFSET,
    Header,
)
from vdisk.engine.qcow2.layout import ALL_ALLOC, COMPRESSED, COPIED, OFFSET_MASK, ZERO
from vdisk.engine.qcow2.layout import compressed_range as _compressed_range
from vdisk.engine.qcow2.refcount import Refcounts
from vdisk.engine.raw import fallocate
from vdisk.errors import ImageError

L1_RESERVED = 0x7F00_0000_0000_01FF
L2_STD_RESERVED = 0x3F00_0000_0000_01FE
REFT_RESERVED = 0x1FF
MAX_L1_ENTRIES = (32 << 20) // 8
_KEEP_SIZE, _PUNCH_HOLE = 0x01, 0x02


class CheckFailed(Exception):
    """The check could not go on (QEMU's negative return): 'Check failed: <reason>'."""


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
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    messages: list[str] = field(default_factory=list)
    failed: str | None = None  # why the check stopped ("Input/output error"), or None

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.leaks or self.check_errors or self.failed)

    def counts(self) -> tuple[int, int, int, int, int]:
        return (self.corruptions, self.leaks, self.check_errors, self.corruptions_fixed,
                self.leaks_fixed)

    def set_counts(self, c: tuple[int, int, int, int, int]) -> None:
        (self.corruptions, self.leaks, self.check_errors, self.corruptions_fixed,
         self.leaks_fixed) = c


class Checker:
    """One pass of QEMU's refcount check over an open image file."""

    def __init__(self, f: ImageFile, h: Header, rc: Refcounts, res: CheckResult) -> None:
        self.f = f
        self.h = h
        self.rc = rc
        self.cb = h.cluster_bits
        self.cs = 1 << self.cb
        self.ew = 2 if h.extended_l2 else 1
        self.file_len = os.lseek(f.fd, 0, os.SEEK_END)  # st_size is 0 on a block device
        self.refs: array[int] = array("Q", bytes(8 * self.size_to_clusters(self.file_len)))
        self.res = res
        self.highest = 0

    def size_to_clusters(self, n: int) -> int:
        return -(-n // self.cs)

    def msg(self, text: str) -> None:
        self.res.messages.append(text)

    def grow(self, n: int) -> None:
        """The in-memory table covers at least n clusters (QEMU's realloc_refcount_array)."""
        if n > len(self.refs):
            self.refs.extend(array("Q", bytes(8 * (n - len(self.refs)))))

    def inc(self, off: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt: count one reference to every cluster of the region."""
        if size <= 0:
            return
        if off + size - self.file_len >= self.cs:
            self.msg("ERROR: counting reference for region exceeding the end of the file by "
                     f"one cluster or more: offset 0x{off:x} size 0x{size:x}")
            self.res.corruptions += 1
            return
        first, last = off >> self.cb, (off + size - 1) >> self.cb
        self.grow(last + 1)
        for k in range(first, last + 1):
            if self.refs[k] == self.rc.max:
                self.msg(f"ERROR: overflow cluster offset=0x{k << self.cb:x}")
                self.msg("Use qemu-img amend to increase the refcount entry width or "
                         "qemu-img convert to create a clean copy if the image cannot be "
                         "opened for writing")
                self.res.corruptions += 1
                continue
            self.refs[k] += 1

    def table(self, off: int, count: int) -> array[int]:
        t = array("Q", self.f.pread(count * 8, off))
        t.byteswap()
        return t

    # -- references --------------------------------------------------------------------

    def l1(self, l1_off: int, l1_size: int, frag: bool) -> None:
        if not l1_size:
            return
        self.inc(l1_off, l1_size * 8)
        for e in self.table(l1_off, l1_size):
            if not e:
                continue
            if e & L1_RESERVED:
                self.msg(f"ERROR found L1 entry with reserved bits set: {e:x}")
                self.res.corruptions += 1
            off = e & OFFSET_MASK
            self.inc(off, self.cs)
            if off & (self.cs - 1):
                self.msg(f"ERROR l2_offset={off:x}: Table is not cluster aligned; "
                         "L1 entry corrupted")
                self.res.corruptions += 1
            self.l2(off, frag)

    def l2(self, l2_off: int, frag: bool) -> None:
        res = self.res
        t = self.table(l2_off, self.cs // 8)
        next_contig = 0
        for i in range(0, len(t), self.ew):
            e = t[i]
            bm = t[i + 1] if self.ew == 2 else 0
            if e & COMPRESSED:
                if e & COPIED:
                    self.msg(f"ERROR: coffset=0x{e & ~(3 << 62):x}: copied flag must never "
                             "be set for compressed clusters")
                    e &= ~COPIED
                    res.corruptions += 1
                if bm:
                    self.msg(f"ERROR compressed cluster {i // self.ew} with non-zero "
                             f"subcluster allocation bitmap, entry=0x{e:x}")
                    res.corruptions += 1
                    continue
                self.inc(*_compressed_range(e, self.cb))
                if frag:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
                continue
            if e & L2_STD_RESERVED:
                self.msg(f"ERROR found l2 entry with reserved bits set: {e:x}")
                res.corruptions += 1
            off = e & OFFSET_MASK
            if not off:  # unallocated or a plain zero cluster
                if self.ew == 2 and bm & ALL_ALLOC:
                    res.corruptions += 1
                    self.msg("ERROR: Unallocated cluster has non-zero subcluster "
                             "allocation map")
                continue
            if (bm >> 32) & bm:
                res.corruptions += 1
                self.msg(f"ERROR offset={off:x}: Allocated cluster has corrupted subcluster "
                         "allocation bitmap")
            if off & (self.cs - 1):
                res.corruptions += 1
                data = bool(bm & ALL_ALLOC) if self.ew == 2 else not e & ZERO
                if data:
                    self.msg(f"ERROR offset={off:x}: Data cluster is not properly aligned; "
                             "L2 entry corrupted.")
                else:
                    self.msg(f"ERROR offset={off:x}: Preallocated cluster is not properly "
                             "aligned; L2 entry corrupted.")
            if frag:
                res.allocated_clusters += 1
                if next_contig and off != next_contig:
                    res.fragmented_clusters += 1
                next_contig = off + self.cs
            self.inc(off, self.cs)

    def snapshots(self) -> None:
        h = self.h
        pos = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            hdr = self.f.pread(40, pos)
            l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", hdr, 0)
            extra_len = struct.unpack_from(">I", hdr, 36)[0]
            names = self.f.pread(id_len + name_len, pos + 40 + extra_len)
            pos = (pos + 40 + extra_len + id_len + name_len + 7) & ~7
            sid = names[:id_len].decode("utf-8", "replace")
            sname = names[id_len:].decode("utf-8", "replace")
            if l1_off & (self.cs - 1):
                self.msg(f"ERROR snapshot {sid} ({sname}) l1_offset={l1_off:#x}: L1 table is "
                         "not cluster aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            if l1_size > MAX_L1_ENTRIES:
                self.msg(f"ERROR snapshot {sid} ({sname}) l1_size={l1_size:#x}: L1 table is "
                         "too large; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            self.l1(l1_off, l1_size, False)
        self.inc(h.snapshots_offset, pos - h.snapshots_offset)

    def bitmaps(self) -> None:
        ext = self.h.ext(EXT_BITMAPS)
        if ext is None or not self.h.autoclear & AUTOCLEAR_BITMAPS or len(ext) < 24:
            return
        nb, _, dir_size, dir_off = struct.unpack_from(">IIQQ", ext, 0)
        if not nb or dir_size > 64 << 20:
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
            self.inc(t_off, t_size * 8)
            for e in self.table(t_off, t_size):
                if e & OFFSET_MASK:
                    self.inc(e & OFFSET_MASK, self.cs)

    def refblocks(self, fix_errors: bool) -> bool:
        """check_refblocks: count each refcount block; True if a rebuild is needed."""
        rebuild = False
        for i, e in enumerate(self.rc.table):
            off = e & OFFSET_MASK
            if e & REFT_RESERVED:
                self.msg(f"ERROR refcount table entry {i} has reserved bits set")
                self.res.corruptions += 1
                rebuild = True
                continue
            if off & (self.cs - 1):
                self.msg(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                         "entry corrupted")
                self.res.corruptions += 1
                rebuild = True
                continue
            c = off >> self.cb
            if c >= len(self.refs):
                self.res.corruptions += 1
                self.msg(f"{'Repairing' if fix_errors else 'ERROR'} refcount block {i} is "
                         "outside image")
                if fix_errors:
                    os.ftruncate(self.f.fd, off + self.cs)
                    self.f.size = self.file_len = off + self.cs
                    self.grow(self.size_to_clusters(self.file_len))
                    self.res.corruptions -= 1
                    self.res.corruptions_fixed += 1
                    self.inc(off, self.cs)
                continue
            if off:
                self.inc(off, self.cs)
                if self.refs[c] != 1:
                    self.msg(f"ERROR refcount block {i} refcount={self.refs[c]}")
                    self.res.corruptions += 1
                    rebuild = True
        return rebuild

    def calculate(self, fix_errors: bool) -> bool:
        """calculate_refcounts: every reference counted; True if a rebuild is needed."""
        h = self.h
        self.inc(0, self.cs)
        self.l1(h.l1_table_offset, h.l1_size, True)
        self.snapshots()
        self.inc(self.rc.table_offset, self.rc.table_clusters * self.cs)
        self.bitmaps()
        return self.refblocks(fix_errors)

    # -- comparison and repair ---------------------------------------------------------

    def stored(self, c: int) -> int | None:
        try:
            return self.rc.get(c)
        except OSError as e:
            self.msg(f"Can't get refcount for cluster {c}: {e.strerror}")
            self.res.check_errors += 1
            return None

    def compare(self, fix_leaks: bool, fix_errors: bool) -> bool:
        """compare_refcounts; True if a stored refcount of 0 is referenced (rebuild)."""
        rebuild = False
        self.highest = 0
        res = self.res
        for c in range(len(self.refs)):
            s = self.stored(c)
            if s is None:
                continue
            r = self.refs[c]
            if s or r:
                self.highest = c
            if s == r:
                continue
            fixing = False
            if s == 0:
                rebuild = True
            elif s > r and fix_leaks or s < r and fix_errors:
                fixing = True
            word = "Repairing" if fixing else "ERROR" if s < r else "Leaked"
            self.msg(f"{word} cluster {c} refcount={s} reference={r}")
            if fixing:
                self.rc.change(c, 1, r - s)
                if r == 0:  # QEMU discards a cluster it frees (QCOW2_DISCARD_ALWAYS)
                    discard(self.f.fd, c << self.cb, self.cs)
                if s > r:
                    res.leaks_fixed += 1
                else:
                    res.corruptions_fixed += 1
                continue
            if s < r:
                res.corruptions += 1
            else:
                res.leaks += 1
        return rebuild

    def oflag_copied(self, fix_leaks: bool, fix_errors: bool) -> None:
        h, res = self.h, self.res
        repair = fix_errors or (fix_leaks and not (res.check_errors or res.corruptions
                                                   or res.leaks))
        word = "Repairing" if repair else "ERROR"
        if not h.l1_size:
            return
        l1 = self.table(h.l1_table_offset, h.l1_size)
        for i, e in enumerate(l1):
            off = e & OFFSET_MASK
            if not off:
                continue
            try:
                r = self.rc.get(off >> self.cb)
            except OSError:
                continue
            if (r == 1) != bool(e & COPIED):
                res.corruptions += 1
                self.msg(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} "
                         f"refcount={r}")
                if repair:
                    ne = (e | COPIED) if r == 1 else (e & ~COPIED)
                    self.f.pwrite(struct.pack(">Q", ne), h.l1_table_offset + i * 8)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            l2 = self.table(off, self.cs // 8)
            dirty = 0
            for j in range(0, len(l2), self.ew):
                le = l2[j]
                doff = le & OFFSET_MASK
                if le & COMPRESSED or not doff:
                    continue
                try:
                    r = self.rc.get(doff >> self.cb)
                except OSError:
                    continue
                if (r == 1) != bool(le & COPIED):
                    res.corruptions += 1
                    self.msg(f"{word} OFLAG_COPIED data cluster: l2_entry={le:x} "
                             f"refcount={r}")
                    if repair:
                        l2[j] = (le | COPIED) if r == 1 else (le & ~COPIED)
                        dirty += 1
            if dirty:
                l2.byteswap()
                self.f.pwrite(l2.tobytes(), off)
                res.corruptions -= dirty
                res.corruptions_fixed += dirty


def discard(fd: int, off: int, length: int) -> None:
    """Punch the range out of the file (as QEMU's discard of a freed cluster); where the
    file system or device cannot, leave it."""
    try:
        fallocate(fd, _PUNCH_HOLE | _KEEP_SIZE, off, length)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


def _refcounts(f: ImageFile, h: Header) -> Refcounts:
    def set_table(off: int, clusters: int) -> None:
        f.pwrite(struct.pack(">QI", off, clusters), 48)

    return Refcounts(f, h.cluster_bits, h.refcount_order, h.refcount_table_offset,
                     h.refcount_table_clusters, set_table)


def _run(path: str, fd: int, fix_leaks: bool, fix_errors: bool) -> CheckResult:
    """qcow2_check_refcounts (and the clean marks of qcow2_co_check_locked)."""
    from vdisk.engine.qcow2.check_rebuild import rebuild_after_check
    from vdisk.engine.qcow2.open import read_header

    h = read_header(path, fd)
    f = ImageFile(fd, path)
    res = CheckResult()
    ck = Checker(f, h, _refcounts(f, h), res)
    res.total_clusters = ck.size_to_clusters(h.size)
    try:
        rebuild = ck.calculate(fix_errors)
        before = res.counts()
        rebuild = ck.compare(False, False) or rebuild
        if rebuild and fix_errors:
            rebuild_after_check(ck, fix_leaks)
            ck.rc = _refcounts(f, h)  # the header now names the new table
        elif fix_leaks or fix_errors:
            if rebuild:
                res.messages.append("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise CheckFailed(os.strerror(5))
            if res.leaks or res.corruptions:
                res.set_counts(before)
                ck.compare(fix_leaks, fix_errors)
        ck.oflag_copied(fix_leaks, fix_errors)
        res.image_end_offset = (ck.highest + 1) * ck.cs
    except CheckFailed as e:
        res.failed = str(e)
        return res
    if (fix_leaks or fix_errors) and not res.check_errors and not res.corruptions:
        flags = h.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
        if h.version == 3 and flags:  # qcow2_mark_clean, qcow2_mark_consistent
            blocking.fdatasync(fd)
            f.pwrite(struct.pack(">Q", h.incompatible & ~flags), INCOMPAT_OFFSET)
    return res


def check_qcow2(path: str, repair: str | None = None, *,
                force_share: bool = False) -> CheckResult:
    """Check (and with repair='leaks' or 'all', repair) a qcow2 image like qemu-img check.

    With repair, an image that was repaired is checked again (the result is the second
    check's, with the first one's fixed counts and both passes' messages). force_share
    checks without taking locks (qemu-img check -U); it cannot repair.
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
            if writable:
                blocking.fdatasync(fd)
            if writable and res.failed is None and (res.leaks_fixed or res.corruptions_fixed):
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
