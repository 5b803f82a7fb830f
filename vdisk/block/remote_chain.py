"""Reads, copies and status of a drive whose backing chain has a network layer.

The top image is reached under the device's engine lock, as for every drive. The
layers below it are reached under a lock of their own (`below`), and only to make a
read plan (vdisk.engine.plan) from metadata or to read local pieces; the bytes that
lie in a network source are fetched with neither lock held (vdisk.block.fetch). So a
server that is slow or gone delays only the requests that need its data: reads the top
can answer, writes, QMP and other drives go on.

Copies write whole top clusters only, assembled from the plan (a partial cluster would
make the top's copy-on-write read the rest from the network while holding the engine
lock).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import trio

from vdisk.block.buffers import BufferPool
from vdisk.block.fetch import Fetcher, first_error
from vdisk.engine.chain import chain_status, iter_chain
from vdisk.engine.image import Image, Status
from vdisk.engine.plan import Piece, read_plan

T = TypeVar("T")
SUB_RUN = 2 << 20  # bytes of a copy fetched and written as one part
KEEP_BUFFERS = 8  # idle SUB_RUN buffers kept for the next copy (16 MiB)


def has_remote_below(top: Image) -> bool:
    return any(img.remote for img in iter_chain(top) if img is not top)


class RemoteChain:
    """The network-aware paths of one device. `call(blocks, fn, *args)` runs an engine
    call on the top under the engine lock (the device's `_call`)."""

    def __init__(self, drive_id: str, call: Callable[..., Awaitable[object]],
                 inflight: int) -> None:
        self.call = call
        self.below = trio.Lock()
        self.fetcher = Fetcher(drive_id, inflight)
        self.buffers = BufferPool(SUB_RUN, KEEP_BUFFERS)

    async def _below(self, fn: Callable[..., T], *args: object) -> T:
        async with self.below:
            return await trio.to_thread.run_sync(fn, *args)

    async def _top(self, top: Image, op: str, offset: int, length: int,
                   fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on the top under the engine lock; in the thread if op may block."""
        result = await self.call(partial(top.may_block, op, offset, length), fn, *args)
        return result  # type: ignore[return-value]

    # -- status -----------------------------------------------------------------------
    async def status(self, top: Image, offset: int, length: int, base: Image | None
                     ) -> tuple[int, int | None, Status]:
        """chain_status(top, ...) with the top under the engine lock, the rest below."""
        ext = await self._top(top, "status", offset, length, top.layer_status, offset, length)
        if ext.status is not Status.UNALLOCATED:
            return ext.length, 0, ext.status
        below = top.backing
        if below is None or below is base:
            return ext.length, None, Status.ZERO if base is None else Status.UNALLOCATED
        if offset >= below.virtual_size:  # past a shorter backing file: zeroes it holds
            return ext.length, 1, Status.ZERO
        run, depth, status = await self._below(
            partial(chain_status, below, base=base), offset, ext.length)
        return run, None if depth is None else depth + 1, status

    # -- reads --------------------------------------------------------------------------
    async def _fill(self, buf: memoryview, start: int, pieces: list[Piece]) -> None:
        """Put the view of the pieces into buf (buf[0] is offset start); zeroes stay."""
        async def one(p: Piece) -> None:
            lo = p.offset - start
            if p.source is not None:
                await self.fetcher.fetch_into(buf[lo:lo + p.length], p.source, p.host)
            else:
                assert p.layer is not None
                buf[lo:lo + p.length] = await self._below(p.layer.read, p.offset, p.length)

        async with trio.open_nursery() as nursery:
            for p in pieces:
                if p.layer is not None and not p.zero:
                    nursery.start_soon(one, p)

    async def read_below(self, top: Image, offset: int, length: int) -> bytes:
        """The view of the chain below the top over the range (zeroes past its end)."""
        buf = bytearray(length)
        below = top.backing
        pos, end = offset, offset + length
        while below is not None and pos < min(end, below.virtual_size):
            pieces = await self._below(read_plan, below, pos, end - pos)
            if not pieces:
                break
            await first_error(self._fill(memoryview(buf)[pos - offset:], pos, pieces))
            pos = pieces[-1].offset + pieces[-1].length
        return bytes(buf)

    async def read(self, top: Image, offset: int, length: int) -> bytes:
        """The guest view of the range: the top's runs from the top, the rest from below."""
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            ext = await self._top(top, "status", pos, end - pos, top.layer_status, pos, end - pos)
            n = ext.length
            if ext.status is Status.UNALLOCATED:
                out += await self.read_below(top, pos, n)
            else:
                out += await self._top(top, "read", pos, n, top.read, pos, n)
            pos += n
        return bytes(out)

    # -- copies ---------------------------------------------------------------------------
    async def copy_up(self, top: Image, start: int, end: int, base: Image | None,
                      zeroes: bool, pieces_out: list[tuple[int, bytes]] | None = None) -> int:
        """Copy into the top what it lacks in [start, end) (top-cluster aligned, held
        under the range lock by the caller) and a layer above base holds; zero runs of
        such layers only with zeroes. The bytes copied; pieces_out gets the data."""
        below_base = set() if base is None else {id(i) for i in iter_chain(base)}
        cs = max(top.cluster_size, 512)
        copied = 0
        pos = start
        while pos < end:
            ext = await self._top(top, "status", pos, end - pos, top.layer_status, pos, end - pos)
            n = ext.length
            if ext.status is not Status.UNALLOCATED or top.backing is None:
                pos += n
                continue
            below = top.backing
            stop = min(pos + n, below.virtual_size)
            pieces: list[Piece] = []
            p = pos
            while p < stop:
                more = await self._below(read_plan, below, p, stop - p)
                if not more:
                    break
                pieces += more
                p = more[-1].offset + more[-1].length

            tail = max(stop, pos)
            if tail < pos + n and id(below) not in below_base:
                # past the end of a shorter backing file the view is zeroes, held by it
                pieces.append(Piece(tail, pos + n - tail, below, zero=True))

            def needed(pc: Piece) -> bool:
                if pc.layer is None or id(pc.layer) in below_base:
                    return False
                return zeroes or not pc.zero

            copied += await first_error(self._write_clusters(top, pos, pos + n, cs, pieces,
                                                              needed, pieces_out))
            pos += n
        return copied

    async def _write_clusters(self, top: Image, a: int, b: int, cs: int, pieces: list[Piece],
                              needed: Callable[[Piece], bool],
                              pieces_out: list[tuple[int, bytes]] | None) -> int:
        """Write the top clusters of [a, b) that a needed piece touches, grouped in runs:
        zero runs as zeroes, the others as data of the whole clusters."""
        size = top.virtual_size
        runs: list[list[int]] = []  # [first, end, has_data]
        for pc in pieces:
            if not needed(pc):
                continue
            c0 = pc.offset // cs * cs
            c1 = min(-(-(pc.offset + pc.length) // cs) * cs, b, size)
            is_data = 0 if pc.zero else 1
            if runs and c0 <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], c1)
                runs[-1][2] |= is_data
            else:
                runs.append([max(c0, a), c1, is_data])
        # Each run is cut into parts of SUB_RUN bytes, all fetched at once (as many in
        # flight as the fetcher allows) and written in order as each one arrives, so the
        # writes into the top overlap the fetches still under way.
        parts: list[tuple[int, int, bool]] = []
        for r0, r1, has_data in runs:
            if not has_data and all(pc.zero or pc.layer is None for pc in _within(pieces, r0, r1)):
                parts.append((r0, r1, False))
                continue
            step = max(SUB_RUN // cs, 1) * cs
            parts += [(p0, min(p0 + step, r1), True) for p0 in range(r0, r1, step)]
        bufs: dict[int, memoryview] = {}
        arrived = {p0: trio.Event() for p0, _, data in parts if data}

        async def fetch(p0: int, p1: int) -> None:
            buf = self.buffers.take(p1 - p0)
            try:
                await self._fill(buf, p0, _within(pieces, p0, p1))
            except BaseException:
                self.buffers.give(buf)
                raise
            bufs[p0] = buf
            arrived[p0].set()

        copied = 0
        async with trio.open_nursery() as nursery:
            for p0, p1, data in parts:
                if data:
                    nursery.start_soon(fetch, p0, p1)
            for p0, p1, data in parts:
                if not data:
                    await self._top(top, "zeroes", p0, p1 - p0,
                                    partial(top.write_zeroes, unmap=False), p0, p1 - p0)
                else:
                    await arrived[p0].wait()
                    buf = bufs.pop(p0)
                    try:
                        await self._top(top, "copy", p0, len(buf), top.write_copy, p0, buf)
                        if pieces_out is not None:
                            pieces_out.append((p0, bytes(buf)))
                    finally:
                        self.buffers.give(buf)
                copied += p1 - p0
        return copied


def _within(pieces: list[Piece], a: int, b: int) -> list[Piece]:
    """The pieces cut to [a, b)."""
    out = []
    for p in pieces:
        lo, hi = max(p.offset, a), min(p.offset + p.length, b)
        if lo < hi:
            out.append(Piece(lo, hi - lo, p.layer, p.zero, p.source, p.host + (lo - p.offset)))
    return out
