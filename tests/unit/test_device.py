"""BlockDevice and RangeLock against an in-memory image (a model of a qcow2 layer)."""

from __future__ import annotations

import errno
import os
import time
from typing import Any

import pytest
import trio

from vdisk.block.device import BlockDevice
from vdisk.block.rangelock import RangeLock
from vdisk.engine.image import Extent, Image, Status

CS = 4096


class MemImage(Image):
    """One layer: clusters hold bytes, or ZERO, or nothing (defer to backing)."""

    format_name = "qcow2"

    def __init__(self, path: str, size: int, backing: MemImage | None = None,
                 *, read_delay: float = 0.0) -> None:
        self.path = path
        self.read_only = False
        self.virtual_size = size
        self.cluster_size = CS
        self.backing = backing
        self.backing_name = os.path.basename(backing.path) if backing else None
        self.backing_format = "qcow2" if backing else None
        self.clusters: dict[int, bytes | None] = {}  # None = zero cluster
        self.read_delay = read_delay
        self.flushes = 0
        self.closed = False
        self.header: tuple[str | None, str | None] | None = None

    def _cluster_status(self, idx: int) -> Status:
        if idx not in self.clusters:
            return Status.UNALLOCATED
        return Status.ZERO if self.clusters[idx] is None else Status.DATA

    def layer_status(self, offset: int, length: int) -> Extent:
        end = min(offset + length, self.virtual_size)
        st = self._cluster_status(offset // CS)
        pos = (offset // CS + 1) * CS
        while pos < end and self._cluster_status(pos // CS) is st:
            pos += CS
        return Extent(offset, min(pos, end) - offset, st)

    def _read_cluster(self, idx: int) -> bytes:
        if idx in self.clusters:
            data = self.clusters[idx]
            return bytes(CS) if data is None else data
        if self.backing is not None and idx * CS < self.backing.virtual_size:
            return self.backing.read(idx * CS, CS).ljust(CS, b"\0")
        return bytes(CS)

    def read(self, offset: int, length: int) -> bytes:
        if self.read_delay:
            time.sleep(self.read_delay)
        out = bytearray()
        pos = offset
        end = offset + length
        while pos < end:
            idx = pos // CS
            chunk = self._read_cluster(idx)
            out += chunk[pos - idx * CS : min(end, (idx + 1) * CS) - idx * CS]
            pos = (idx + 1) * CS
        return bytes(out)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        data = bytes(data)
        pos = offset
        end = offset + len(data)
        while pos < end:
            idx = pos // CS
            cluster = bytearray(self._read_cluster(idx))
            lo = pos - idx * CS
            hi = min(end, (idx + 1) * CS) - idx * CS
            cluster[lo:hi] = data[pos - offset : pos - offset + hi - lo]
            self.clusters[idx] = bytes(cluster)
            pos = (idx + 1) * CS

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self.write(offset, bytes(length))
        for idx in range(-(-offset // CS), (offset + length) // CS):
            self.clusters[idx] = None

    def flush(self) -> None:
        self.flushes += 1

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        self.header = (name, fmt)
        self.backing_name, self.backing_format = name, fmt

    def info(self) -> dict[str, Any]:
        return {"filename": self.path, "virtual-size": self.virtual_size}

    def close(self) -> None:
        self.closed = True


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def chain3(size: int = 64 * CS, **kw: Any) -> tuple[MemImage, MemImage, MemImage]:
    base = MemImage("/d/base.qcow2", size)
    base.write(0, pattern(size, 1))
    mid = MemImage("/d/mid.qcow2", size, base)
    mid.write(8 * CS, pattern(4 * CS, 2))
    mid.write_zeroes(16 * CS, 4 * CS)
    top = MemImage("/d/top.qcow2", size, mid, **kw)
    return top, mid, base


async def test_copy_on_read_copies_read_span_only() -> None:
    top, mid, base = chain3()
    dev = BlockDevice("d0", top, copy_on_read=True, read_only=False)
    expect = top.read(0, top.virtual_size)
    got = await dev.read(8 * CS + 100, 2 * CS)  # spans clusters 8..10
    assert got == expect[8 * CS + 100 : 10 * CS + 100]
    assert sorted(top.clusters) == [8, 9, 10]
    await dev.read(16 * CS, 4 * CS)  # zero clusters of an intermediate layer
    assert all(top.clusters[i] is None for i in range(16, 20))
    assert top.read(0, top.virtual_size) == expect


async def test_no_copy_on_read_leaves_top_alone() -> None:
    top, _, _ = chain3()
    for dev in (BlockDevice("d0", top, copy_on_read=False, read_only=False),
                BlockDevice("d0", top, copy_on_read=True, read_only=True)):
        assert not dev.copy_on_read
        await dev.read(0, top.virtual_size)
    assert top.clusters == {}


async def test_copy_up_with_base_and_count() -> None:
    top, mid, base = chain3()
    dev = BlockDevice("d0", top, copy_on_read=False, read_only=False)
    copied = await dev.copy_up(0, top.virtual_size, base=base)
    assert copied == 8 * CS  # mid's 4 data + 4 zero clusters, nothing of base
    assert sorted(top.clusters) == list(range(8, 12)) + list(range(16, 20))
    assert await dev.copy_up(0, top.virtual_size, base=base) == 0  # idempotent
    assert await dev.copy_up(0, top.virtual_size) == 56 * CS  # the rest comes from base


async def test_write_bounds_and_read_only() -> None:
    top, _, _ = chain3()
    dev = BlockDevice("d0", top, copy_on_read=True, read_only=False)
    with pytest.raises(OSError) as e:
        await dev.write(dev.size - 10, b"x" * 11)
    assert e.value.errno == errno.ENOSPC
    ro = BlockDevice("d1", top, copy_on_read=True, read_only=True)
    with pytest.raises(OSError) as e:
        await ro.write(0, b"x")
    assert e.value.errno == errno.EROFS
    assert await dev.read(dev.size - 10, 100) == top.read(dev.size - 10, 10)
    assert await dev.read(dev.size, 100) == b""


@pytest.mark.slow
async def test_copy_on_read_never_overwrites_a_concurrent_write() -> None:
    # Threaded engine + slow backing reads: without the range lock the copy-up would
    # read old backing data, the write would land, then the copy would overwrite it.
    top, mid, _ = chain3()
    mid.read_delay = 0.2
    dev = BlockDevice("d0", top, copy_on_read=True, read_only=False, engine_threads=True)
    new = b"N" * CS
    async with trio.open_nursery() as n:
        n.start_soon(dev.read, 8 * CS, 4 * CS)
        await trio.sleep(0.05)
        n.start_soon(dev.write, 9 * CS, new)
    assert top.read(9 * CS, CS) == new
    assert await dev.read(9 * CS, CS) == new


async def test_set_backing_switches_chain_and_closes_dropped() -> None:
    top, mid, base = chain3()
    dev = BlockDevice("d0", top, copy_on_read=False, read_only=False)
    await dev.copy_up(0, dev.size, base=base)
    before = top.read(0, dev.size)
    await dev.set_backing(base)
    assert top.header == ("base.qcow2", "qcow2")
    assert top.backing is base and mid.closed and not base.closed
    assert top.flushes >= 1
    assert await dev.read(0, dev.size) == before
    await dev.copy_up(0, dev.size)
    await dev.set_backing(None)
    assert top.header == (None, None) and top.backing is None and base.closed
    assert await dev.read(0, dev.size) == before
    await dev.close()
    assert top.closed


async def test_rangelock_parallel_and_serialized() -> None:
    lock = RangeLock()
    order: list[str] = []

    async def hold(name: str, start: int, end: int, t: float) -> None:
        async with lock.hold(start, end):
            order.append(f"+{name}")
            await trio.sleep(t)
            order.append(f"-{name}")

    async with trio.open_nursery() as n:
        n.start_soon(hold, "a", 0, 10, 0.1)
        await trio.sleep(0.01)
        n.start_soon(hold, "b", 10, 20, 0.01)  # disjoint: runs inside a
        await trio.sleep(0.01)
        n.start_soon(hold, "c", 5, 15, 0.01)  # overlaps both: waits
        await trio.sleep(0.01)
        n.start_soon(hold, "d", 20, 30, 0.01)  # disjoint from all: runs at once
    assert order.index("+b") < order.index("-a")
    assert order.index("+c") > order.index("-a") and order.index("+c") > order.index("-b")
    assert order.index("+d") < order.index("-a")
    assert not lock.busy


async def test_rangelock_whole_waits_for_all_and_blocks_later() -> None:
    lock = RangeLock()
    order: list[str] = []

    async def hold(name: str, whole: bool, t: float) -> None:
        cm = lock.hold_all() if whole else lock.hold(100, 200)
        async with cm:
            order.append(name)
            await trio.sleep(t)

    async with trio.open_nursery() as n:
        n.start_soon(hold, "first", False, 0.05)
        await trio.sleep(0.01)
        n.start_soon(hold, "all", True, 0.05)
        await trio.sleep(0.01)
        n.start_soon(hold, "later", False, 0.0)  # arrives after the whole-device request
    assert order == ["first", "all", "later"]


async def test_copy_on_read_failure_still_serves_the_read() -> None:
    top, _, _ = chain3()
    expect = top.read(0, top.virtual_size)

    def full(offset: int, data: bytes | memoryview) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    top.write = full  # type: ignore[method-assign]
    dev = BlockDevice("d0", top, copy_on_read=True, read_only=False)
    assert await dev.read(8 * CS, 4 * CS) == expect[8 * CS : 12 * CS]
    assert top.clusters == {}
    with pytest.raises(OSError) as e:
        await dev.write(0, b"x")
    assert e.value.errno == errno.ENOSPC
