"""A block job's life: its status, the control verbs, pacing, and its final event.

The status names and the allowed transitions are QEMU's JobStatus (qapi/job.json,
job.c's transition table), for the statuses a job that finishes by itself goes
through: created -> running <-> paused; running -> waiting -> pending -> concluded;
a cancelled or failed job goes through aborting. A subclass does the work in
`_work()` and its completion in `_complete()`, and calls `_checkpoint()` between
steps, where pauses, cancellation and the rate limit take effect.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from typing import Any

import trio

from vdisk.block.ratelimit import RateLimiter
from vdisk.errors import JobError

log = logging.getLogger("vdisk.jobs")

Emit = Callable[[str, dict[str, Any]], None]

NEGATIVE_SPEED = "Parameter 'speed' expects a non-negative value"


class JobStatus(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"


S = JobStatus
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.CREATED: frozenset({S.RUNNING, S.ABORTING}),
    S.RUNNING: frozenset({S.PAUSED, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset(),
}


def error_text(exc: BaseException) -> str:
    """How a job's error is worded in its final event (strerror for OS errors)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class Job:
    """The state and control of one job; drive it with `await job.run()`."""

    type = "job"

    def __init__(self, job_id: str, length: int, *, speed: int = 0,
                 emit: Emit | None = None,
                 on_finish: Callable[[Job], None] | None = None) -> None:
        if speed < 0:
            raise JobError("invalid", NEGATIVE_SPEED)
        self.id = job_id
        self.len = length
        self.offset = 0
        self.speed = speed
        self.status = JobStatus.CREATED
        self.busy = False
        self.paused = False  # a pause was requested (by the user or the stop policy)
        self.io_status = "ok"
        self.error: str | None = None
        self.cancel_requested = False
        self._emit = emit or (lambda name, data: None)
        self._on_finish = on_finish
        self._limiter = RateLimiter(speed)
        self._wake = trio.Event()
        self.done = trio.Event()

    # ---- status ----

    def _to(self, status: JobStatus) -> None:
        """Move to status; a transition QEMU's table forbids is a bug here."""
        if status is not self.status and status not in TRANSITIONS[self.status]:
            raise RuntimeError(f"job {self.id}: {self.status} -> {status} is not a transition")
        self.status = status

    # ---- control (sync: safe to call from any task in the same trio run) ----

    def set_speed(self, speed: int) -> None:
        if speed < 0:
            raise JobError("invalid", NEGATIVE_SPEED)
        self.speed = speed
        self._limiter.set_speed(speed)
        self._kick()

    def cancel(self) -> None:
        if self.cancel_requested:
            raise JobError("in-use", f"Block job '{self.id}' is already being cancelled")
        self.cancel_requested = True
        self._kick()

    def pause(self) -> None:
        if self.paused:
            raise JobError("invalid", f"Job '{self.id}' is already paused")
        self.paused = True
        self._kick()

    def resume(self) -> None:
        if not self.paused:
            raise JobError("invalid", f"Job '{self.id}' is not paused")
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
            "status": str(self.status),
            "io-status": self.io_status,
        }

    def _kick(self) -> None:
        self._wake.set()
        self._wake = trio.Event()

    # ---- pacing ----

    async def _checkpoint(self) -> bool:
        """Wait out the rate limit and any pause; False once cancelled."""
        while not self.cancel_requested:
            if self.paused:
                self._to(JobStatus.PAUSED)
                self.busy = False
                await self._wake.wait()
                continue
            delay = self._limiter.delay(trio.current_time())
            if delay <= 0:
                break
            self.busy = False
            with trio.move_on_after(delay):
                await self._wake.wait()
        self._to(JobStatus.RUNNING)
        self.busy = True
        return not self.cancel_requested

    def _charge(self, nbytes: int) -> None:
        """Count work done against the rate limit."""
        self._limiter.charge(nbytes, trio.current_time())

    # ---- the run ----

    async def _work(self) -> None:
        """The job's work, calling _checkpoint() between steps (subclasses)."""
        raise NotImplementedError

    async def _complete(self) -> None:
        """What a job that did all its work does before it concludes (subclasses)."""

    async def _abort(self) -> None:
        """What a cancelled or failed job does before it concludes (subclasses)."""

    async def run(self) -> None:
        """Run to the end and emit the final event (also when cancelled from outside)."""
        self._to(JobStatus.RUNNING)
        self.busy = True
        final: tuple[str, dict[str, Any]] | None = None
        try:
            try:
                await self._work()
            except Exception as exc:  # a bug or an unexpected failure: end the job, not the daemon
                log.exception("job %s failed", self.id)
                self.error = self.error or error_text(exc)
            if self.cancel_requested or self.error is not None:
                self._to(JobStatus.ABORTING)
                await self._abort()
                final = (("BLOCK_JOB_CANCELLED", self._event_data()) if self.cancel_requested
                         else ("BLOCK_JOB_COMPLETED", self._event_data(error=self.error)))
            else:
                self._to(JobStatus.WAITING)
                self._to(JobStatus.PENDING)
                try:
                    await self._complete()
                except Exception as exc:
                    log.exception("job %s: completion failed", self.id)
                    self.error = error_text(exc)
                final = ("BLOCK_JOB_COMPLETED", self._event_data(error=self.error))
        finally:
            if final is None:  # torn down from outside (daemon stop): still say so
                if self.status is JobStatus.PAUSED:
                    self._to(JobStatus.RUNNING)
                self._to(JobStatus.ABORTING)
                final = ("BLOCK_JOB_CANCELLED", self._event_data())
            self._to(JobStatus.CONCLUDED)
            self.busy = False
            if self._on_finish is not None:
                self._on_finish(self)
            self._emit(*final)
            self.done.set()

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
