"""The compiled FUSE fast path (vdisk/fuse/fastpath.py): requests it serves read and write
what the engine would, the table is withdrawn where the mapping changes (discard, zero
writes, a new bitmap, a stream that drops the backing file), and its requests count in
query-blockstats. Images are judged by qemu-img compare and check."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from tests.helpers.chains import make_chain
from tests.helpers.commands import qemu_img
from tests.helpers.daemon import serving
from tests.integration.test_blockstats import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from tests.integration.test_blockstats import libc_fallocate as fallocate

K = 4096
FALLOC_FL_ZERO_RANGE = 0x10


def _buf(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, max(len(data), K))  # page-aligned, as O_DIRECT wants
    buf.write(data)
    return buf


def _pread(fd: int, n: int, off: int) -> bytes:
    buf = mmap.mmap(-1, n)
    assert os.preadv(fd, [buf], off) == n
    return bytes(buf)


def _pwrite(fd: int, data: bytes, off: int) -> None:
    assert os.pwritev(fd, [memoryview(_buf(data))[:len(data)]], off) == len(data)


def test_served_requests_follow_the_engine_and_are_counted(tmp_path: Path) -> None:
    chain = make_chain(tmp_path)
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", chain["top"], ref)
    model = bytearray(ref.read_bytes())
    reads = writes = 0
    with serving(tmp_path, f"id=d0,file={chain['top']},copy-on-read=off") as srv:
        assert "FUSE fast path on" in srv.stderr
        fd = os.open(srv.path("d0"), os.O_RDWR | os.O_DIRECT)
        try:
            # every 4 KiB block, twice: the second pass is served from the table (top
            # data, backing data of both layers, zero clusters, unallocated holes)
            for _ in range(2):
                for off in range(0, len(model), 64 * K):
                    assert _pread(fd, K, off) == model[off:off + K], off
                    reads += 1
            for i, off in enumerate((2 << 20, 1 << 20, (1 << 20) + 65536, 5 << 20, 0)):
                for rep in range(3):  # first write maps the cluster, then in place
                    data = bytes([0x40 + i + rep]) * K
                    _pwrite(fd, data, off + rep * K)
                    model[off + rep * K:off + (rep + 1) * K] = data
                    writes += 1
                assert _pread(fd, 3 * K, off) == model[off:off + 3 * K]
                reads += 1
            # the mapping changes under the table: discard and zero-range, then reads
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 << 20, 65536)
            model[2 << 20:(2 << 20) + 65536] = bytes(65536)
            fallocate(fd, FALLOC_FL_ZERO_RANGE, 0, 65536)
            model[0:65536] = bytes(65536)
            for off in (0, 2 << 20):
                assert _pread(fd, 2 * K, off) == bytes(2 * K)
                reads += 1
                _pwrite(fd, b"\x77" * K, off + K)
                model[off + K:off + 2 * K] = b"\x77" * K
                writes += 1
                assert _pread(fd, 2 * K, off) == model[off:off + 2 * K]
                reads += 1
            # a large read across published and unpublished clusters
            assert _pread(fd, 1 << 20, 1 << 20) == model[1 << 20:2 << 20]
            reads += 1
            os.fsync(fd)
        finally:
            os.close(fd)
        stats = next(s for s in srv.qmp("query-blockstats") if s["device"] == "d0")["stats"]
        assert stats["rd_operations"] == reads
        assert stats["wr_operations"] == writes + 1  # the zero-range counts as a write
        assert stats["wr_highest_offset"] == (5 << 20) + 3 * K
    out = tmp_path / "model.raw"
    out.write_bytes(model)
    qemu_img("check", chain["top"])
    qemu_img("compare", "-f", "raw", "-F", "qcow2", out, chain["top"])


def test_writes_in_place_are_recorded_once_a_bitmap_is_added(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", top, "4M")
    with serving(tmp_path, f"id=d0,file={top}") as srv:
        fd = os.open(srv.path("d0"), os.O_RDWR | os.O_DIRECT)
        try:
            for _ in range(3):  # allocated, then published as written in place
                _pwrite(fd, b"\x11" * K, 0)
            srv.qmp("block-dirty-bitmap-add", node="d0", name="b", granularity=65536)
            _pwrite(fd, b"\x22" * K, 0)  # must not bypass the bitmap
        finally:
            os.close(fd)
        entry = next(b for b in srv.qmp("query-block") if b["device"] == "d0")
        (bm,) = entry["inserted"]["dirty-bitmaps"]
        assert bm["count"] == 65536


@pytest.mark.parametrize("fast", ["0", "1"])
def test_stream_with_fast_reads_of_the_backing_file(tmp_path: Path, fast: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads served from the backing files while a stream drops them stay right."""
    monkeypatch.setenv("VDISK_FAST_PATH", fast)
    chain = make_chain(tmp_path)
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", chain["top"], ref)
    want = ref.read_bytes()
    with serving(tmp_path, f"id=d0,file={chain['top']},copy-on-read=off") as srv:
        assert ("FUSE fast path on" in srv.stderr) == (fast == "1")
        fd = os.open(srv.path("d0"), os.O_RDONLY | os.O_DIRECT)
        try:
            for off in range(0, len(want), 16 * K):
                assert _pread(fd, K, off) == want[off:off + K]
            srv.qmp("block-stream", **{"device": "d0", "job-id": "s"})
            for _ in range(50):
                events = [j for j in srv.qmp("query-block-jobs") if j["device"] == "s"]
                for off in range(0, len(want), 16 * K):
                    assert _pread(fd, K, off) == want[off:off + K]
                if not events:
                    break
        finally:
            os.close(fd)
    qemu_img("check", chain["top"])
    qemu_img("compare", "-f", "raw", "-F", "qcow2", ref, chain["top"])
    info = qemu_img("info", "--output=json", chain["top"])
    assert "backing-filename" not in info
