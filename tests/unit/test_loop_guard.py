"""The loop guard, and the block layer keeping every call that may sync off the trio thread.

The suite runs with the guard in raise mode (tests/conftest.py), so each device test here
fails with BlockingOnLoopError if an engine call that syncs or copies more than
INLINE_COPY runs inline. The workloads are made to hit each path of issue 10 that used
to block: a new L2 table, the eviction of a dirty L2 table (also on a read), queued frees
applied at MAX_PENDING_FREES, new refcount blocks, and kernel copies of 4 MiB; the qcow2
files are judged by qemu-img check and compare afterwards.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from tests.helpers.commands import assert_clean, qemu_img
from vdisk.block import loop_guard
from vdisk.block.device import BlockDevice
from vdisk.engine import blocking
from vdisk.engine.chain import open_chain
from vdisk.engine.qcow2.alloc import MAX_PENDING_FREES
from vdisk.engine.qcow2.image import Qcow2Image


def test_guard_raises_for_a_sync_on_the_loop_thread(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(loop_guard.ENV_LOG)  # fired on purpose: not for the session's log
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        async def main() -> None:
            with pytest.raises(loop_guard.BlockingOnLoopError, match="fdatasync"):
                blocking.fdatasync(fd)
            with pytest.raises(loop_guard.BlockingOnLoopError, match="copy_file_range"):
                blocking.copy_file_range(fd, fd, blocking.INLINE_COPY + 1, 0, 0)
            await trio.to_thread.run_sync(blocking.fdatasync, fd)  # a worker thread: fine

        trio.run(main)
        blocking.fdatasync(fd)  # no event loop at all (offline commands): fine
    finally:
        os.close(fd)


class _Counting(BlockDevice):
    """A device that counts its engine calls by where they ran."""

    threaded = 0

    async def _in_thread(self, fn, *args):  # type: ignore[no-untyped-def]
        self.threaded += 1
        return await super()._in_thread(fn, *args)


def _device(top: str, *, l2_tables: int | None = None) -> _Counting:
    img = open_chain(top)
    assert isinstance(img, Qcow2Image)
    if l2_tables is not None:
        img.l2_cache.capacity = l2_tables
    return _Counting("d0", img, copy_on_read=False, read_only=False)


def _write_pattern(dev: BlockDevice, writes: list[tuple[int, bytes]]) -> None:
    async def main() -> None:
        for off, data in writes:
            if not dev.write_now(off, data):
                await dev.write(off, data)
        await dev.flush()

    trio.run(main)


@pytest.mark.parametrize("cluster", [512, 65536])
def test_scattered_writes_with_a_tiny_l2_cache(tmp_path: Path, cluster: int) -> None:
    """New L2 tables, dirty evictions on writes and on reads, refcount blocks."""
    top = tmp_path / "top.qcow2"
    size = 64 << 20
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster}", str(top), str(size))
    ref = bytearray(size)
    rng = random.Random(7)
    writes = []
    for _ in range(400):
        off = rng.randrange(0, size - 4096) // 512 * 512
        data = bytes([rng.randrange(256)]) * 4096
        writes.append((off, data))
        ref[off:off + 4096] = data
    dev = _device(str(top), l2_tables=4)

    async def reads() -> None:
        for off, _ in writes[::7]:
            got = dev.read_now(off, 4096)
            if got is None:
                got = await dev.read(off, 4096)
            assert got == ref[off:off + 4096]

    try:
        _write_pattern(dev, writes)
        trio.run(reads)
        assert dev.threaded > 1  # the blocking calls went to the thread
    finally:
        trio.run(dev.close)
    assert_clean(top)
    raw = tmp_path / "ref.raw"
    raw.write_bytes(ref)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", str(raw), str(top))


def test_in_place_overwrites_stay_inline(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", str(top), "16M")
    dev = _device(str(top))
    try:
        _write_pattern(dev, [(off, b"\1" * 4096) for off in range(0, 4 << 20, 4096)])
        before = dev.threaded

        async def main() -> None:
            for off in range(0, 4 << 20, 64 << 10):
                assert dev.write_now(off, b"\2" * 4096)  # owned clusters, table cached
                assert dev.read_now(off, 4096) == b"\2" * 4096

        trio.run(main)
        assert dev.threaded == before
    finally:
        trio.run(dev.close)


def test_discards_that_fill_the_free_queue(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    n = MAX_PENDING_FREES + 512  # clusters (a multiple of 128: 64 KiB writes)
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", str(top), str(n * 512))
    dev = _device(str(top))
    try:
        _write_pattern(dev, [(off, b"\3" * 65536) for off in range(0, n * 512, 65536)])

        async def main() -> None:
            for off in range(0, n * 512 - 4096, 4096):  # 8 clusters a call
                await dev.write_zeroes(off, 4096, unmap=True)
            await dev.flush()

        trio.run(main)
    finally:
        trio.run(dev.close)
    assert_clean(top)


def test_copy_up_of_large_runs_runs_in_the_thread(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(16 << 20))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    dev = _device(str(top))
    try:
        async def main() -> None:
            assert await dev.copy_up(0, 16 << 20) == 16 << 20

        trio.run(main)
        trio.run(dev.flush)
    finally:
        trio.run(dev.close)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", str(base), str(top))
