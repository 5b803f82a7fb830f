"""The job manager: the daemon's block jobs by id, and the QMP policy around them.

The jobs themselves (vdisk.block.job, vdisk.block.stream) are data plane; this module
decides what QMP allows (job ids, one job per drive, streamable drives) and turns the
jobs' JobError into QMP error classes. Jobs belong to the daemon: the manager runs
them in a nursery given by its owner and reports through `emit`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from control.errors import (
    BASE_NOT_FOUND,
    DEVICE_IN_USE,
    DEVICE_NOT_ACTIVE,
    GENERIC_ERROR,
    NOT_SUPPORTED,
    QMPError,
)
from vdisk.block.job import Job
from vdisk.block.stream import StreamDevice, StreamJob, find_base
from vdisk.errors import JobError

log = logging.getLogger("vdisk.jobs")

JOB_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")

Emit = Callable[[str, dict[str, Any]], None]
Spawn = Callable[[Callable[[], Awaitable[None]]], None]

QMP_CLASS = {
    "invalid": GENERIC_ERROR,
    "in-use": DEVICE_IN_USE,
    "not-active": DEVICE_NOT_ACTIVE,
    "not-supported": NOT_SUPPORTED,
    "base-not-found": BASE_NOT_FOUND,
}


def qmp_error(exc: JobError) -> QMPError:
    """The QMP error a job's refusal is answered with."""
    return QMPError(QMP_CLASS.get(exc.kind, GENERIC_ERROR), str(exc))


@contextmanager
def as_qmp_errors() -> Iterator[None]:
    """Turn a JobError raised inside into its QMP error."""
    try:
        yield
    except JobError as exc:
        raise qmp_error(exc) from None


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
            raise QMPError(DEVICE_NOT_ACTIVE, f"No active block job on device '{name}'")
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
            raise QMPError(GENERIC_ERROR, f"Invalid job ID '{job_id}'")
        job_id = job_id if job_id is not None else drive
        if self.job_on_drive(drive) is not None:
            raise QMPError(DEVICE_IN_USE, f"Device '{drive}' is in use")
        if job_id in self._jobs:
            raise QMPError(DEVICE_IN_USE, f"Job ID '{job_id}' already in use")
        if device.top.format_name != "qcow2":
            raise QMPError(
                NOT_SUPPORTED,
                f"Device '{drive}' cannot stream: its top image is {device.top.format_name}",
            )
        if device.read_only:
            raise QMPError(NOT_SUPPORTED, f"Device '{drive}' is read-only")
        with as_qmp_errors():
            base_img = find_base(device.top, base) if base is not None else None
            if backing_file is not None and base_img is None:
                raise QMPError(
                    GENERIC_ERROR, "backing-file specified, but streaming the entire chain"
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

    def _forget(self, job: Job) -> None:
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
