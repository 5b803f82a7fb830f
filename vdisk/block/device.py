"""BlockDevice: async, range-serialized access to one image chain, with copy-on-read.

The format engine is synchronous and not thread-safe, so every engine call on a
chain goes through one per-device engine lock. Before each call the device asks the
engine whether it may block (Image.may_block, decided from cached metadata): a call
that may sleep on a disk sync or the network, or move more than one FUSE request
(blocking.INLINE_COPY), runs in a worker thread while holding the engine lock, so the
loop (QMP, other drives, other requests) keeps going; the rest run inline in the trio
thread, because a thread hop costs more than a cached 4 KiB read. Measured through
FUSE (fio randread 4 KiB, psync, O_DIRECT, 1 GiB qcow2, 2 cores): inline 21.7k IOPS
with 1 job, 26.4k with 4; every call via trio.to_thread with a CapacityLimiter(1):
4.3k and 6.0k. Flush, header rewrites and close always run in the thread.
engine_threads=True (serve --engine-threads, hidden) sends every call to the thread,
for measurements.

Multi-step operations (copy-on-read, copy_up, writes, zeroes) hold a byte-range
lock over their span, so a copy-up's "does the top hold it?" check and its copy
are atomic against writes to the same range: copy-on-read never overwrites newer
data. Independent ranges run in parallel.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import trio

from vdisk.block.cluster_table import ClusterTable, NoTable, TableKeeper
from vdisk.block.fetch import DEFAULT_INFLIGHT
from vdisk.block.rangelock import RangeLock
from vdisk.block.remote_chain import RemoteChain, has_remote_below
from vdisk.block.seek import seek_in
from vdisk.block.stats import IOStats, now
from vdisk.engine.chain import chain_status, iter_chain
from vdisk.engine.image import Image, Status
from vdisk.errors import oserror as _oserror

log = logging.getLogger("vdisk.device")

T = TypeVar("T")

COPY_PIECE = 16 << 20  # at most this many bytes per engine copy call
# Bytes a stream step copies per engine call (in the worker thread, holding the engine
# lock): per-run calls cost a thread hop each (137 us, measured), over 4,000 of them per
# GiB on a fragmented chain; 2 MiB holds the lock about 1 ms.
COPY_BATCH = 2 << 20
# A stream step copies through O_DIRECT (no page cache filled, but the engine lock is held
# while the device writes) only when no guest request ended in the last GUEST_QUIET_NS;
# otherwise through the page cache, which holds the lock for less time. Measured (bench,
# 4 KiB read p99 during a throttled stream / idle): 2.00 with O_DIRECT steps.
GUEST_QUIET_NS = 50_000_000


def _always() -> bool:
    return True


class BlockDevice:
    """One served drive: a chain of images behind an async, range-locked API."""

    def __init__(
        self,
        drive_id: str,
        top: Image,
        *,
        copy_on_read: bool,
        read_only: bool,
        engine_threads: bool = False,
        inflight: int = DEFAULT_INFLIGHT,
    ) -> None:
        self.drive_id = drive_id
        self.top = top
        self.read_only = read_only or top.read_only
        self.copy_on_read = copy_on_read and not self.read_only
        self.size = top.virtual_size
        self._locks = RangeLock()
        self._engine_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._engine_threads = engine_threads
        self._closed = False
        self._cor_errors: set[int | None] = set()  # errnos already reported
        self._inflight = inflight
        # set while a network layer is below the top (vdisk/block/remote_chain.py)
        self.remote: RemoteChain | None = None
        self._update_remote()
        self.stats = IOStats()  # the users' requests (query-blockstats)
        self._table: TableKeeper | NoTable = NoTable()  # see attach_table

    def attach_table(self, table: ClusterTable) -> None:
        """Keep table true from now on (vdisk/block/cluster_table.py): the requests it
        serves count in this drive's stats."""
        self._table = TableKeeper(table, self.size, copy_on_read=self.copy_on_read,
                                  read_only=self.read_only)
        self.stats.outside = table.counters

    def _update_remote(self) -> None:
        if not has_remote_below(self.top):
            self.remote = None
        elif self.remote is None:
            self.remote = RemoteChain(self.drive_id, self._call, self._inflight)

    # -- engine access ---------------------------------------------------------------

    async def _call(self, blocks: Callable[[], bool], fn: Callable[..., T], *args: object
                    ) -> T:
        """Run an engine call: in a worker thread if blocks() says it may block, else
        inline. blocks() is asked again once the engine lock is ours when it had to be
        waited for: a call that ran meanwhile may have changed the answer."""
        try:
            if self._engine_threads:
                return await self._threaded(fn, *args)
            if not self._engine_lock.locked() and not blocks():
                return fn(*args)
            async with self._engine_lock:
                if blocks():
                    return await self._in_thread(fn, *args)
                return fn(*args)
        except Exception:
            await self._table.reset_fenced()  # e.g. corruption found: the table may be wrong
            raise

    def _chain_blocks(self, op: str, offset: int, length: int) -> bool:
        """True if op on the range may block in any layer of the chain."""
        img: Image | None = self.top
        while img is not None:
            if img.may_block(op, offset, length):
                return True
            img = img.backing
        return False

    engine_call, chain_blocks = _call, _chain_blocks  # for helper modules (seek.py)

    async def _threaded(self, fn: Callable[..., T], *args: object) -> T:
        """Run an engine call that may sleep on the disk in a worker thread."""
        try:
            async with self._engine_lock:
                return await self._in_thread(fn, *args)
        except Exception:
            await self._table.reset_fenced()
            raise

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) in the worker thread; the caller holds the engine lock."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- helpers --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise _oserror(errno.EBADF, f"drive {self.drive_id} is closed")

    def _check_write(self, offset: int, length: int) -> None:
        self._check_open()
        if self.read_only:
            raise _oserror(errno.EROFS, f"drive {self.drive_id} is read-only")
        if offset < 0 or length < 0:
            raise _oserror(errno.EINVAL, "negative offset or length")
        if offset + length > self.size:
            raise _oserror(errno.ENOSPC, f"write past the end of drive {self.drive_id}")

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        """The top-cluster-aligned span of [offset, offset+length), clamped to the size."""
        cs = max(self.top.cluster_size, 512)
        start = offset // cs * cs
        end = min(-(-(offset + length) // cs) * cs, self.size)
        return start, end

    def _next_copy(self, off: int, end: int, base: Image | None
                   ) -> tuple[int, Status | None, Image | None]:
        """(run, what to do, source) at off: DATA/ZERO to copy the run up, None to skip it;
        source: the one layer whose data is the guest view of the whole run, if known."""
        top = self.top
        run, depth, status = chain_status(top, off, min(end - off, COPY_PIECE), base=base)
        if not depth:  # 0: the top holds it; None: no layer above base holds it
            return run, None, None
        if status is Status.DATA and not (off + run) % max(top.cluster_size, 512):
            src = top.backing
            for _ in range(depth - 1):
                src = src.backing if src is not None else None
            return run, status, src
        if status is Status.DATA:
            # whole top clusters: a partial one would be completed by COW anyway. Only up
            # to where the top's own unallocated run ends (extended L2: subclusters).
            ext = top.layer_status(off, end - off)
            cs = max(top.cluster_size, 512)
            run = min(-(-(off + run) // cs) * cs, off + ext.length, end) - off
        return run, status, None

    def _copy_plain(self, off: int, run: int, src: Image, direct: bool) -> int:
        """Copy a run that src holds as plain data into the top with write_from; the bytes
        done (a prefix), 0 if not possible here."""
        loc = src.data_location(off, run)
        if loc is None:
            return 0
        fd, host, n = loc
        return self.top.write_from(off, fd, host, n, direct=direct)

    def _copy_some(self, off: int, end: int, base: Image | None, zeroes: bool, direct: bool
                   ) -> tuple[int, int]:
        """Copy up runs from off on, about COPY_BATCH bytes of them (one engine call, in the
        worker thread, under the engine lock), bypassing the page cache with direct;
        (where it stopped, bytes copied)."""
        top = self.top
        copied = 0
        stop = min(end, off + COPY_BATCH)
        while off < stop:
            run, what, src = self._next_copy(off, stop, base)
            if what is Status.ZERO and not zeroes:
                what = None
            if what is Status.DATA:
                done = self._copy_plain(off, run, src, direct) if src is not None else 0
                if not done:
                    (top.write_copy if direct else top.write)(off, top.read(off, run))
                    done = run
                copied += done
                off += done
                continue
            if what is Status.ZERO:
                top.write_zeroes(off, run, unmap=False)
                copied += run
            off += run
        return off, copied

    async def _copy_up_locked(self, start: int, end: int, base: Image | None,
                              zeroes: bool = True,
                              pieces: list[tuple[int, bytes]] | None = None) -> int:
        """Copy into the top what it lacks in [start, end) and a layer above base holds.

        The caller holds the range lock over [start, end): each step is its own engine
        call (other ranges proceed in between), yet no write can slip into this range
        between the status check and the copy. zeroes=False skips runs that read as
        zeroes from below (a stream without a base keeps them unallocated). pieces, if
        given (copy-on-read), receives (offset, data) of every data run copied; without
        it (a stream step) the runs are copied in batches in the worker thread.
        """
        top = self.top
        if top.backing is None or top.backing is base:
            return 0
        self._table.forget(start, end - start)
        copied = 0
        off = start
        if pieces is None:
            while off < end:
                direct = now() - self.stats.last_request_ns() > GUEST_QUIET_NS
                off, n = await self._call(_always, self._copy_some, off, end, base, zeroes,
                                          direct)
                copied += n
            return copied
        while off < end:
            n = min(end - off, COPY_PIECE)
            run, what, _ = await self._call(partial(self._chain_blocks, "status", off, n),
                                            self._next_copy, off, end, base)
            if what is Status.ZERO and not zeroes:
                what = None
            if what is Status.DATA:
                data = await self._call(partial(top.may_block, "read", off, run), top.read, off, run)
                await self._call(partial(top.may_block, "write", off, run), top.write, off, data)
                pieces.append((off, data))
            elif what is Status.ZERO:
                await self._call(partial(top.may_block, "zeroes", off, run),
                                 partial(top.write_zeroes, unmap=False), off, run)
            if what is not None:
                copied += run
            off += run
        return copied

    def _copy_on_read_failed(self, e: OSError) -> None:
        if e.errno not in self._cor_errors:
            self._cor_errors.add(e.errno)
            log.warning("%s: copy-on-read failed (%s); serving reads from the backing chain",
                        self.drive_id, e)

    # -- public API -----------------------------------------------------------------

    def read_now(self, offset: int, length: int) -> bytes | None:
        """The read done right here, when it needs nothing async: no copy-on-read, no
        engine call in flight, engine calls inline. None: use read()."""
        if self._engine_threads or self._closed or self._engine_lock.locked() or self.remote:
            return None
        top = self.top
        if self.copy_on_read and top.backing is not None:
            return None
        if offset < 0 or length < 0 or offset + length > self.size:
            return None
        if top.may_block("read", offset, length):
            return None
        t0 = now()
        try:
            data = top.read(offset, length) if length else b""
        except Exception:
            self._table.reset()
            raise
        self.stats.read(length, t0)
        self._table.publish(top, offset, length)
        return data

    async def read(self, offset: int, length: int) -> bytes:
        """The guest view of the range (short only at the end of the device)."""
        t0 = now()
        data = await self._read(offset, length)
        self.stats.read(len(data), t0)
        return data

    async def _read(self, offset: int, length: int) -> bytes:
        self._check_open()
        if offset < 0 or length < 0:
            raise _oserror(errno.EINVAL, "negative offset or length")
        if offset >= self.size or length == 0:
            return b""
        length = min(length, self.size - offset)
        top = self.top
        if self.remote is not None:
            return await self._read_remote(self.remote, offset, length)
        if self.copy_on_read and top.backing is not None:
            ext = await self._call(partial(top.may_block, "status", offset, length),
                                   top.layer_status, offset, length)
            if ext.status is Status.UNALLOCATED or ext.length < length:
                start, end = self._span(offset, length)
                async with self._locks.hold(start, end):
                    pieces: list[tuple[int, bytes]] = []
                    try:
                        await self._copy_up_locked(start, end, None, True, pieces)
                    except OSError as e:  # the read itself can still be served
                        self._copy_on_read_failed(e)
                    for off, data in pieces:  # what was just copied is the guest view
                        if off <= offset and offset + length <= off + len(data):
                            return data[offset - off:offset - off + length]
                    return await self._call(partial(top.may_block, "read", offset, length),
                                            top.read, offset, length)
        return await self._call(partial(top.may_block, "read", offset, length), top.read, offset, length)

    async def _read_remote(self, remote: RemoteChain, offset: int, length: int) -> bytes:
        top = self.top
        if not self.copy_on_read:  # the range held: a backing switch waits for the read
            async with self._locks.hold(offset, offset + length):
                return await remote.read(top, offset, length)
        ext = await self._call(partial(top.may_block, "status", offset, length),
                               top.layer_status, offset, length)
        if ext.status is not Status.UNALLOCATED and ext.length >= length:
            return await self._call(partial(top.may_block, "read", offset, length),
                                    top.read, offset, length)
        start, end = self._span(offset, length)
        async with self._locks.hold(start, end):
            pieces: list[tuple[int, bytes]] = []
            try:
                await remote.copy_up(top, start, end, None, True, pieces)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                    raise  # the remote data cannot be had: the read fails too
                self._copy_on_read_failed(e)
            for off, data in pieces:
                if off <= offset and offset + length <= off + len(data):
                    return data[offset - off:offset - off + length]
            return await remote.read(top, offset, length)

    async def _fill_partial(self, remote: RemoteChain, offset: int, length: int) -> None:
        """Before a write into the top over a network chain: copy up the clusters the
        write covers only in part, so the top's own copy-on-write never reads the
        network under the engine lock. The caller holds the range."""
        start, end = self._span(offset, length)
        cs = max(self.top.cluster_size, 512)
        if offset > start:
            await remote.copy_up(self.top, start, min(start + cs, end), None, True)
        last = (end - 1) // cs * cs  # the last cluster (the size may end inside it)
        if offset + length < end and last >= start + (cs if offset > start else 0):
            await remote.copy_up(self.top, last, end, None, True)

    def write_now(self, offset: int, data: bytes | memoryview) -> bool:
        """Do the write right here when nothing else is in flight on the device (no range
        held or awaited, no engine call running): a synchronous engine call cannot be
        interleaved, so the range lock is not needed. False: use write()."""
        if (self._engine_threads or self._locks.busy or self._engine_lock.locked()
                or self.remote):
            return False
        self._check_write(offset, len(data))
        if self.top.may_block("write", offset, len(data)):
            return False
        t0 = now()
        table = self._table
        if data:
            table.forget(offset, len(data))
            try:
                self.top.write(offset, data)
            except Exception:
                table.reset()
                raise
        self.stats.write(offset, len(data), t0)
        table.publish(self.top, offset, len(data))
        return True

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write data at offset; never grows the device (ENOSPC past the end)."""
        self._check_write(offset, len(data))
        if not data:
            return
        t0 = now()
        if self.remote is not None:
            start, end = self._span(offset, len(data))
            async with self._locks.hold(start, end):
                self._table.forget(start, end - start)
                await self._fill_partial(self.remote, offset, len(data))
                await self._call(partial(self.top.may_block, "write", offset, len(data)),
                                 self.top.write, offset, data)
            self.stats.write(offset, len(data), t0)
            return
        async with self._locks.hold(offset, offset + len(data)):
            self._table.forget(offset, len(data))
            await self._call(partial(self.top.may_block, "write", offset, len(data)),
                             self.top.write, offset, data)
        self.stats.write(offset, len(data), t0)

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make the range read as zeroes; unmap lets the top deallocate where it can."""
        self._check_write(offset, length)
        if not length:
            return
        t0 = now()
        if self.remote is not None:
            start, end = self._span(offset, length)
            async with self._locks.hold(start, end):
                await self._table.forget_fenced(start, end - start)
                await self._fill_partial(self.remote, offset, length)
                await self._call(partial(self.top.may_block, "zeroes", offset, length),
                                 partial(self.top.write_zeroes, unmap=unmap), offset, length)
            self._count_zeroes(offset, length, unmap, t0)
            return
        async with self._locks.hold(offset, offset + length):
            await self._table.forget_fenced(offset, length)
            await self._call(partial(self.top.may_block, "zeroes", offset, length),
                             partial(self.top.write_zeroes, unmap=unmap), offset, length)
        self._count_zeroes(offset, length, unmap, t0)

    def _count_zeroes(self, offset: int, length: int, unmap: bool, t0: int) -> None:
        if unmap:
            self.stats.unmap(length, t0)
        else:
            self.stats.write(offset, length, t0)

    async def flush(self) -> None:
        """Make every acknowledged write durable."""
        self._check_open()
        t0 = now()
        if not self.read_only:
            await self._threaded(self.top.flush)
        self.stats.flush(t0)

    async def copy_up(self, offset: int, length: int, *, base: Image | None = None) -> int:
        """Copy into the top every range of [offset, offset+length) that it lacks and that a
        layer above base holds; returns the bytes copied."""
        return await self.copy_up_step(offset, length, base=base)

    async def copy_up_step(self, offset: int, length: int, *, base: Image | None = None,
                           zeroes: bool = True) -> int:
        """copy_up for one stream step that may mix runs to copy, runs the top holds and (with
        zeroes=False) zero runs to leave alone: one range lock and one call for all of them."""
        self._check_open()
        if self.read_only:
            raise _oserror(errno.EROFS, f"drive {self.drive_id} is read-only")
        if offset >= self.size or length <= 0:
            return 0
        start, end = self._span(offset, min(length, self.size - offset))
        async with self._locks.hold(start, end):
            if self.remote is not None:
                self._table.forget(start, end - start)
                return await self.remote.copy_up(self.top, start, end, base, zeroes)
            return await self._copy_up_locked(start, end, base, zeroes)

    # -- dirty bitmaps of the top image (control/bitmaps.py) ------------------------

    def dirty_bitmaps(self) -> list[dict[str, Any]]:
        """QEMU's BlockDirtyInfo of every bitmap, newest first."""
        return self.top.bitmaps.info() if self.top.bitmaps is not None else []

    async def bitmap_op(self, op: str, *args: Any, **kwargs: Any) -> None:
        """Run BitmapSet.<op> (add, remove, clear) on the top image in the worker thread:
        it may write the image (in_use flags, the directory). Raises BitmapError."""
        self._check_open()
        bitmaps = self.top.bitmaps
        if op not in ("add", "remove", "clear"):
            raise ValueError(f"unknown bitmap operation {op!r}")
        if bitmaps is None:
            raise _oserror(errno.ENOTSUP, f"drive {self.drive_id} has no dirty bitmaps")
        await self._table.reset_fenced()  # writes in place must be recorded from now on
        await self._threaded(partial(getattr(bitmaps, op), *args, **kwargs))

    async def block_status(self, offset: int, length: int, *, base: Image | None = None
                           ) -> tuple[int, int | None, Status]:
        """chain_status of the live chain above base: (run, depth or None, status)."""
        self._check_open()
        if self.remote is not None:
            return await self.remote.status(self.top, offset, length, base)
        return await self._call(partial(self._chain_blocks, "status", offset, length),
                                partial(chain_status, self.top, base=base), offset, length)

    @property
    def stream_step(self) -> int:
        """Bytes a stream step should take when nothing else runs: over a network chain,
        the fetch window (requests kept in flight), else 0 (the job's own size)."""
        return self.remote.fetcher.step if self.remote is not None else 0

    @property
    def io_busy(self) -> bool:
        """True while a request holds or waits for a byte range (I/O in flight)."""
        return self._locks.busy

    async def seek(self, offset: int, whence: int) -> int:
        """lseek's SEEK_DATA / SEEK_HOLE over the guest view (vdisk/block/seek.py)."""
        self._check_open()
        return await seek_in(self, offset, whence)

    def chain(self) -> list[Image]:
        """The live chain, top first."""
        return list(iter_chain(self.top))

    def backing_name_for(self, new_backing: Image) -> str:
        """How the top's header should name new_backing: as its overlay named it when that
        name is absolute, else relative to the top's directory."""
        overlay = next((img for img in self.chain() if img.backing is new_backing), None)
        if overlay is None:
            raise ValueError(f"{new_backing.path} is not in the chain of {self.drive_id}")
        name = overlay.backing_name or new_backing.path
        if os.path.isabs(name):
            return name
        return os.path.relpath(new_backing.path, os.path.dirname(os.path.abspath(self.top.path)))

    async def set_backing(self, new_backing: Image | None, *, name: str | None = None) -> None:
        """Make new_backing (an image further down the chain, or None) the top's backing file:
        flush, rewrite the header, switch the live chain, close the dropped images.

        name, if given, is stored in the header instead of backing_name_for(new_backing)
        (block-stream's backing-file)."""
        self._check_open()
        if self.read_only:
            raise _oserror(errno.EROFS, f"drive {self.drive_id} is read-only")
        top = self.top
        if new_backing is top.backing:
            return
        if new_backing is None:
            name = None
        elif name is None:
            name = self.backing_name_for(new_backing)
        fmt = None if new_backing is None else new_backing.format_name
        async with self._locks.hold_all():
            await self._table.reset_fenced()  # the table may name the files dropped here
            await self._threaded(top.flush)
            await self._threaded(top.set_backing, name, fmt)
            dropped: list[Image] = []
            img = top.backing
            while img is not None and img is not new_backing:
                dropped.append(img)
                img = img.backing
            top.backing = new_backing
            remote, below = self.remote, trio.Lock()  # a status call may still be below
            if remote is not None:
                below = remote.below
            self._update_remote()
            async with below:
                for img in dropped:
                    try:
                        await self._threaded(img.close)
                    except OSError as e:  # the switch is done; a close failure is logged
                        log.warning("%s: closing %s failed: %s", self.drive_id, img.path, e)
        log.info("%s: backing file is now %s", self.drive_id, name or "none")

    async def close(self) -> None:
        """Flush (if writable) and close every image of the chain. Idempotent."""
        async with self._locks.hold_all():
            if self._closed:
                return
            self._closed = True
            await self._table.reset_fenced()
            err: BaseException | None = None
            below = self.remote.below if self.remote is not None else trio.Lock()
            async with below:  # no status call of the layers below is under way
                for img in self.chain():
                    try:
                        await self._threaded(img.close)
                    except OSError as e:
                        err = err or e
            if err is not None:
                raise err
