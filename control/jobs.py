"""The job manager: the daemon's block jobs by id, and the QMP policy around them.

The jobs themselves (vdisk.block.job, vdisk.block.stream) are data plane; this module
decides what QMP allows (job ids, one job per drive, streamable drives), in QEMU 7.2's
words for the modern commands and with the seed's classes for block_stream, and turns
the jobs' JobError into QMP error classes. Jobs belong to the daemon: the manager runs
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
    generic,
)
from vdisk.block.job import Job, JobStatus
from vdisk.block.stream import StreamDevice, StreamJob, find_base
from vdisk.engine.image import Image
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


def _seed_checks(drive: str, device: StreamDevice, job_id: str, busy: bool,
                 taken: bool) -> None:
    """The seed's refusals for block_stream, with its classes."""
    if busy:
        raise QMPError(DEVICE_IN_USE, f"Device '{drive}' is in use")
    if taken:
        raise QMPError(DEVICE_IN_USE, f"Job ID '{job_id}' already in use")
    if device.top.format_name != "qcow2":
        raise QMPError(
            NOT_SUPPORTED,
            f"Device '{drive}' cannot stream: its top image is {device.top.format_name}",
        )
    if device.read_only:
        raise QMPError(NOT_SUPPORTED, f"Device '{drive}' is read-only")


class JobManager:
    """All block jobs of one daemon, by job id; at most one job per drive.

    A job stays here (listed, and holding its drive) until it is dismissed: at once when
    it concludes with auto-dismiss, else by job-dismiss / block-job-dismiss.
    """

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

    def get(self, job_id: str) -> StreamJob | None:
        """The job with this id (QEMU looks jobs up by id only)."""
        return self._jobs.get(job_id)

    def find(self, name: str) -> StreamJob:
        """The seed's lookup: the job with this id, or the job on the drive of this name,
        while it has not ended."""
        job = self._jobs.get(name) or self.job_on_drive(name)
        if job is None or job.concluded or job.status is JobStatus.ABORTING:
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
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        seed: bool = False,
    ) -> StreamJob:
        """Check everything, then start the job in the background and return it.

        The checks and their wording are QEMU 7.2's block-stream (in its order: base,
        backing-file, busy drive, read-only, job id, speed), or with `seed` the seed's
        block_stream classes (DeviceInUse, NotSupported, BaseNotFound).
        """
        job_id = job_id if job_id is not None else drive
        busy = self.job_on_drive(drive) is not None
        if seed:
            _seed_checks(drive, device, job_id, busy, job_id in self._jobs)
            with as_qmp_errors():
                base_img = find_base(device.top, base) if base is not None else None
        else:
            base_img = self._qemu_checks(drive, device, job_id, base, backing_file, busy)
        with as_qmp_errors():
            job = StreamJob(
                job_id,
                device,
                base=base_img,
                speed=speed,
                on_error=on_error,
                backing_file=backing_file,
                emit=self._emit,
                on_finish=self._forget,
                auto_finalize=auto_finalize,
                auto_dismiss=auto_dismiss,
            )
        self._jobs[job_id] = job
        self._drive_of[job_id] = drive
        log.info("job %s: stream of drive %s started (%d bytes, base %s, speed %d B/s)",
                 job_id, drive, job.len, base or "none", speed)
        job.start()
        self._spawn(job.run)
        return job

    def _qemu_checks(self, drive: str, device: StreamDevice, job_id: str, base: str | None,
                     backing_file: str | None, busy: bool) -> Image | None:
        base_img = None
        if base is not None:
            try:
                base_img = find_base(device.top, base)
            except JobError:
                raise generic(f"Can't find '{base}' in the backing chain") from None
        if backing_file is not None and base_img is None:
            raise generic("backing file specified, but streaming the entire chain")
        if busy:
            raise generic(f"Node '{drive}' is busy: block device is in use by block job: stream")
        if device.read_only:
            raise generic("Block node is read-only")
        if not JOB_ID.fullmatch(job_id):
            raise generic(f"Invalid job ID '{job_id}'")
        if job_id in self._jobs:
            raise generic(f"Job ID '{job_id}' already in use")
        if device.top.format_name != "qcow2" and device.top.backing is not None:
            raise generic(f"Node '{drive}': cannot stream into a {device.top.format_name} image")
        return base_img

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        self._drive_of.pop(job.id, None)

    async def cancel_all(self) -> None:
        """Cancel every job and wait until each has emitted its final event."""
        jobs = self.jobs()
        for job in jobs:
            job.request_stop()
        for job in jobs:
            await job.done.wait()
