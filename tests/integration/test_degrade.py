"""Graceful degradation: the corrupt bit (QEMU's overlap check), ENOSPC, EIO from a backing
file, and a header rewrite on a full file system. Oracles: qemu-img info/check/map/convert."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from tests.helpers.commands import guest_view, qemu_check, qemu_info, qemu_map, run
from tests.helpers.daemon import serving
from tests.helpers.faulty_fs import faulty_file, small_tmpfs
from vdisk.engine.chain import close_chain, open_chain
from vdisk.engine.qcow2 import open_qcow2

MiB = 1 << 20
COPIED = 1 << 63
MASK = 0x00FF_FFFF_FFFF_FE00


def u64(p: Path, off: int) -> int:
    with open(p, "rb") as f:
        f.seek(off)
        return int(struct.unpack(">Q", f.read(8))[0])


def put64(p: Path, off: int, v: int) -> None:
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">Q", v))


def region(p: Path, off: int, n: int) -> bytes:
    with open(p, "rb") as f:
        f.seek(off)
        return f.read(n).ljust(n, b"\0")  # a snapshot table may end the file mid-cluster


# -- the corrupt bit --------------------------------------------------------------------

CS = 4096  # small clusters: several L2 tables in an 8 MiB image


def _victim(tmp: Path, compat: str = "1.1", name: str = "victim", snap: bool = False
            ) -> tuple[Path, dict[str, int]]:
    """An image with data in L2 tables 0 and 1, and where its metadata lives (snapshot
    table and the snapshot's L1 table with snap)."""
    p = tmp / f"{name}.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS},compat={compat}",
        p, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", "-c", "write -P 8 4M 8k", p)
    if snap:
        run("qemu-img", "snapshot", "-c", "s1", p)
    l1 = u64(p, 40)
    rt = u64(p, 48)
    where = {"header": 0, "L1": l1, "reftable": rt, "refblock": u64(p, rt) & MASK,
             "L2": u64(p, l1) & MASK, "other L2": u64(p, l1 + 8 * (4 * MiB // (CS * CS // 8)))
             & MASK}
    if snap:
        where["snapshot table"] = u64(p, 64)
        where["inactive L1"] = u64(p, u64(p, 64))
    assert all(v % CS == 0 for v in where.values()) and where["other L2"]
    return p, where


NAMES = {"L1": "active L1 table", "reftable": "refcount table",
         "refblock": "refcount block", "other L2": "active L2 table",
         "snapshot table": "snapshot table", "inactive L1": "inactive L1 table"}


@pytest.mark.parametrize("target", list(NAMES))
@pytest.mark.parametrize("how", ["partial", "whole", "run"])
def test_write_onto_metadata_sets_corrupt_bit(tmp_path: Path, target: str, how: str) -> None:
    snap = "snapshot" in target or "inactive" in target
    p, where = _victim(tmp_path, snap=snap)
    # guest cluster 2 (8K..12K) now claims to live at the target, copied flag set
    put64(p, where["L2"] + 2 * 8, where[target] | COPIED)
    if how == "run":  # clusters 1..3 contiguous in the host around the target
        put64(p, where["L2"] + 1 * 8, (where[target] - CS) | COPIED)
        put64(p, where["L2"] + 3 * 8, (where[target] + CS) | COPIED)
    before = {k: region(p, v, CS) for k, v in where.items()}
    size = p.stat().st_size
    write = {"partial": (2 * CS + 100, b"x" * 300), "whole": (2 * CS, b"x" * CS),
             "run": (CS, b"x" * 3 * CS)}[how]
    with open_qcow2(str(p), read_only=False) as img:
        with pytest.raises(OSError) as ei:
            img.write(*write)
        msg = str(ei.value)
        assert ei.value.errno == errno.EIO and str(p) in msg and "overlaps with" in msg, msg
        if how != "run":
            assert NAMES[target] in msg, msg
        assert img.corrupt
        for op in (lambda: img.write(0, b"y" * 10), lambda: img.write(6 * MiB, b"y" * 10),
                   lambda: img.write_zeroes(0, CS)):
            with pytest.raises(OSError) as ei:
                op()
            assert ei.value.errno == errno.EIO
        assert img.read(0, CS) == b"\x07" * CS  # reads keep working
        assert img.read(4 * MiB, 8192) == b"\x08" * 8192
    assert qemu_info(p, "-U")["format-specific"]["data"]["corrupt"] is True
    after = {k: region(p, v, CS) for k, v in where.items()}
    for k in where:  # with a snapshot, the shared L2 table was copied (L1, refcounts)
        if k == "refblock":  # refcounts of new clusters past the old end may change
            n = 2 * (size // CS)
            assert snap or after[k][:n] == before[k][:n]
        elif k != "header" and not (snap and k == "L1"):
            assert after[k] == before[k], k
    # the header differs only in the incompatible features field (corrupt bit)
    assert after["header"][:72] == before["header"][:72]
    assert after["header"][80:] == before["header"][80:]
    assert snap or p.stat().st_size == size
    # vdisk refuses to open it for writing from now on; read-only works
    with pytest.raises(Exception, match="marked corrupt"):
        open_qcow2(str(p), read_only=False)
    with open_qcow2(str(p), read_only=True) as img:
        assert img.read(0, 100) == b"\x07" * 100


def test_other_corruptions_set_corrupt_bit(tmp_path: Path) -> None:
    p, where = _victim(tmp_path)
    l1_0 = u64(p, where["L1"])
    put64(p, where["L1"], l1_0 + 512)  # unaligned L2 table offset
    with open_qcow2(str(p), read_only=False) as img:
        with pytest.raises(OSError) as ei:
            img.read(0, 512)
        assert ei.value.errno == errno.EIO
        assert img.read(4 * MiB, 512) == b"\x08" * 512
        with pytest.raises(OSError):
            img.write(4 * MiB, b"z")
    assert qemu_info(p, "-U")["format-specific"]["data"]["corrupt"] is True

    # no refcount block for the first clusters: one would be created over the header
    p, where = _victim(tmp_path, name="victim3")
    put64(p, where["reftable"], 0)
    with open_qcow2(str(p), read_only=False) as img:
        with pytest.raises(OSError) as ei:
            img.write(6 * MiB, b"n" * CS)
        assert ei.value.errno == errno.EIO and "overlaps with header" in str(ei.value)
    assert qemu_info(p, "-U")["format-specific"]["data"]["corrupt"] is True

    p, where = _victim(tmp_path, name="victim2")
    # refcount of data cluster (guest 0) set to 0: freeing it is a refcount underflow
    data0 = u64(p, where["L2"]) & MASK
    with open(p, "r+b") as f:
        f.seek(where["refblock"] + (data0 // CS) * 2)
        f.write(b"\0\0")
    with open_qcow2(str(p), read_only=False) as img:
        img.write_zeroes(0, CS, unmap=True)
        with pytest.raises(OSError) as ei:
            img.flush()
        assert ei.value.errno == errno.EIO and "refcount" in str(ei.value)
        assert img.corrupt
    assert qemu_info(p, "-U")["format-specific"]["data"]["corrupt"] is True


def test_v2_corruption_is_in_memory(tmp_path: Path) -> None:
    p, where = _victim(tmp_path, compat="0.10")
    put64(p, where["L2"] + 16, where["L1"] | COPIED)
    whole = p.read_bytes()
    with open_qcow2(str(p), read_only=False) as img:
        with pytest.raises(OSError) as ei:
            img.write(2 * CS, b"x" * CS)
        assert ei.value.errno == errno.EIO
        with pytest.raises(OSError):
            img.write(0, b"y")
        assert img.read(0, CS) == b"\x07" * CS
    assert p.read_bytes() == whole  # v2 has no corrupt bit: nothing at all was written


def test_corrupt_through_fuse(tmp_path: Path) -> None:
    p, where = _victim(tmp_path)
    put64(p, where["L2"] + 2 * 8, where["L1"] | COPIED)
    l1_before = region(p, where["L1"], CS)
    with serving(tmp_path, f"id=d0,file={p},copy-on-read=off") as srv:
        fd = os.open(srv.path("d0"), os.O_RDWR)
        try:
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"x" * CS, 2 * CS)
            assert ei.value.errno == errno.EIO
            for off in (0, 6 * MiB):
                with pytest.raises(OSError) as ei:
                    os.pwrite(fd, b"y" * CS, off)
                assert ei.value.errno in (errno.EIO, errno.EROFS)
            assert os.pread(fd, CS, 0) == b"\x07" * CS
            assert os.pread(fd, 8192, 4 * MiB) == b"\x08" * 8192
        finally:
            os.close(fd)
        assert srv.stop() == 0, srv.stderr
    assert "corrupt" in srv.stderr
    assert qemu_info(p, "-U")["format-specific"]["data"]["corrupt"] is True
    assert region(p, where["L1"], CS) == l1_before


# -- ENOSPC -------------------------------------------------------------------------------

def fill(dirpath: Path) -> Path:
    """Fill the file system with one file until ENOSPC."""
    filler = dirpath / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    chunk = b"\xee" * 65536
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
        while True:  # the last pages
            try:
                if os.write(fd, b"\xee" * 4096) <= 0:
                    break
            except OSError:
                break
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
@pytest.mark.root
def test_enospc_through_fuse(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "32M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 20M", base)
    with small_tmpfs(tmp_path / "small") as small:
        top = small / "top.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "32M")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 128k", top)
        want = bytearray(guest_view(top, tmp_path))
        filler = fill(small)
        with serving(tmp_path, f"id=d0,file={top},copy-on-read=on") as srv:
            fd = os.open(srv.path("d0"), os.O_RDWR)
            try:
                with pytest.raises(OSError) as ei:  # needs new clusters
                    os.pwrite(fd, b"\x33" * 65536, 8 * MiB)
                assert ei.value.errno == errno.ENOSPC
                with pytest.raises(OSError) as ei:  # a partial cluster (COW from backing)
                    os.pwrite(fd, b"\x33" * 512, 3 * MiB + 512)
                assert ei.value.errno == errno.ENOSPC
                # in-place overwrites need no space and keep working
                assert os.pwrite(fd, b"\x44" * 4096, MiB + 4096) == 4096
                want[MiB + 4096:MiB + 8192] = b"\x44" * 4096
                # reads of everything keep working (copy-on-read fails, the read does not)
                got = b"".join(os.pread(fd, 4 * MiB, o) for o in range(0, 32 * MiB, 4 * MiB))
                assert got == bytes(want)
                filler.unlink()  # space again: writes work again
                assert os.pwrite(fd, b"\x33" * 65536, 8 * MiB) == 65536
                want[8 * MiB:8 * MiB + 65536] = b"\x33" * 65536
                os.fsync(fd)
                assert os.pread(fd, 65536, 8 * MiB) == b"\x33" * 65536
            finally:
                os.close(fd)
            assert srv.stop() == 0, srv.stderr
        assert "copy-on-read failed" in srv.stderr and "No space" in srv.stderr
        rc, out = qemu_check(top, "-U")
        assert rc == 0, out
        assert guest_view(top, tmp_path) == bytes(want)


@pytest.mark.root
def test_enospc_driver_leaves_no_leak(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small") as small:
        top = small / "t.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", top, "64M")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 5 0 64k", top)
        fill(small)
        with open_qcow2(str(top), read_only=False) as img:
            for off in (MiB, 40 * MiB, 2 * MiB + 100):
                with pytest.raises(OSError) as ei:
                    img.write(off, b"q" * 70000)
                assert ei.value.errno == errno.ENOSPC
            img.write(100, b"in place")
            assert img.read(0, 108) == b"\x05" * 100 + b"in place"
        rc, out = qemu_check(top, "-U")
        assert rc == 0, out


# -- header rewrite on a full file system -------------------------------------------------

def _with_big_extension(p: Path, nbytes: int) -> None:
    """Insert an unknown header extension of nbytes (QEMU keeps those) before the end."""
    with open(p, "r+b") as f:
        head = bytearray(f.read(65536))
        hl = struct.unpack_from(">I", head, 100)[0]
        pos = hl
        while True:
            t, n = struct.unpack_from(">II", head, pos)
            if t == 0:
                break
            pos += 8 + ((n + 7) & ~7)
        ext = struct.pack(">II", 0x7E57AB1E, nbytes) + b"\xab" * nbytes
        head[pos:pos + 8] = ext + struct.pack(">II", 0, 0)
        f.seek(0)
        f.write(head[:pos + len(ext) + 8])


@pytest.mark.root
def test_set_backing_on_full_fs(tmp_path: Path) -> None:
    (tmp_path / "b.raw").write_bytes(bytes(MiB))
    long_name = str(tmp_path / ("d" * 200) / ".." / "b.raw")
    (tmp_path / ("d" * 200)).mkdir()
    with small_tmpfs(tmp_path / "small") as small:
        img_path = small / "t.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", img_path, "4M")
        _with_big_extension(img_path, 3300)
        run("qemu-img", "rebase", "-u", "-b", tmp_path / "b.raw", "-F", "raw", img_path)
        assert region(img_path, 0, 65536).count(b"\xab" * 3300) == 1  # QEMU kept it
        assert u64(img_path, 8) + u64(img_path, 16) // (1 << 32) < 4096
        run("qemu-io", "-f", "qcow2", "-c", "write -P 6 0 64k", img_path)
        # cluster 0 beyond the first page is a hole: a longer header needs a new page
        run("fallocate", "-p", "-o", "4096", "-l", str(65536 - 4096), img_path)
        filler = fill(small)
        before = img_path.read_bytes()
        img = open_qcow2(str(img_path), read_only=False)
        try:
            with pytest.raises(OSError) as ei:
                img.set_backing(long_name, "raw")
            assert ei.value.errno == errno.ENOSPC
            assert img_path.read_bytes() == before  # not a byte changed
            assert img.backing_name == str(tmp_path / "b.raw")
            img.set_backing(str(tmp_path / "b.raw"), "raw")  # fits in the first page: fine
            filler.unlink()
            img.set_backing(long_name, "raw")
            assert img.read(0, 10) == b"\x06" * 10
        finally:
            img.close()
        info = qemu_info(img_path, "-U")
        assert info["backing-filename"] == long_name
        rc, out = qemu_check(img_path, "-U")
        assert rc == 0, out
        assert os.path.getsize(img_path) == len(before)


# -- EIO from a backing file --------------------------------------------------------------



def allocated(p: Path) -> set[int]:
    """64 KiB clusters the top itself holds, per qemu-img map."""
    return {o for m in qemu_map(p, "-U") if m["depth"] == 0 and m["data"]
            for o in range(m["start"], m["start"] + m["length"], 65536)}


@pytest.mark.slow
def test_backing_eio(tmp_path: Path) -> None:
    src = tmp_path / "base.raw"
    base = os.urandom(8 * MiB)
    src.write_bytes(base)
    bad = (3 * MiB + 4096, 3 * MiB + 8192)
    with faulty_file(tmp_path, src, bad) as disk:
        top = tmp_path / "top.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", disk, "-F", "raw", top, "8M")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 64k", top)
        want = bytearray(base)
        want[:65536] = b"\x77" * 65536
        img = open_chain(str(top))
        try:
            assert img.read(0, MiB) == want[:MiB]
            assert img.read(5 * MiB, MiB) == want[5 * MiB:6 * MiB]
            assert img.read(3 * MiB, 4096) == want[3 * MiB:3 * MiB + 4096]
            for off, n in ((3 * MiB, 65536), (bad[0] + 100, 10)):
                with pytest.raises(OSError) as ei:
                    img.read(off, n)
                assert ei.value.errno == errno.EIO
            with pytest.raises(OSError) as ei:  # COW of the cluster needs the bad range
                img.write(3 * MiB, b"w" * 512)
            assert ei.value.errno == errno.EIO
            img.write(3 * MiB, b"W" * 65536)  # a whole cluster needs no backing data
            want[3 * MiB:3 * MiB + 65536] = b"W" * 65536
            assert img.read(3 * MiB, 65536) == b"W" * 65536
        finally:
            close_chain(img)
        rc, out = qemu_check(top, "-U")
        assert rc == 0, out
        assert allocated(top) == {0, 3 * MiB}

        # through the daemon with copy-on-read: only the bad range fails
        top2 = tmp_path / "top2.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", disk, "-F", "raw", top2, "8M")
        with serving(tmp_path, f"id=d0,file={top2},copy-on-read=on", name="s2") as srv:
            with open(srv.path("d0"), "rb", buffering=0) as f:
                assert os.pread(f.fileno(), MiB, MiB) == base[MiB:2 * MiB]
                with pytest.raises(OSError) as ei:
                    os.pread(f.fileno(), 4096, bad[0])
                assert ei.value.errno == errno.EIO
                try:  # the page before the bad one may come back alone (a short read)
                    got = os.pread(f.fileno(), 65536, 3 * MiB)
                    assert got == base[3 * MiB:3 * MiB + len(got)] and len(got) <= 4096
                except OSError as e:
                    assert e.errno == errno.EIO
                assert os.pread(f.fileno(), MiB, 6 * MiB) == base[6 * MiB:7 * MiB]
            assert srv.stop() == 0, srv.stderr
        rc, out = qemu_check(top2, "-U")
        assert rc == 0, out
        covered = allocated(top2)
        assert MiB in covered and 6 * MiB in covered  # copied up
        assert 3 * MiB not in covered  # the failed copy-on-read left the top alone
        Path(str(src) + ".ok").touch()
        assert guest_view(top2, tmp_path) == base
