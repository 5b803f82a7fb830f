"""`vdisk info` prints what `qemu-img info` prints, byte for byte, text and JSON: the
snapshot list, the bitmaps under format-specific, the key order, with --backing-chain and
for raw images. Snapshots come from `qemu-img snapshot -c`; the values qemu-img cannot
set (VM state size, guest clock, icount, dates, shorter extra data) are then written into
the snapshot table as docs/interop/qcow2.rst lays it out, and qemu-img reads them back.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.commands import qemu_img, qemu_io, vdisk_cmd

ENTRY = struct.Struct(">QIHHIIQII")  # l1 offset, l1 size, id len, name len, date s, date ns,
#                                     clock ns, vm state (32 bit), extra size
NO_ICOUNT = (1 << 64) - 1


def same_output(*args: str | Path, cwd: Path, tz: str = "UTC") -> str:
    """`vdisk info ARGS` and `qemu-img info ARGS` print the same bytes; that output."""
    env = {"TZ": tz, "PATH": "/usr/bin:/bin"}
    theirs = subprocess.run(["qemu-img", "info", *map(str, args)], capture_output=True,
                            cwd=cwd, env=env, check=True, timeout=60)
    ours = subprocess.run(vdisk_cmd("info", *args), capture_output=True, cwd=cwd, env=env,
                          timeout=60)
    assert ours.returncode == 0, ours.stderr.decode()
    assert ours.stdout == theirs.stdout
    return theirs.stdout.decode("utf-8", "replace")


def both_outputs(name: str, cwd: Path, *extra: str, tz: str = "UTC") -> tuple[str, str]:
    human = same_output(*extra, name, cwd=cwd, tz=tz)
    js = same_output("--output=json", *extra, name, cwd=cwd, tz=tz)
    return human, js


@dataclass
class Entry:
    """One snapshot table entry, as qcow2.rst lays it out."""

    head: list[int]
    extra: bytes
    ident: bytes
    name: bytes

    def pack(self) -> bytes:
        h = list(self.head)
        h[2], h[3], h[8] = len(self.ident), len(self.name), len(self.extra)
        raw = ENTRY.pack(*h) + self.extra + self.ident + self.name
        return raw + bytes(-len(raw) % 8)


def edit_snapshots(path: Path, edit: Callable[[list[Entry]], None]) -> None:
    """Rewrite the snapshot table in place (within the clusters it has: 64 KiB ones)."""
    with path.open("r+b") as f:
        hdr = f.read(72)
        count, table = struct.unpack_from(">IQ", hdr, 60)
        f.seek(table)
        entries, size = [], 0
        for _ in range(count):
            head = list(ENTRY.unpack(f.read(ENTRY.size)))
            extra = f.read(head[8])
            ident, name = f.read(head[2]), f.read(head[3])
            e = Entry(head, extra, ident, name)
            size += len(e.pack())
            f.seek(table + size)
            entries.append(e)
        edit(entries)
        raw = b"".join(e.pack() for e in entries)
        assert table + len(raw) <= -(-(table + size) // 65536) * 65536  # its clusters
        f.seek(table)
        f.write(raw)


def set_values(e: Entry, *, vm_state: int, clock: int, date: tuple[int, int],
               icount: int | None, extra_len: int = 24) -> None:
    """Give entry e these values; extra_len 0, 8, 16 or 24 bytes of extra data."""
    e.head[4], e.head[5], e.head[6] = date[0], date[1], clock
    e.head[7] = vm_state & 0xFFFF_FFFF if extra_len < 8 else 0
    extra = struct.pack(">QQQ", vm_state, 64 << 20, NO_ICOUNT if icount is None else icount)
    e.extra = extra[:extra_len]


def snapshots_image(path: Path, names: list[str], *args: str) -> None:
    qemu_img("create", "-f", "qcow2", *args, path, "64M")
    qemu_io(path, "write -P 7 0 128k")
    for n in names:
        qemu_img("snapshot", "-c", n, path)


@pytest.mark.slow
def test_snapshot_list_values(tmp_path: Path) -> None:
    """Several snapshots with VM state sizes from 0 to beyond 2^63, guest clocks from 0
    to over 99 hours and to 2^64 - 1, dates, icount present or not, 0/8/16/24 bytes of
    extra data (the 32-bit VM state size when there is no 64-bit one), a name longer than
    its column, UTF-8 names, an image of compat 0.10; in two time zones."""
    img = tmp_path / "snaps.qcow2"
    snapshots_image(img, ["s0", "state", "a much longer tag than the column",
                          "été ☃", "clock", "old", "huge"])

    def edit(es: list[Entry]) -> None:
        set_values(es[0], vm_state=0, clock=0, date=(0, 0), icount=0)
        set_values(es[1], vm_state=1536, clock=1_500_000_000, date=(1_700_000_000, 999_999_999),
                   icount=None)
        set_values(es[2], vm_state=5 << 30, clock=(3 * 3600 + 25 * 60 + 7) * 10**9 + 89_000_000,
                   date=(951_782_400, 1), icount=123_456_789_012)
        set_values(es[3], vm_state=1023, clock=123 * 3600 * 10**9, date=(2**31 - 1, 5),
                   icount=1, extra_len=16)
        set_values(es[4], vm_state=0xFFFF_FFFF, clock=10**19 + 7, date=(2**32 - 1, 0),
                   icount=None, extra_len=0)
        set_values(es[5], vm_state=4096, clock=59_999_999_999, date=(86_399, 0),
                   icount=None, extra_len=8)
        set_values(es[6], vm_state=2**64 - 1, clock=2**64 - 1, date=(1, 0),
                   icount=2**64 - 2)

    edit_snapshots(img, edit)
    for tz in ("UTC", "Asia/Kolkata", "America/St_Johns"):
        human, js = both_outputs(img.name, tmp_path, tz=tz)
    assert "Snapshot list:" in human and "123:00:00.000" in human
    assert js.count('"vm-state-size"') == 7 and js.count('"icount"') == 3

    v2 = tmp_path / "v2.qcow2"
    snapshots_image(v2, ["one", "two"], "-o", "compat=0.10")
    both_outputs(v2.name, tmp_path)


def test_bitmaps_listed(tmp_path: Path) -> None:
    """Bitmaps with the auto flag, none (disabled), the in-use flag (left by a program that
    did not close the image), granularities from 512 B to 2 GiB, and UTF-8 names; none
    once the bitmaps autoclear bit is off."""
    img = tmp_path / "bm.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1G")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", "--disable", "-g", "512", img, "disabled")
    qemu_img("bitmap", "--add", "-g", str(2 << 30), img, "ünïcode")
    qemu_img("bitmap", "--add", "-g", "131072", img, "in-use")
    human, js = both_outputs(img.name, tmp_path)
    assert "[0]: auto" in human and '"granularity": 512' in js

    set_in_use(img, "in-use")
    human, js = both_outputs(img.name, tmp_path)
    assert '"in-use"' in js

    with img.open("r+b") as f:  # autoclear bit 0 off: an old program wrote the image
        f.seek(88)
        bits = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", bits & ~1))
    human, js = both_outputs(img.name, tmp_path)
    assert '"bitmaps"' not in js


def set_in_use(path: Path, name: str) -> None:
    """Set the in_use flag of bitmap `name` in the directory (as a crash would leave it)."""
    data = bytearray(path.read_bytes())
    length = struct.unpack_from(">I", data, 100)[0]  # v3 header length
    pos = length
    while True:
        kind, size = struct.unpack_from(">II", data, pos)
        assert kind, "no bitmaps extension"
        if kind == 0x23852875:
            _, _, dsize, doff = struct.unpack_from(">IIQQ", data, pos + 8)
            break
        pos += 8 + ((size + 7) & ~7)
    at = doff
    while at < doff + dsize:
        nlen, extra = struct.unpack_from(">HI", data, at + 18)
        if data[at + 24:at + 24 + nlen].decode() == name:
            struct.pack_into(">I", data, at + 12, struct.unpack_from(">I", data, at + 12)[0] | 1)
            path.write_bytes(bytes(data))
            return
        at += (24 + nlen + extra + 7) & ~7
    raise AssertionError(f"no bitmap {name}")


@pytest.mark.slow
def test_backing_chain_and_raw(tmp_path: Path) -> None:
    """--backing-chain over raw <- qcow2 with snapshots and bitmaps <- qcow2 <- qcow2 in a
    subdirectory with a UTF-8 name; and the raw image alone."""
    base = tmp_path / "base.raw"
    qemu_img("create", "-f", "raw", base, "64M")
    qemu_io(base, "write -P 1 0 1M", fmt="raw")
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "raw", mid)
    qemu_img("snapshot", "-c", "first", mid)
    qemu_img("snapshot", "-c", "second", mid)
    qemu_img("bitmap", "--add", mid, "b0")
    (tmp_path / "sub").mkdir()
    top = tmp_path / "sub" / "tôp.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "../mid.qcow2", "-F", "qcow2", top)
    over = tmp_path / "over.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "sub/tôp.qcow2", "-F", "qcow2", over)
    for name in (over.name, "sub/tôp.qcow2", mid.name, base.name):
        both_outputs(name, tmp_path, "--backing-chain")
        both_outputs(name, tmp_path)
    both_outputs(base.name, tmp_path, "-f", "raw")


def test_snapshot_names_as_qemu_cuts_them(tmp_path: Path) -> None:
    """QEMU lists at most 127 bytes of an id and 255 of a name, each up to a NUL byte; a
    cut inside a UTF-8 sequence shows as U+FFFD in JSON and as the bytes in the table."""
    img = tmp_path / "names.qcow2"
    snapshots_image(img, ["a", "b", "c"])

    def edit(es: list[Entry]) -> None:
        es[0].name = "é".encode() * 200
        es[0].ident = b"7" * 200
        es[1].name = b"ab\0cd"
        es[2].name = b"x" * 254 + "☃".encode()

    edit_snapshots(img, edit)
    human, js = both_outputs(img.name, tmp_path)
    assert "\\uFFFD" in js and "ab " in human


def test_bad_snapshot_table(tmp_path: Path) -> None:
    """A snapshot entry with more than 1 KiB of extra data: qemu-img refuses the image,
    vdisk info too, in one line naming it."""
    img = tmp_path / "bad.qcow2"
    snapshots_image(img, ["a"])

    def edit(es: list[Entry]) -> None:
        es[0].extra = bytes(1032)

    edit_snapshots(img, edit)
    assert subprocess.run(["qemu-img", "info", img], capture_output=True).returncode != 0
    res = subprocess.run(vdisk_cmd("info", img), capture_output=True, text=True)
    assert res.returncode != 0 and not res.stdout
    assert res.stderr.count("\n") == 1 and str(img) in res.stderr, res.stderr
