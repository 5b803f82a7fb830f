"""Over FUSE, each chain reads exactly as `qemu-img convert -O raw` gives it; copy-on-read
(on by default) changes no content, and leaves every image `qemu-img check` clean."""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import pytest

from tests.helpers.chains import make_chain
from tests.helpers.commands import guest_view, qemu_img, qemu_io, qemu_map
from tests.helpers.daemon import is_mounted, serving

MiB = 1 << 20


def build_variants(tmp: Path) -> dict[str, Path]:
    """Tops of four chains: compressed base, 512 B clusters, short raw base, three layers."""
    tops: dict[str, Path] = {}
    # compressed clusters in the base (zlib), plain clusters over them
    d = tmp / "comp"
    d.mkdir()
    qemu_img("create", "-f", "raw", d / "src.raw", "6M")
    qemu_io(d / "src.raw", "write -P 0x61 0 1M", "write -P 0x62 2M 1536k",
            "write -P 0x63 5M 7k", fmt="raw")
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", d / "src.raw", d / "base.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2",
             cwd=d)
    qemu_io(d / "top.qcow2", "write -P 0x71 512k 100k", "write -z 2200k 64k")
    tops["comp"] = d / "top.qcow2"
    # 512-byte clusters under a 64 KiB-cluster top, unaligned writes in both
    d = tmp / "c512"
    d.mkdir()
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", d / "base.qcow2", "3M")
    qemu_io(d / "base.qcow2", "write -P 0x81 1000 70000", "write -P 0x82 1M 3000",
            "write -z 1025k 1k")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", "-b", "base.qcow2",
             "-F", "qcow2", d / "mid.qcow2", cwd=d)
    qemu_io(d / "mid.qcow2", "write -P 0x83 60000 5000")
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", d / "top.qcow2",
             cwd=d)
    qemu_io(d / "top.qcow2", "write -P 0x84 2M 4097")
    tops["c512"] = d / "top.qcow2"
    # raw base shorter than the top; three layers with zero clusters (chainutil's chain)
    d = tmp / "chain"
    d.mkdir()
    tops["chain"] = make_chain(d)["top"]
    d = tmp / "rawbase"
    d.mkdir()
    qemu_img("create", "-f", "raw", d / "base.raw", "1M")
    qemu_io(d / "base.raw", "write -P 0x91 4k 300k", fmt="raw")
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", d / "top.qcow2", "5M",
             cwd=d)
    qemu_io(d / "top.qcow2", "write -P 0x92 200k 8k")
    tops["rawbase"] = d / "top.qcow2"
    return tops


@pytest.mark.slow
def test_chains_read_as_qemu_img_convert(tmp_path: Path) -> None:
    tops = build_variants(tmp_path)
    expect = {name: guest_view(top, tmp_path) for name, top in tops.items()}
    drives = [f"id={name},file={top}" for name, top in tops.items()]
    with serving(tmp_path, *drives) as srv:
        assert sorted(os.listdir(srv.mount)) == sorted(tops)
        for name in tops:
            path = srv.path(name)
            assert path.stat().st_size == len(expect[name])
            # an unaligned chunked read first (copy-on-read of partial spans), then all
            with open(path, "rb", buffering=0) as f:
                got = b"".join(iter(lambda f=f: f.read(777_777), b""))
            assert got == expect[name], name
            assert path.read_bytes() == expect[name], name
        assert srv.stop() == 0
    for name, top in tops.items():
        qemu_img("check", top)
        assert guest_view(top, tmp_path) == expect[name], name


def _direct_read(path: Path, offset: int, length: int) -> bytes:
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    return bytes(buf[:n])


def _depth0(top: Path) -> list[tuple[int, int]]:
    """The ranges the top itself holds, adjacent runs merged."""
    runs: list[tuple[int, int]] = []
    for e in qemu_map(top, "-U"):
        if e["depth"] != 0:
            continue
        start, end = e["start"], e["start"] + e["length"]
        if runs and runs[-1][1] == start:
            start = runs.pop()[0]
        runs.append((start, end))
    return runs


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.slow
def test_copy_on_read_fills_top_and_off_leaves_it(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "8M")
    qemu_io(base, "write -P 0x55 0 8M")
    tops = []
    for name in ("on", "off", "ro"):
        top = tmp_path / f"{name}.qcow2"
        qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd=tmp_path)
        tops.append(top)
    on, off, ro = tops
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (off, ro)}
    maps = {p: qemu_map(p) for p in (off, ro)}
    drives = [f"id=on,file={on}", f"id=off,file={off},copy-on-read=off",
              f"id=ro,file={ro},read-only=on"]
    with serving(tmp_path, *drives) as srv:
        # O_DIRECT: exactly this range reaches the daemon (no readahead)
        assert _direct_read(srv.path("on"), 3 * MiB + 4096, 8192) == b"\x55" * 8192
        _fsync(srv.path("on"))  # the top's L2 tables are a write-back cache
        assert _depth0(on) == [(3 * MiB, 3 * MiB + 65536)]  # the cluster-aligned span
        assert srv.path("off").read_bytes() == b"\x55" * 8 * MiB
        assert srv.path("ro").read_bytes() == b"\x55" * 8 * MiB
        assert _depth0(off) == [] and _depth0(ro) == []
        srv.path("on").read_bytes()
        _fsync(srv.path("on"))
        assert _depth0(on) == [(0, 8 * MiB)]
        # a read-only drive refuses writes
        try:
            os.open(srv.path("ro"), os.O_RDWR)
            raise AssertionError("read-only drive opened for writing")
        except OSError as e:
            assert e.errno in (30, 13)  # EROFS, EACCES
        assert srv.stop() == 0
    assert not is_mounted(tmp_path / "mnt")
    for p in (off, ro):
        assert hashlib.sha256(p.read_bytes()).hexdigest() == digests[p]
        assert qemu_map(p) == maps[p]
    qemu_img("check", on)
    assert _depth0(on) == [(0, 8 * MiB)]
    assert all(e["data"] for e in qemu_map(on))


