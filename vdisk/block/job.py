"""A block job's life: QEMU's job state machine, the control verbs, pacing, and events.

The statuses, the transitions and which verb each status accepts are QEMU's (qapi/job.json
JobStatus and JobVerb, job.c's JobSTT and JobVerbTable). A stream goes
created -> running (<-> paused) -> waiting -> pending -> concluded -> null; a cancelled or
failed job goes through aborting instead of completing. Each change of status is emitted
as JOB_STATUS_CHANGE {id, status}, in QEMU's order relative to the block job events:

    running -> waiting -> pending [BLOCK_JOB_PENDING, then finalize] BLOCK_JOB_COMPLETED
    -> concluded [dismiss] -> null;   ... -> aborting BLOCK_JOB_CANCELLED -> concluded ...

With auto-finalize off, a job that did its work waits in `pending` (BLOCK_JOB_PENDING)
until `finalize()` (it then completes: the stream rewrites the backing file) or `cancel()`
(it aborts and keeps the backing file). With auto-dismiss off, a concluded job stays
listed, with its error, until `dismiss()`. A subclass does the work in `_work()`, calling
`_checkpoint()` between steps (where pauses, cancellation and the rate limit take effect),
and its completion in `_prepare()` (may fail; a cancel meanwhile still aborts) and
`_commit()` (the switch itself: once it starts, the job completes).
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
CANCELED = os.strerror(125)  # ECANCELED: the error a cancelled job is listed with


class JobStatus(enum.StrEnum):
    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class Verb(enum.StrEnum):
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"


S = JobStatus
# job.c's JobSTT: the statuses each status may move to.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}
_LIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})
# job.c's JobVerbTable: the statuses in which each verb is accepted.
VERBS: dict[Verb, frozenset[JobStatus]] = {
    Verb.CANCEL: _LIVE | {S.WAITING, S.PENDING},
    Verb.PAUSE: _LIVE,
    Verb.RESUME: _LIVE,
    Verb.SET_SPEED: _LIVE,
    Verb.COMPLETE: frozenset({S.READY}),
    Verb.FINALIZE: frozenset({S.PENDING}),
    Verb.DISMISS: frozenset({S.CONCLUDED}),
}


def error_text(exc: BaseException) -> str:
    """How a job's error is worded in its final event (strerror for OS errors)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class Job:
    """The state and control of one job; start it with `start()`, then `await run()`."""

    type = "job"

    def __init__(self, job_id: str, length: int, *, speed: int = 0,
                 auto_finalize: bool = True, auto_dismiss: bool = True,
                 emit: Emit | None = None,
                 on_finish: Callable[[Job], None] | None = None) -> None:
        self.id = job_id
        self.len = length
        self.offset = 0
        self.speed = speed
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.status = JobStatus.UNDEFINED
        self.busy = False
        self.paused = False  # a pause was asked for (by the user or the stop policy)
        self.io_status = "ok"
        self.error: str | None = None  # the failure the job ends with
        self.cancel_requested = False
        self.finalize_requested = False
        self.committing = False  # _commit() has begun: the job can no longer abort
        self._emit = emit or (lambda name, data: None)
        self._on_finish = on_finish  # called once the job is gone (status null)
        self._limiter = RateLimiter(max(speed, 0))
        self._wake = trio.Event()
        self.done = trio.Event()  # set once concluded (the final event was sent)
        self._to(JobStatus.CREATED)
        if speed < 0:  # QEMU creates the job, then drops it (created -> null)
            self._to(JobStatus.NULL)
            raise JobError("invalid", NEGATIVE_SPEED)

    # ---- status ----

    def _to(self, status: JobStatus) -> None:
        """Move to status (emitting JOB_STATUS_CHANGE); a move QEMU forbids is a bug."""
        if status is self.status:
            return
        if status not in TRANSITIONS[self.status]:
            raise RuntimeError(f"job {self.id}: {self.status} -> {status} is not a transition")
        self.status = status
        self._emit("JOB_STATUS_CHANGE", {"id": self.id, "status": str(status)})

    def accepts(self, verb: Verb) -> bool:
        return self.status in VERBS[verb]

    def _verb(self, verb: Verb) -> None:
        if not self.accepts(verb):
            raise JobError("invalid", f"Job '{self.id}' in state '{self.status}' cannot "
                                      f"accept command verb '{verb}'")

    @property
    def concluded(self) -> bool:
        return self.status in (JobStatus.CONCLUDED, JobStatus.NULL)

    # ---- control (sync: safe to call from any task in the same trio run) ----

    def start(self) -> None:
        """created -> running; `run()` does the work."""
        if self.status is JobStatus.CREATED:
            self._to(JobStatus.RUNNING)
            self.busy = True

    def set_speed(self, speed: int) -> None:
        self._verb(Verb.SET_SPEED)
        if speed < 0:
            raise JobError("invalid", NEGATIVE_SPEED)
        self.speed = speed
        self._limiter.set_speed(speed)
        self._kick()

    def cancel(self) -> None:
        """Cancel (QEMU's force cancel: also a paused job); in pending, abort."""
        self._verb(Verb.CANCEL)
        if self.committing:  # the switch is being written: the job can only complete
            raise JobError("invalid", f"Job '{self.id}' is completing and cannot be cancelled")
        self.cancel_requested = True
        self.paused = False
        self._kick()

    def request_stop(self) -> bool:
        """Cancel unless the job is past it (ending, completing or cancelled already);
        whether it was cancelled now. For a daemon or command that stops."""
        if self.cancel_requested or self.committing or not self.accepts(Verb.CANCEL):
            return False
        self.cancel()
        return True

    def pause(self) -> None:
        self._verb(Verb.PAUSE)
        if self.paused:
            raise JobError("invalid", "Job is already paused")
        self.paused = True
        self._kick()

    def resume(self) -> None:
        if not self.paused:
            raise JobError("invalid", "Can't resume a job that was not paused")
        self._verb(Verb.RESUME)
        self.paused = False
        self.io_status = "ok"
        self._kick()

    def complete(self) -> None:
        """A stream is never ready: QEMU refuses complete in every status it passes."""
        self._verb(Verb.COMPLETE)
        raise JobError("invalid", f"The active block job '{self.id}' cannot be completed")

    def finalize(self) -> None:
        self._verb(Verb.FINALIZE)
        self.finalize_requested = True
        self._kick()

    def dismiss(self) -> None:
        self._verb(Verb.DISMISS)
        self._dismiss()

    def _dismiss(self) -> None:
        self._to(JobStatus.NULL)
        if self._on_finish is not None:
            self._on_finish(self)

    # ---- queries ----

    def info(self) -> dict[str, Any]:
        """The job's query-block-jobs entry (QEMU's BlockJobInfo)."""
        info: dict[str, Any] = {
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
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.concluded and self.failure is not None:
            info["error"] = self.failure
        return info

    def job_info(self) -> dict[str, Any]:
        """The job's query-jobs entry (QEMU's JobInfo)."""
        info: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "status": str(self.status),
            "current-progress": self.offset,
            "total-progress": self.len,
        }
        if self.concluded and self.failure is not None:
            info["error"] = self.failure
        return info

    @property
    def failure(self) -> str | None:
        """What the job is listed with once it ended badly (QEMU's job->err)."""
        if self.error is not None:
            return self.error
        return CANCELED if self.cancel_requested else None

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

    async def _prepare(self) -> None:
        """What completing needs before the switch (subclasses; e.g. a flush)."""

    async def _commit(self) -> None:
        """The switch a completed job makes (subclasses)."""

    async def _abort(self) -> None:
        """What a cancelled or failed job does before it concludes (subclasses)."""

    async def _await_finalize(self) -> None:
        self._emit("BLOCK_JOB_PENDING", {"type": self.type, "id": self.id})
        self.busy = False
        while not (self.finalize_requested or self.cancel_requested):
            await self._wake.wait()

    async def _finish(self) -> None:
        """waiting -> pending, then (finalized) prepare and commit; errors end in self.error."""
        self._to(JobStatus.WAITING)
        self._to(JobStatus.PENDING)
        if not self.auto_finalize:
            await self._await_finalize()
        if self.cancel_requested:
            return
        self.busy = True
        try:
            await self._prepare()
            if not self.cancel_requested:
                self.committing = True
                await self._commit()
        except Exception as exc:
            log.exception("job %s: completion failed", self.id)
            self.error = error_text(exc)

    async def run(self) -> None:
        """Run to the end and emit the final event (also when cancelled from outside)."""
        self.start()
        final: tuple[str, dict[str, Any]] | None = None
        try:
            try:
                await self._work()
            except Exception as exc:  # a bug or an unexpected failure: end the job, not the daemon
                log.exception("job %s failed", self.id)
                self.error = self.error or error_text(exc)
            if not (self.cancel_requested or self.error is not None):
                await self._finish()
            if self.committing and self.error is None:
                final = ("BLOCK_JOB_COMPLETED", self._event_data())
            else:
                self._to(JobStatus.ABORTING)
                await self._abort()
                final = (("BLOCK_JOB_CANCELLED", self._event_data()) if self.cancel_requested
                         else ("BLOCK_JOB_COMPLETED", self._event_data(error=self.error)))
        finally:
            if final is None:  # torn down from outside (daemon stop): still say so
                self.cancel_requested = True
                if self.status is JobStatus.PAUSED:
                    self._to(JobStatus.RUNNING)
                self._to(JobStatus.ABORTING)
                final = ("BLOCK_JOB_CANCELLED", self._event_data())
            self.busy = False
            self._emit(*final)
            self._to(JobStatus.CONCLUDED)
            self.done.set()
            if self.auto_dismiss:
                self._dismiss()

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
