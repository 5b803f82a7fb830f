"""Image fuzzing: qemu-img-made images (v2/v3, 512 B..64 KiB clusters, zlib and zstd
compressed clusters, snapshots, extended L2, backing files) with targeted and seeded random
damage to every metadata structure.

For each damaged image: open either refuses with an ImageError naming the file (and the
file is not modified), or works, and then every read returns data or fails with EIO, and
writes fail with an OSError or succeed without overwriting metadata (header, L1 table,
refcount table, snapshot table, snapshot L1 tables): QEMU's overlap check and corrupt bit.
Each case runs in a worker process with an alarm (no hangs) and an address-space limit
(bounded memory)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.commands import qemu_io, run

pytestmark = pytest.mark.slow  # fuzzing: the soak tests

COPIED = 1 << 63
COMPRESSED = 1 << 62
MASK = 0x00FF_FFFF_FFFF_FE00
CASE_SECONDS = 10
MEMORY_LIMIT = 1 << 30  # address space per worker
READ_ALL_LIMIT = 16 << 20
WRITE_ERRNOS = {errno.EIO, errno.ENOSPC, errno.EFBIG, errno.EINVAL}


# -- the corpus -----------------------------------------------------------------------------

def build_corpus(d: Path) -> list[str]:
    """Images as qemu-img / qemu-io make them; backing files next to them."""
    run("qemu-img", "create", "-q", "-f", "raw", d / "base.raw", "2M")
    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", d / "base.raw")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=32768",
        d / "base.qcow2", "3M")
    qemu_io(d / "base.qcow2", "write -P 2 0 3M", fmt="qcow2")

    a = d / "v3-64k-zlib.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", a, "4M")
    qemu_io(a, "write -P 3 0 128k", "write -c -P 4 256k 64k", "write -c -P 5 320k 64k",
            "write -z 1M 64k", "write -P 6 1536k 100k", "write -P 7 3M 64k", fmt="qcow2")
    run("qemu-img", "snapshot", "-c", "snap1", a)
    qemu_io(a, "write -P 8 64k 64k", "write -c -P 9 2M 64k", fmt="qcow2")

    b = d / "v2-4k.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096",
        "-b", "base.raw", "-F", "raw", b, "2M")
    qemu_io(b, "write -P 10 0 64k", "write -c -P 11 64k 4k", "write -c -P 12 68k 4k",
            "write -P 13 1M 12k", fmt="qcow2")
    run("qemu-img", "snapshot", "-c", "s", b)
    qemu_io(b, "write -P 14 4k 4k", fmt="qcow2")

    c = d / "v3-extl2-32k-zstd.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o",
        "cluster_size=32768,extended_l2=on,compression_type=zstd", c, "4M")
    qemu_io(c, "write -P 15 0 4k", "write -P 16 8k 4k", "write -c -P 17 64k 32k",
            "write -z 128k 32k", "write -P 18 192k 96k", "write -z 200k 2k",
            "write -c -P 19 3M 32k", fmt="qcow2")

    e = d / "v3-512-rc8.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=8",
        e, "1M")
    qemu_io(e, "write -P 20 0 40k", "write -c -P 21 64k 512", "write -c -P 22 80k 512",
            "write -z 100k 2k", "write -P 23 700k 3k", fmt="qcow2")
    run("qemu-img", "snapshot", "-c", "x", e)
    return [a.name, b.name, c.name, e.name]


# -- a small independent parser, to aim the damage -------------------------------------------

@dataclass
class Layout:
    data: bytes
    version: int
    cs: int
    size: int
    l1_off: int
    l1_size: int
    rt_off: int
    rt_clusters: int
    snap_off: int
    nsnap: int
    hlen: int
    ext_l2: bool
    l2s: list[int] = field(default_factory=list)
    entries: list[tuple[int, int, int]] = field(default_factory=list)  # (pos, value, guest)
    refblocks: list[int] = field(default_factory=list)
    snaps: list[int] = field(default_factory=list)  # positions of snapshot entries
    snap_l1s: list[int] = field(default_factory=list)
    exts: list[tuple[int, int, int]] = field(default_factory=list)  # (pos, type, len)


def u32(b: bytes, o: int) -> int:
    return int(struct.unpack_from(">I", b, o)[0]) if o + 4 <= len(b) else 0


def u64(b: bytes, o: int) -> int:
    return int(struct.unpack_from(">Q", b, o)[0]) if o + 8 <= len(b) else 0


def parse(data: bytes, deep: bool = True) -> Layout:
    ver = u32(data, 4)
    L = Layout(data, ver, 1 << u32(data, 20), u64(data, 24), u64(data, 40), u32(data, 36),
               u64(data, 48), u32(data, 56), u64(data, 64), u32(data, 60),
               u32(data, 100) if ver == 3 else 72, ver == 3 and bool(u64(data, 72) & 16))
    cs, ew = L.cs, (2 if L.ext_l2 else 1)
    per = cs // 8 // ew
    for i in range(L.l1_size if deep else 0):
        l2 = u64(data, L.l1_off + 8 * i) & MASK
        if not l2:
            continue
        L.l2s.append(l2)
        for j in range(per):
            pos = l2 + j * 8 * ew
            v = u64(data, pos)
            if v or (ew == 2 and u64(data, pos + 8)):
                L.entries.append((pos, v, (i * per + j) * cs))
    for i in range(L.rt_clusters * cs // 8 if deep else 0):
        rb = u64(data, L.rt_off + 8 * i) & MASK
        if rb:
            L.refblocks.append(rb)
    pos = L.snap_off
    for _ in range(L.nsnap):
        L.snaps.append(pos)
        L.snap_l1s.append(u64(data, pos))
        pos = (pos + 40 + u32(data, pos + 36) + (u32(data, pos + 12) >> 16)
               + (u32(data, pos + 12) & 0xFFFF) + 7) & ~7
    pos = L.hlen
    while pos + 8 <= cs:
        t, n = u32(data, pos), u32(data, pos + 4)
        L.exts.append((pos, t, n))
        if t == 0:
            break
        pos += 8 + ((n + 7) & ~7)
    return L


# -- cases ----------------------------------------------------------------------------------

@dataclass
class Case:
    image: str
    what: str
    patches: list[tuple[int, bytes]]
    truncate: int | None = None
    guest: list[int] = field(default_factory=list)  # guest offsets worth writing to
    seed: int = 0


def targeted(name: str, L: Layout) -> list[Case]:
    cs, fsize = L.cs, len(L.data)
    eof = (fsize + cs - 1) // cs * cs
    where = {"header": 0, "L1": L.l1_off, "reftable": L.rt_off, "refblock": L.refblocks[0],
             "L2": L.l2s[0], "last L2": L.l2s[-1], "eof": eof, "far": 1 << 50,
             "last cluster": eof - cs}
    if L.nsnap:
        where["snapshot table"] = L.snap_off & ~(cs - 1)
        where["snapshot L1"] = L.snap_l1s[0]
    out: list[Case] = []

    def q(v: int) -> bytes:
        return struct.pack(">Q", v & (2**64 - 1))

    def add(what: str, patches: list[tuple[int, bytes]], guest: list[int] | None = None,
            trunc: int | None = None) -> None:
        out.append(Case(name, what, patches, trunc, guest or []))

    fields = [("backing_file_offset", 8, 8), ("backing_file_size", 16, 4),
              ("cluster_bits", 20, 4), ("size", 24, 8), ("crypt", 32, 4),
              ("l1_size", 36, 4), ("l1_offset", 40, 8), ("reftable_offset", 48, 8),
              ("reftable_clusters", 56, 4), ("nb_snapshots", 60, 4),
              ("snapshots_offset", 64, 8)]
    if L.version == 3:
        fields += [("incompatible", 72, 8), ("compatible", 80, 8), ("autoclear", 88, 8),
                   ("refcount_order", 96, 4), ("header_length", 100, 4)]
    for fname, off, width in fields:
        orig = int.from_bytes(L.data[off:off + width], "big")
        vals = {0, 1, 2**(8 * width) - 1, 2**(8 * width - 1), orig + 1, orig - 1, orig * 2,
                orig + 8, orig + cs, fsize, fsize - 8, cs, eof, L.l1_off, L.rt_off,
                L.l2s[0], L.refblocks[0], orig | 2, orig ^ (1 << 4), 1 << 40}
        for v in sorted(vals):
            if 0 <= v < 2**(8 * width) and v != orig:
                add(f"header {fname}={v:#x}", [(off, v.to_bytes(width, "big"))])
    if L.version == 3 and L.hlen > 104:
        for v in (1, 2, 255):
            add(f"compression type {v}", [(104, bytes([v]))])

    ptr_targets = list(where.items())
    # L1 entries: the first, the last used, one unused
    used = [i for i in range(L.l1_size) if u64(L.data, L.l1_off + 8 * i) & MASK]
    l2_span = (cs // 8 // (2 if L.ext_l2 else 1)) * cs
    for i in sorted({used[0], used[-1], L.l1_size - 1}):
        pos = L.l1_off + 8 * i
        orig = u64(L.data, pos)
        g = [i * l2_span, i * l2_span + cs + 5]
        for tname, t in ptr_targets:
            add(f"L1[{i}] -> {tname}", [(pos, q(t | COPIED))], g)
        for what, v in (("unaligned", orig + 512), ("unaligned8", (orig & MASK) + 8),
                        ("reserved bits", orig | 0x7F00_0000_0000_0001),
                        ("no COPIED", orig & ~COPIED), ("all ones", 2**64 - 1),
                        ("zero", 0)):
            add(f"L1[{i}] {what}", [(pos, q(v))], g)
    # L2 entries: some of each kind
    data_e = [e for e in L.entries if not e[1] & COMPRESSED and e[1] & MASK][:3]
    comp_e = [e for e in L.entries if e[1] & COMPRESSED][:2]
    zero_e = [e for e in L.entries if not e[1] & COMPRESSED and not e[1] & MASK][:1]
    for pos, orig, guest in data_e + comp_e + zero_e:
        g = [guest, guest + min(100, cs // 2), guest - cs, guest + cs]
        for tname, t in ptr_targets:
            add(f"L2@{pos:#x} -> {tname}", [(pos, q(t | COPIED))], g)
        for what, v in (("unaligned", (orig & MASK) + 512), ("zero flag unaligned",
                        (orig & MASK) + 512 | 1), ("compressed bit", orig | COMPRESSED),
                        ("no COPIED", orig & ~COPIED), ("all ones", 2**64 - 1),
                        ("reserved", orig | 0x3E), ("dup of first", data_e[0][1])):
            add(f"L2@{pos:#x} {what}", [(pos, q(v))], g)
        if L.ext_l2:
            for what, bm in (("alloc&zero", 0x0000_0001_0000_0001), ("all alloc", 0xFFFFFFFF),
                             ("all zero", 0xFFFFFFFF << 32), ("garbage", 0xDEADBEEF12345678)):
                add(f"L2@{pos:#x} bitmap {what}", [(pos + 8, q(bm))], g)
    # compressed descriptors: offsets and sector counts
    x = 62 - (L.cs.bit_length() - 1 - 8)
    for pos, orig, guest in comp_e:
        off = orig & ((1 << x) - 1)
        nmax = (1 << (L.cs.bit_length() - 1 - 8)) - 1
        g = [guest, guest + 1]
        for what, v in (("past eof", COMPRESSED | (fsize + 4096)),
                        ("at eof-10", COMPRESSED | (fsize - 10)),
                        ("into header", COMPRESSED | 16),
                        ("into L1", COMPRESSED | L.l1_off),
                        ("max sectors", orig | (nmax << x)),
                        ("one sector", COMPRESSED | off),
                        ("huge offset", COMPRESSED | ((1 << x) - 1)),
                        ("copied", orig | COPIED)):
            add(f"compressed@{pos:#x} {what}", [(pos, q(v))], g)
    # refcount table and blocks
    for i in range(min(2, len(L.refblocks))):
        pos = L.rt_off + 8 * i
        for tname, t in ptr_targets:
            add(f"reftable[{i}] -> {tname}", [(pos, q(t))], [0, L.size - 512])
        for what, v in (("zero", 0), ("unaligned", L.refblocks[i] + 8)):
            add(f"reftable[{i}] {what}", [(pos, q(v))], [0, L.size // 2])
    rbits = 1 << u32(L.data, 96) if L.version == 3 else 16
    rb = L.refblocks[0]
    for tname in ("header", "L1", "reftable", "refblock", "L2", "last cluster"):
        c = where[tname] // cs
        if c * rbits // 8 >= cs:
            continue
        for v in (0, (1 << rbits) - 1):
            bpos = rb + c * rbits // 8
            if rbits >= 8:
                patch = v.to_bytes(rbits // 8, "big")
            else:
                patch = bytes([0 if v == 0 else 0xFF])
            add(f"refcount({tname})={v}", [(bpos, patch)], [0, L.size // 2, L.size - 4096])
    # snapshot table
    for k, pos in enumerate(L.snaps[:1]):
        for what, off, val in (("l1 offset eof", 0, q(eof)), ("l1 offset unaligned", 0,
                               q(L.snap_l1s[k] + 8)), ("l1 offset header", 0, q(0)),
                               ("l1 offset active L1", 0, q(L.l1_off)),
                               ("l1 size huge", 8, b"\xff\xff\xff\xff"),
                               ("id len", 12, b"\xff\xff"), ("name len", 14, b"\xff\xff"),
                               ("extra len", 36, b"\xff\xff\xff\xff"),
                               ("extra len small", 36, b"\0\0\0\x08")):
            add(f"snapshot[{k}] {what}", [(pos + off, val)], [0, L.size // 2])
    # header extensions
    for pos, t, n in L.exts:
        for what, off, val in (("type unknown", 0, b"\x12\x34\x56\x78"),
                               ("type end", 0, b"\0\0\0\0"),
                               ("len huge", 4, b"\xff\xff\xff\xf0"), ("len odd", 4,
                               (n + 3).to_bytes(4, "big")), ("len zero", 4, bytes(4)),
                               ("type backing fmt", 0, b"\xe2\x79\x2a\xca"),
                               ("type data file", 0, b"\x44\x41\x54\x41")):
            add(f"ext@{pos:#x}(t={t:#x}) {what}", [(pos + off, val)])
    for t in (cs, cs + 100, fsize // 2, fsize - 1, L.l1_off + 4, 72):
        add(f"truncate {t}", [], [0, L.size // 2], trunc=t)
    return out


def random_cases(name: str, L: Layout, n: int, seed: int) -> list[Case]:
    rnd = random.Random(seed)
    cs = L.cs
    regions = [(0, min(cs, 4096)), (L.l1_off, max(8, L.l1_size * 8)),
               (L.rt_off, min(L.rt_clusters * cs, 4096))]
    regions += [(o, cs) for o in L.l2s + L.refblocks[:1]]
    if L.nsnap:
        regions.append((L.snap_off, min(cs, len(L.data) - L.snap_off)))
    # offsets worth pointing at: metadata, the end of file, an unaligned spot
    fsize = len(L.data)
    aims = [0, L.l1_off, L.rt_off, fsize, fsize - cs, (fsize + cs) & ~(cs - 1), 1 << 45,
            *L.l2s, *L.refblocks, *([L.snap_off] if L.nsnap else [])]
    out = []
    for k in range(n):
        patches = []
        for _ in range(rnd.randint(1, 6)):
            r = rnd.random()
            if r < 0.7:
                base, ln = rnd.choice(regions)
                pos = base + rnd.randrange(max(1, ln))
            else:
                pos = rnd.randrange(len(L.data))
            r = rnd.random()
            if r < 0.4:
                patches.append((pos, bytes([rnd.randrange(256)])))
            elif r < 0.7:
                pos &= ~7
                patches.append((pos, struct.pack(">Q", rnd.getrandbits(64))))
            else:  # an entry aimed somewhere interesting, maybe unaligned or flagged
                v = rnd.choice(aims) + rnd.choice([0, 0, 0, 8, 512, -cs])
                v |= rnd.choice([0, COPIED, COPIED, COMPRESSED, 1])
                patches.append((pos & ~7, struct.pack(">Q", v & (2**64 - 1))))
        guest = [rnd.randrange(0, max(1, L.size)) & ~511 for _ in range(3)]
        out.append(Case(name, f"random #{k}", patches, None, guest, seed * 1000 + k))
    return out


# -- one case, in a worker ----------------------------------------------------------------------

class Hang(BaseException):
    pass


class PastEOF(BaseException):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


def _init_worker() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    signal.signal(signal.SIGALRM, _alarm)
    import logging
    logging.disable(logging.CRITICAL)
    # guest data is only ever read from inside the file: catch any read past its end
    from vdisk.engine.qcow2.fileio import ImageFile

    plain = ImageFile.pread_into

    def checked(self: ImageFile, buf: memoryview, offset: int) -> None:
        if offset + len(buf) > os.fstat(self.fd).st_size:
            raise PastEOF(f"data read at {offset:#x}+{len(buf)} past the end of file")
        plain(self, buf, offset)

    ImageFile.pread_into = checked  # type: ignore[method-assign]


def _protected(data: bytes) -> list[tuple[str, int, int, int]]:
    """(name, offset, length, rule) of metadata a write must not change. Rules: 0 equal;
    1 L1/reftable entries: may change only from an entry without COPIED / from zero."""
    try:
        L = parse(data, deep=False)
    except (struct.error, ValueError, MemoryError, IndexError):
        return []
    out = []
    if L.l1_size * 8 <= 1 << 20:
        out.append(("L1 table", L.l1_off, L.l1_size * 8, 1))
    if L.rt_clusters * L.cs <= 1 << 20:
        out.append(("refcount table", L.rt_off, L.rt_clusters * L.cs, 2))
    if 0 < L.nsnap <= 64 and L.snaps:
        end = L.snap_off
        for pos in L.snaps:
            end = (pos + 40 + u32(data, pos + 36) + (u32(data, pos + 12) >> 16)
                   + (u32(data, pos + 12) & 0xFFFF) + 7) & ~7
        if end - L.snap_off <= 1 << 20:
            out.append(("snapshot table", L.snap_off, min(end, len(data)) - L.snap_off, 0))
        for k, pos in enumerate(L.snaps):
            off, n = u64(data, pos), u32(data, pos + 8)
            if off and not off % L.cs and n * 8 <= 1 << 20 and off + n * 8 <= len(data):
                out.append((f"snapshot {k} L1 table", off, n * 8, 0))
    return out


def _check_protected(before: bytes, after: bytes, regions: list[tuple[str, int, int, int]]
                     ) -> str | None:
    if u64(before, 88) == 0 or u32(before, 4) == 2:  # no autoclear rewrite of the header
        for a, b in ((0, 48), (60, 72)):
            if before[a:b] != after[a:b]:
                return f"header bytes {a}..{b} changed"
        if u32(before, 4) == 3:
            if (u64(before, 72) | 2) != (u64(after, 72) | 2):
                return "incompatible features changed beyond the corrupt bit"
            if before[80:104] != after[80:104]:
                return "header bytes 80..104 changed"
    moved = before[48:60] != after[48:60]
    for name, off, n, rule in regions:
        old, new = before[off:off + n], after[off:off + n]
        if old == new:
            continue
        if rule == 0:
            return f"{name} at {off:#x} was overwritten"
        if rule == 2 and moved:
            continue
        for i in range(0, min(len(old), len(new)) - 7, 8):
            o, w = u64(old, i), u64(new, i)
            if o != w and not (rule == 1 and not (o & COPIED and o & MASK)) \
                    and not (rule == 2 and o == 0):
                return f"{name} entry {i // 8} changed {o:#x} -> {w:#x}"
    return None


def run_case(corpus: str, case: Case) -> str | None:
    """None if the driver behaved, else what went wrong."""
    from vdisk.engine.chain import close_chain, open_chain
    from vdisk.errors import ImageError

    src = Path(corpus) / case.image
    path = Path(corpus) / f"case-{os.getpid()}.qcow2"
    data = bytearray(src.read_bytes())
    for pos, b in case.patches:
        if pos < len(data):
            data[pos:pos + len(b)] = b[:len(data) - pos]
    if case.truncate is not None:
        del data[case.truncate:]
    path.write_bytes(data)
    before = bytes(data)
    digest = hashlib.sha256(before).digest()
    rnd = random.Random(case.seed)
    signal.alarm(CASE_SECONDS)
    try:
        for ro in (False, True):
            try:
                img = open_chain(str(path), fmt="qcow2", read_only=ro)
            except ImageError as e:
                if str(path) not in str(e):
                    return f"open error does not name the file: {e}"
                if hashlib.sha256(path.read_bytes()).digest() != digest:
                    return "a refused image was modified"
                continue
            try:
                problem = _exercise(img, ro, case, rnd)
            finally:
                try:
                    close_chain(img)
                except OSError:
                    pass
            if problem:
                return problem
            if not ro:
                return _check_protected(before, path.read_bytes(), _protected(before))
            return None
        return None
    except Hang:
        return "hang (alarm)"
    except PastEOF as e:
        return str(e)
    except MemoryError:
        return "memory limit exceeded"
    except Exception as e:  # noqa: BLE001 - that is the finding
        return f"unexpected {type(e).__name__}: {e}"
    finally:
        signal.alarm(0)


def _exercise(img: Any, ro: bool, case: Case, rnd: random.Random) -> str | None:
    size = img.virtual_size
    chunk = max(65536, img.cluster_size)
    spots = list(range(0, min(size, READ_ALL_LIMIT), chunk))
    if size > READ_ALL_LIMIT:
        spots += [rnd.randrange(0, size) & ~511 for _ in range(16)] + [max(0, size - chunk)]
    for off in spots:
        n = min(chunk, size - off)
        if n <= 0:
            continue
        try:
            got = img.read(off, n)
            if len(got) != n:
                return f"short read at {off}"
        except OSError as e:
            if e.errno != errno.EIO:
                return f"read at {off}: errno {e.errno} ({e})"
        try:
            img.layer_status(off, n)
        except OSError as e:
            if e.errno != errno.EIO:
                return f"status at {off}: errno {e.errno} ({e})"
    if ro or size < 4096:
        return None
    cs = img.cluster_size
    writes: list[tuple[int, int]] = []
    for g in case.guest:
        if 0 <= g < size:
            writes += [(g, min(300, size - g)), (g // cs * cs, min(cs, size - g // cs * cs))]
    for _ in range(2):
        g = rnd.randrange(0, size) & ~511
        writes.append((g, min(size - g, rnd.choice([512, 4096, cs, 3 * cs]))))
    for k, (g, n) in enumerate(writes):
        try:
            if k % 5 == 4:
                img.write_zeroes(g, n, unmap=bool(k % 2))
            else:
                img.write(g, bytes([0xA0 + k % 16]) * n)
        except OSError as e:
            if e.errno not in WRITE_ERRNOS:
                return f"write at {g}+{n}: errno {e.errno} ({e})"
    try:
        img.flush()
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            return f"flush: errno {e.errno} ({e})"
    for g, n in writes[:2]:  # the written range still reads (or fails with EIO)
        try:
            img.read(g, n)
        except OSError as e:
            if e.errno != errno.EIO:
                return f"read back at {g}: errno {e.errno} ({e})"
    return None


# -- the test -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("fuzzcorpus")
    return d, build_corpus(d)


def _run_all(d: Path, cases: list[Case]) -> list[str]:
    ctx = get_context("spawn")
    failures = []
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx, initializer=_init_worker) as ex:
        for case, res in zip(cases, ex.map(run_case, [str(d)] * len(cases), cases,
                                           chunksize=16), strict=True):
            if res is not None:
                failures.append(f"{case.image}: {case.what}: {res}")
    return failures


def test_corpus_is_sane(corpus: tuple[Path, list[str]]) -> None:
    """The undamaged images pass every check (the harness itself finds nothing)."""
    d, names = corpus
    cases = [Case(n, "undamaged", [], None, [0, 65536]) for n in names]
    assert _run_all(d, cases) == []
    for n in names:
        L = parse((d / n).read_bytes())
        assert L.l2s and L.refblocks and L.entries
        assert any(v & COMPRESSED for _, v, _ in L.entries), n


def test_targeted_damage(corpus: tuple[Path, list[str]]) -> None:
    d, names = corpus
    cases = []
    for n in names:
        cases += targeted(n, parse((d / n).read_bytes()))
    assert len(cases) > 800
    failures = _run_all(d, cases)
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures[:30])


def test_random_damage(corpus: tuple[Path, list[str]]) -> None:
    d, names = corpus
    cases = []
    for k, n in enumerate(names):
        cases += random_cases(n, parse((d / n).read_bytes()), 200, 1234 + k)
    failures = _run_all(d, cases)
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures[:30])


def test_write_aimed_at_l1_marks_corrupt(corpus: tuple[Path, list[str]], tmp_path: Path
                                         ) -> None:
    """Each v3 corpus image, an allocated L2 entry aimed at the L1 table: the write fails
    with EIO, qemu-img sees the corrupt bit, and the L1 table is intact."""
    from vdisk.engine.qcow2 import open_qcow2

    d, names = corpus
    checked = 0
    for n in names:
        L = parse((d / n).read_bytes())
        if L.version != 3:
            continue
        p = tmp_path / n
        shutil.copy(d / n, p)
        owned = [e for e in L.entries if e[1] & COPIED and not e[1] & COMPRESSED]
        if not owned:  # everything is shared with a snapshot: writes copy, none in place
            continue
        pos, _, guest = owned[0]
        checked += 1
        with open(p, "r+b") as f:
            f.seek(pos)
            f.write(struct.pack(">Q", L.l1_off | COPIED))
        with open_qcow2(str(p), read_only=False) as img:
            with pytest.raises(OSError) as ei:
                img.write(guest, b"x" * L.cs)
            assert ei.value.errno == errno.EIO and "active L1 table" in str(ei.value)
            img.read(0, L.cs)
        res = subprocess.run(["qemu-img", "info", "--output=json", str(p)],
                             capture_output=True, text=True)
        assert '"corrupt": true' in res.stdout, res.stdout
        assert (p.read_bytes()[L.l1_off:L.l1_off + L.l1_size * 8]
                == L.data[L.l1_off:L.l1_off + L.l1_size * 8])
    assert checked >= 2
