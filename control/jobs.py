"""Block jobs: the job manager and the stream job's state machine.

A stream job copies into a drive's top image every range the top lacks that an image
above `base` holds, chunk by chunk, then flushes, points the top's backing file at
`base` (or drops it) and switches the live chain. Jobs belong to the daemon: the
manager runs them in a nursery given by its owner and reports through `emit`.

States (the QAPI JobStatus names used here): created -> running <-> paused ->
aborting (cancelled or failed) | pending (finishing) -> concluded. A job is listed
until its final event (BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED) is emitted.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

import trio

from control.errors import QMPError
from vdisk.block.ratelimit import RateLimiter
from vdisk.engine.chain import chain_status
from vdisk.engine.image import Image, Status

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
JOB_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
ON_ERROR = ("report", "stop", "ignore")
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})

Emit = Callable[[str, dict[str, Any]], None]
Spawn = Callable[[Callable[[], Awaitable[None]]], None]


class StreamDevice(Protocol):
    """What a stream job needs from a block device (vdisk.block.device.BlockDevice)."""

    top: Image
    size: int
    read_only: bool

    async def copy_up(self, offset: int, length: int, *, base: Image | None = None) -> int: ...

    async def flush(self) -> None: ...

    async def set_backing(self, new_backing: Image | None, *, name: str | None = None) -> None:
        ...


StatusFn = Callable[[int, int], Awaitable[tuple[int, int | None, Status]]]


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
    raise QMPError("BaseNotFound", f"Base '{base}' not found")


def error_operation(exc: OSError) -> str:
    """'write' for errors that come from writing the top, else 'read'."""
    op = getattr(exc, "operation", None)
    if op in ("read", "write"):
        return str(op)
    return "write" if exc.errno in WRITE_ERRNOS else "read"


def error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class StreamJob:
    """One stream job on one drive. Drive it with `await job.run()`."""

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
        on_finish: Callable[[StreamJob], None] | None = None,
    ) -> None:
        if speed < 0:
            raise QMPError("GenericError", "Parameter 'speed' expects a non-negative value")
        if on_error not in ON_ERROR:
            raise QMPError("GenericError", f"Parameter 'on-error' does not accept value '{on_error}'")
        self.id = job_id
        self.device = device
        self.base = base
        self.len = device.size
        self.offset = 0
        self.speed = speed
        self.on_error = on_error
        self.backing_file = backing_file  # name to store instead of base's own
        self.status = "created"
        self.busy = False
        self.paused = False  # a pause was requested (by the user or the stop policy)
        self.io_status = "ok"
        self.error: str | None = None
        self.cancel_requested = False
        self.copied = 0
        self._emit = emit or (lambda name, data: None)
        self._status_fn = status_fn or self._default_status
        self._on_finish = on_finish
        self._chunk = max(chunk, device.top.cluster_size)
        self._idle_chunk = max(IDLE_CHUNK, self._chunk) if chunk == CHUNK else self._chunk
        self._limiter = RateLimiter(speed)
        self._wake = trio.Event()
        self.done = trio.Event()

    # ---- control (sync: safe to call from any task in the same trio run) ----

    def set_speed(self, speed: int) -> None:
        if speed < 0:
            raise QMPError("GenericError", "Parameter 'speed' expects a non-negative value")
        self.speed = speed
        self._limiter.set_speed(speed)
        self._kick()

    def cancel(self) -> None:
        if self.cancel_requested:
            raise QMPError("DeviceInUse", f"Block job '{self.id}' is already being cancelled")
        self.cancel_requested = True
        self._kick()

    def pause(self) -> None:
        if self.paused:
            raise QMPError("GenericError", f"Job '{self.id}' is already paused")
        self.paused = True
        self._kick()

    def resume(self) -> None:
        if not self.paused:
            raise QMPError("GenericError", f"Job '{self.id}' is not paused")
        self.paused = False
        self.io_status = "ok"
        self._kick()

    def info(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "device": self.id,
            "len": self.len,
            "offset": self.offset,
            "speed": self.speed,
            "busy": self.busy,
            "paused": self.paused,
            "ready": False,
            "status": self.status,
            "io-status": self.io_status,
        }

    def _kick(self) -> None:
        self._wake.set()
        self._wake = trio.Event()

    # ---- the job ----

    async def _default_status(self, offset: int, length: int) -> tuple[int, int | None, Status]:
        """Block status above base, serialized with the device's other engine calls."""
        dev: Any = self.device
        fn = getattr(dev, "block_status", None)
        if fn is not None:
            return await fn(offset, length, base=self.base)
        call = partial(chain_status, dev.top, offset, length, base=self.base)
        inline = getattr(dev, "_inline", None)
        return await inline(call) if inline is not None else call()

    def _step_size(self) -> int:
        """Bytes to copy in one step: a chunk, or one slice's quota when throttled."""
        cluster = self.device.top.cluster_size
        quota = self._limiter.quota()
        if quota == 0:
            return self._chunk if getattr(self.device, "io_busy", False) else self._idle_chunk
        return max(cluster, min(self._chunk, quota // cluster * cluster))

    async def _checkpoint(self) -> bool:
        """Wait out the rate limit and any pause; False once cancelled."""
        while not self.cancel_requested:
            if self.paused:
                self.status, self.busy = "paused", False
                await self._wake.wait()
                continue
            delay = self._limiter.delay(trio.current_time())
            if delay <= 0:
                break
            self.busy = False
            with trio.move_on_after(delay):
                await self._wake.wait()
        self.status, self.busy = "running", True
        await self._yield_to_io()
        return not self.cancel_requested

    async def _yield_to_io(self) -> None:
        """Let user I/O run between chunks: while requests are in flight on the device,
        step back (for at most YIELD_MAX seconds per chunk)."""
        for _ in range(YIELD_PASSES):  # a request read meanwhile gets through its steps
            await trio.lowlevel.checkpoint()
        deadline = trio.current_time() + YIELD_MAX
        while getattr(self.device, "io_busy", False) and trio.current_time() < deadline:
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

    async def _copy_all(self) -> None:
        top = self.device.top
        if top.backing is None or top.backing is self.base:
            self.offset = self.len  # nothing above base to copy
            return
        window = self._chunk  # status look-ahead: grows over skipped runs, resets on copy
        wide = getattr(self.device, "copy_up_step", None)
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
                if wide is not None and not precise:
                    # the whole step in one call: the device skips what needs no copy
                    first, run = run, min(max(run, step), self.len - self.offset)
                    call = partial(wide, self.offset, run, base=self.base,
                                   zeroes=self.base is not None)
                else:
                    first = run = min(run, step)
                    call = partial(self.device.copy_up, self.offset, run, base=self.base)
                try:
                    copied = await call()
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
                self._limiter.charge(copied, trio.current_time())
            self.offset += run

    async def run(self) -> None:
        """Run to the end and emit the final event (also when cancelled from outside)."""
        self.status, self.busy = "running", True
        final: tuple[str, dict[str, Any]] | None = None
        try:
            try:
                await self._copy_all()
            except Exception as exc:  # a bug or an unexpected failure: end the job, not the daemon
                log.exception("job %s failed", self.id)
                self.error = self.error or error_text(exc)
            if self.cancel_requested:
                self.status = "aborting"
                await self._keep_copied()
                final = ("BLOCK_JOB_CANCELLED", self._event_data())
            elif self.error is not None:
                self.status = "aborting"
                await self._keep_copied()
                final = ("BLOCK_JOB_COMPLETED", self._event_data(error=self.error))
            else:
                self.status = "pending"
                try:
                    await self._finish()
                except Exception as exc:
                    log.exception("job %s: completion failed", self.id)
                    self.error = error_text(exc)
                final = ("BLOCK_JOB_COMPLETED", self._event_data(error=self.error))
        finally:
            self.status, self.busy = "concluded", False
            if final is None:  # torn down from outside (daemon stop): still say so
                final = ("BLOCK_JOB_CANCELLED", self._event_data())
            if self._on_finish is not None:
                self._on_finish(self)
            self._emit(*final)
            self.done.set()

    async def _keep_copied(self) -> None:
        """A job ending early still flushes what it copied (the top's metadata is a
        write-back cache): the copies are on disk when the final event is sent."""
        if not self.copied:
            return
        try:
            await self.device.flush()
        except OSError as exc:
            log.warning("job %s: flushing the copied data failed: %s", self.id, exc)

    async def _finish(self) -> None:
        """Flush what was copied, then repoint the header and switch the live chain."""
        await self.device.flush()
        if self.device.top.backing is not self.base:
            if self.backing_file is not None:
                await self.device.set_backing(self.base, name=self.backing_file)
            else:
                await self.device.set_backing(self.base)

    def _event_data(self, error: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "type": self.type,
            "device": self.id,
            "len": self.len,
            "offset": self.offset,
            "speed": self.speed,
        }
        if error is not None:
            data["error"] = error
        return data


class JobManager:
    """All block jobs of one daemon, by job id; at most one job per drive."""

    def __init__(self, emit: Emit, spawn: Spawn) -> None:
        self._emit = emit
        self._spawn = spawn
        self._jobs: dict[str, StreamJob] = {}
        self._drive_of: dict[str, str] = {}  # job id -> drive id

    def jobs(self) -> list[StreamJob]:
        return list(self._jobs.values())

    def job_on_drive(self, drive: str) -> StreamJob | None:
        for job_id, d in self._drive_of.items():
            if d == drive:
                return self._jobs[job_id]
        return None

    def find(self, name: str) -> StreamJob:
        """The job with this id, or the job on the drive of this name."""
        job = self._jobs.get(name) or self.job_on_drive(name)
        if job is None:
            raise QMPError("DeviceNotActive", f"No active block job on device '{name}'")
        return job

    def start_stream(
        self,
        drive: str,
        device: StreamDevice,
        *,
        job_id: str | None = None,
        base: str | None = None,
        speed: int = 0,
        on_error: str = "report",
        backing_file: str | None = None,
    ) -> StreamJob:
        """Check everything, then start the job in the background and return it."""
        if job_id is not None and not JOB_ID.fullmatch(job_id):
            raise QMPError("GenericError", f"Invalid job ID '{job_id}'")
        job_id = job_id if job_id is not None else drive
        if self.job_on_drive(drive) is not None:
            raise QMPError("DeviceInUse", f"Device '{drive}' is in use")
        if job_id in self._jobs:
            raise QMPError("DeviceInUse", f"Job ID '{job_id}' already in use")
        if device.top.format_name != "qcow2":
            raise QMPError(
                "NotSupported",
                f"Device '{drive}' cannot stream: its top image is {device.top.format_name}",
            )
        if device.read_only:
            raise QMPError("NotSupported", f"Device '{drive}' is read-only")
        base_img = find_base(device.top, base) if base is not None else None
        if backing_file is not None and base_img is None:
            raise QMPError(
                "GenericError", "backing-file specified, but streaming the entire chain"
            )
        job = StreamJob(
            job_id,
            device,
            base=base_img,
            speed=speed,
            on_error=on_error,
            backing_file=backing_file,
            emit=self._emit,
            on_finish=self._forget,
        )
        self._jobs[job_id] = job
        self._drive_of[job_id] = drive
        log.info("job %s: stream of drive %s started (%d bytes, base %s, speed %d B/s)",
                 job_id, drive, job.len, base or "none", speed)
        self._spawn(job.run)
        return job

    def _forget(self, job: StreamJob) -> None:
        self._jobs.pop(job.id, None)
        self._drive_of.pop(job.id, None)

    async def cancel_all(self) -> None:
        """Cancel every job and wait until each has emitted its final event."""
        jobs = self.jobs()
        for job in jobs:
            if not job.cancel_requested:
                job.cancel()
        for job in jobs:
            await job.done.wait()
