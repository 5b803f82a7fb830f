"""The stream job: copy into a drive's top image what its backing chain above base holds.

Chunk by chunk, the job asks the device which layer holds the next run and copies the
runs the top lacks (`copy_up_step`), paced by the rate limit and stepping back while
user I/O is in flight. At the end it flushes, points the top's backing file at base
(or drops it) and switches the live chain.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from vdisk.block.job import Emit, Job, error_text
from vdisk.engine.image import Image, Status
from vdisk.errors import JobError

log = logging.getLogger("vdisk.jobs")

# Bytes copied per step when unthrottled. Measured on a 256 MiB fully allocated chain
# (2 cores, page cache): 256 KiB..4 MiB all stream in 0.2-0.6 s (noise dominates), while
# each step blocks the event loop for longer as it grows (user 4 KiB I/O done meanwhile
# drops from ~175 to ~57 ops at 1 ms spacing). 512 KiB keeps user I/O flowing.
CHUNK = 512 << 10
# Unthrottled and with no user I/O in flight, a step copies this much instead (fewer
# per-step status lookups and scheduler passes; a request arriving meanwhile waits for
# at most one such step, ~2-4 ms, and the next step is CHUNK again).
IDLE_CHUNK = 4 << 20
YIELD_PASSES = 2  # scheduler passes between chunks
YIELD_MAX = 0.002  # seconds a chunk waits at most for in-flight user I/O
MAX_WINDOW = 1 << 40  # largest status query while skipping
ON_ERROR = ("report", "stop", "ignore")
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})

StatusFn = Callable[[int, int], Awaitable[tuple[int, int | None, Status]]]


class StreamDevice(Protocol):
    """What a stream job needs from a block device (vdisk.block.device.BlockDevice)."""

    top: Image
    size: int
    read_only: bool

    @property
    def io_busy(self) -> bool: ...

    @property
    def stream_step(self) -> int: ...

    async def block_status(self, offset: int, length: int, *, base: Image | None = None
                           ) -> tuple[int, int | None, Status]: ...

    async def copy_up(self, offset: int, length: int, *, base: Image | None = None) -> int: ...

    async def copy_up_step(self, offset: int, length: int, *, base: Image | None = None,
                           zeroes: bool = True) -> int: ...

    async def flush(self) -> None: ...

    async def set_backing(self, new_backing: Image | None, *, name: str | None = None) -> None:
        ...


def chain_below(top: Image) -> list[tuple[Image, Image]]:
    """(overlay, image) pairs for every image below top, nearest first."""
    pairs = []
    upper, img = top, top.backing
    while img is not None:
        pairs.append((upper, img))
        upper, img = img, img.backing
    return pairs


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def find_base(top: Image, base: str) -> Image:
    """The image below top that `base` names (stored backing name or same file)."""
    for upper, img in chain_below(top):
        if base == upper.backing_name:
            return img
    for _, img in chain_below(top):
        if _same_file(base, img.path):
            return img
    raise JobError("base-not-found", f"Base '{base}' not found")


def error_operation(exc: OSError) -> str:
    """'write' for errors that come from writing the top, else 'read'."""
    return "write" if exc.errno in WRITE_ERRNOS else "read"


class StreamJob(Job):
    """One stream job on one drive."""

    type = "stream"

    def __init__(
        self,
        job_id: str,
        device: StreamDevice,
        *,
        base: Image | None = None,
        speed: int = 0,
        on_error: str = "report",
        backing_file: str | None = None,
        emit: Emit | None = None,
        status_fn: StatusFn | None = None,
        chunk: int = CHUNK,
        on_finish: Callable[[Job], None] | None = None,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
    ) -> None:
        if on_error not in ON_ERROR:
            raise JobError("invalid", f"Parameter 'on-error' does not accept value '{on_error}'")
        super().__init__(job_id, device.size, speed=speed, emit=emit, on_finish=on_finish,
                         auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.device = device
        self.base = base
        self.on_error = on_error
        self.backing_file = backing_file  # name to store instead of base's own
        self.copied = 0
        self._status_fn = status_fn or self._device_status
        self._chunk = max(chunk, device.top.cluster_size)
        self._idle_chunk = max(IDLE_CHUNK, self._chunk) if chunk == CHUNK else self._chunk

    async def _device_status(self, offset: int, length: int) -> tuple[int, int | None, Status]:
        return await self.device.block_status(offset, length, base=self.base)

    def _step_size(self) -> int:
        """Bytes to copy in one step: a chunk, or one slice's quota when throttled."""
        cluster = self.device.top.cluster_size
        quota = self._limiter.quota()
        if quota == 0:
            if self.device.io_busy:
                return self._chunk
            return max(self._idle_chunk, self.device.stream_step)
        return max(cluster, min(self._chunk, quota // cluster * cluster))

    async def _checkpoint(self) -> bool:
        go_on = await super()._checkpoint()
        if go_on:
            await self._yield_to_io()
        return go_on and not self.cancel_requested

    async def _yield_to_io(self) -> None:
        """Let user I/O run between chunks: while requests are in flight on the device,
        step back (for at most YIELD_MAX seconds per chunk)."""
        for _ in range(YIELD_PASSES):  # a request read meanwhile gets through its steps
            await trio.lowlevel.checkpoint()
        deadline = trio.current_time() + YIELD_MAX
        while self.device.io_busy and trio.current_time() < deadline:
            await trio.sleep(0.0002)

    async def _handle_error(self, exc: OSError) -> str:
        """Apply the on-error policy; returns 'retry', 'skip' or 'stop'."""
        op = error_operation(exc)
        action = self.on_error
        self._emit("BLOCK_JOB_ERROR", {"device": self.id, "operation": op, "action": action})
        if action == "stop":
            self.io_status = "nospace" if exc.errno == errno.ENOSPC else "failed"
            self.paused = True
            return "retry"
        if self.error is None:
            self.error = error_text(exc)
        return "skip" if action == "ignore" else "stop"

    def _needs_copy(self, depth: int | None, status: Status) -> bool:
        """Whether a run some layer below the top holds must be copied up.

        Zeroes need copying only when something would otherwise show through, i.e.
        when the top keeps a backing file (base): without one, what the top lacks
        reads as zeroes anyway (this keeps a sparse raw bottom image sparse).
        """
        if not depth:
            return False  # held by the top (0), or by nobody above base (None)
        return status is not Status.ZERO or self.base is not None

    async def _work(self) -> None:
        top = self.device.top
        if top.backing is None or top.backing is self.base:
            self.len = self.offset = 0  # nothing above base to copy (QEMU: no progress)
            return
        window = self._chunk  # status look-ahead: grows over skipped runs, resets on copy
        precise = False  # after a failed step: copy run by run, so errors hit one run
        while self.offset < self.len:
            if not await self._checkpoint():
                return
            step = self._step_size()
            ask = min(max(window, step), self.len - self.offset)
            run, depth, status = await self._status_fn(self.offset, ask)
            run = max(1, min(run, ask))
            needs_copy = self._needs_copy(depth, status)
            if needs_copy:
                window = self._chunk
            elif run == ask:
                window = min(window * 4, MAX_WINDOW)
            if needs_copy:
                if not precise:
                    # the whole step in one call: the device skips what needs no copy
                    first, run = run, min(max(run, step), self.len - self.offset)
                else:
                    first = run = min(run, step)
                try:
                    if precise:
                        copied = await self.device.copy_up(self.offset, run, base=self.base)
                    else:
                        copied = await self.device.copy_up_step(
                            self.offset, run, base=self.base, zeroes=self.base is not None)
                    precise = False
                except OSError as exc:
                    if run > first:
                        precise = True  # redo this step run by run: the policy applies there
                        continue
                    precise = False
                    verdict = await self._handle_error(exc)
                    if verdict == "retry":
                        continue
                    if verdict == "stop":
                        return
                    copied = 0
                self.copied += copied
                self._charge(copied)
            self.offset += run

    async def _abort(self) -> None:
        """A job ending early still flushes what it copied (the top's metadata is a
        write-back cache): the copies are on disk when the final event is sent."""
        if not self.copied:
            return
        try:
            await self.device.flush()
        except OSError as exc:
            log.warning("job %s: flushing the copied data failed: %s", self.id, exc)

    async def _prepare(self) -> None:
        """Flush what was copied: it is on disk before the header points past it."""
        await self.device.flush()

    async def _commit(self) -> None:
        """Repoint the header at base (or drop the backing file) and switch the chain."""
        if self.device.top.backing is not self.base:
            if self.backing_file is not None:
                await self.device.set_backing(self.base, name=self.backing_file)
            else:
                await self.device.set_backing(self.base)