def _fallocate(fd: int, mode: int, off: int, length: int) -> int:
    """fallocate(2) with any mode; 0 or the errno."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return 0 if libc.fallocate(fd, mode, off, length) == 0 else ctypes.get_errno()


def test_file_semantics(tmp_path: Path) -> None:
    import errno
    import stat

    rw, ro = tmp_path / "rw.raw", tmp_path / "ro.raw"
    for p in (rw, ro):
        p.write_bytes(b"\x01" * (3 * MiB + 512))
    with serving(tmp_path, f"id=rw,file={rw},format=raw",
                 f"id=ro,file={ro},format=raw,read-only=on") as srv:
        assert sorted(os.listdir(srv.mount)) == ["ro", "rw"]
        st = srv.path("rw").stat()
        assert stat.S_ISREG(st.st_mode) and st.st_size == 3 * MiB + 512
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert not os.access(srv.path("nope"), os.F_OK)
        fd = os.open(srv.path("rw"), os.O_RDWR)
        try:
            assert os.pread(fd, 100, 3 * MiB + 500) == b"\x01" * 12  # short read at the end
            assert os.pread(fd, 100, 3 * MiB + 512) == b""
            for off in (3 * MiB + 512, 3 * MiB + 100, 10 * MiB):  # never grows
                try:
                    os.pwrite(fd, b"x" * 1000, off)
                    raise AssertionError("write past the end succeeded")
                except OSError as e:
                    assert e.errno in (errno.ENOSPC, errno.EFBIG)
            os.ftruncate(fd, 3 * MiB + 512)  # same size: fine
            for size in (MiB, 4 * MiB):
                try:
                    os.ftruncate(fd, size)
                    raise AssertionError("truncate succeeded")
                except OSError as e:
                    assert e.errno in (errno.EPERM, errno.EINVAL)
            assert _fallocate(fd, 0, 0, MiB) == 0  # allocation inside: a no-op
            assert _fallocate(fd, 0, 0, 4 * MiB) in (errno.ENOSPC, errno.EFBIG)
            assert _fallocate(fd, 0x03, 4096, 8192) == 0  # PUNCH_HOLE|KEEP_SIZE
            assert _fallocate(fd, 0x10, 65536, 100) == 0  # ZERO_RANGE
            assert _fallocate(fd, 0x08, 0, 65536) == errno.EOPNOTSUPP  # COLLAPSE_RANGE
            os.fsync(fd)
            assert os.pread(fd, 12288, 0) == b"\x01" * 4096 + bytes(8192)
            assert os.pread(fd, 200, 65536 - 50) == b"\x01" * 50 + bytes(100) + b"\x01" * 50
        finally:
            os.close(fd)
        assert os.stat(srv.path("rw")).st_size == 3 * MiB + 512
        for flags in (os.O_RDWR, os.O_WRONLY):
            try:
                os.close(os.open(srv.path("ro"), flags))
                raise AssertionError("read-only drive opened for writing")
            except OSError as e:
                assert e.errno in (errno.EROFS, errno.EACCES)
        try:
            (srv.mount / "new").write_bytes(b"x")
            raise AssertionError("created a file")
        except OSError as e:
            assert e.errno in (errno.EPERM, errno.EACCES, errno.EROFS)
        assert srv.stop() == 0
    data = rw.read_bytes()
    assert data[:12288] == b"\x01" * 4096 + bytes(8192) and len(data) == 3 * MiB + 512
    assert ro.read_bytes() == b"\x01" * (3 * MiB + 512)


def _layout(entries: list[dict]) -> list[tuple[int, int, bool]]:
    """(start, end, data) runs of a `qemu-img map` answer, adjacent equal runs merged."""
    runs: list[tuple[int, int, bool]] = []
    for e in entries:
        start, end, data = e["start"], e["start"] + e["length"], bool(e["data"])
        if runs and runs[-1][1] == start and runs[-1][2] == data:
            start = runs.pop()[0]
        runs.append((start, end, data))
    return runs


@pytest.mark.slow
def test_seek_data_hole_matches_qemu_map(tmp_path: Path) -> None:
    """SEEK_DATA/SEEK_HOLE on the FUSE file (what `qemu-img map -f raw` uses) agree with
    `qemu-img map` of the chain itself."""
    import json

    tops = build_variants(tmp_path)
    drives = [f"id={name},file={top},copy-on-read=off" for name, top in tops.items()]
    with serving(tmp_path, *drives) as srv:
        for name, top in tops.items():
            fuse_map = json.loads(qemu_img("map", "-f", "raw", "--output=json", srv.path(name)))
            assert _layout(fuse_map) == _layout(qemu_map(top, "-U")), name
        fd = os.open(srv.path("chain"), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            assert os.lseek(fd, size - 1, os.SEEK_HOLE) == size - 1
            try:
                os.lseek(fd, size, os.SEEK_DATA)
                raise AssertionError("SEEK_DATA at the end succeeded")
            except OSError as e:
                assert e.errno == 6  # ENXIO
        finally:
            os.close(fd)
        assert srv.stop() == 0
