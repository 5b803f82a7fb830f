"""The block job QMP commands, in the seed's spelling and QEMU's modern one.

Seed (QEMU 1.1, the seed's error classes): block_stream, block_job_set_speed,
block_job_cancel. Modern (QEMU 7.2's answers, word for word): block-stream,
block-job-set-speed, block-job-cancel, block-job-pause, block-job-resume,
block-job-complete, block-job-finalize, block-job-dismiss, query-block-jobs, and the
generic job commands job-cancel, job-pause, job-resume, job-complete, job-finalize,
job-dismiss, query-jobs. As in QEMU, the modern commands find a job by its id only
("Block job 'x' not found" for block-job-*, "Job not found" for job-*); the seed's
accept the job id or the drive id.

The daemon wires them with `register_block_jobs(registry, manager, lookup)`, where
`lookup(drive_id)` returns the drive's BlockDevice or None. When `manager`/`lookup`
are not given, they are taken from the backend at call time (`ctx.backend.jobs` and
`ctx.backend.block_device(drive_id)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from control.errors import (
    DEVICE_IN_USE,
    DEVICE_NOT_ACTIVE,
    DEVICE_NOT_FOUND,
    GENERIC_ERROR,
    QMPError,
    generic,
)
from control.jobs import JobManager, as_qmp_errors
from control.nodes import stream_target
from control.registry import Context, Enum, Handler, Registry
from vdisk.block.job import NEGATIVE_SPEED, Verb
from vdisk.block.stream import StreamDevice, StreamJob

Lookup = Callable[[str], StreamDevice | None]


@runtime_checkable
class JobsBackend(Protocol):
    """What the block job commands need from the backend when not given them directly."""

    jobs: JobManager

    def block_device(self, drive_id: str) -> StreamDevice | None: ...

ON_ERROR = Enum("report", "stop", "ignore")


def register_block_jobs(
    registry: Registry, manager: JobManager | None = None, lookup: Lookup | None = None
) -> None:
    """Add every block job command (both spellings) and the job-* commands to `registry`."""

    def backend(ctx: Context) -> JobsBackend:
        if not isinstance(ctx.backend, JobsBackend):
            raise QMPError(GENERIC_ERROR, "this server runs no block jobs")
        return ctx.backend

    def jobs(ctx: Context) -> JobManager:
        return manager if manager is not None else backend(ctx).jobs

    def device(ctx: Context, drive: str, *, seed: bool) -> StreamDevice:
        find = lookup if lookup is not None else backend(ctx).block_device
        dev = find(drive)
        if dev is None:
            if seed:
                raise QMPError(DEVICE_NOT_FOUND, f"Device '{drive}' not found")
            raise generic(f"Cannot find device='{drive}' nor node-name='{drive}'")
        return dev

    def block_job(ctx: Context, job_id: str) -> StreamJob:
        """QEMU's find_block_job: by job id; DeviceNotActive if there is none."""
        job = jobs(ctx).get(job_id)
        if job is None:
            raise QMPError(DEVICE_NOT_ACTIVE, f"Block job '{job_id}' not found")
        return job

    def any_job(ctx: Context, job_id: str) -> StreamJob:
        """QEMU's find_job (job-* commands): by job id; GenericError if there is none."""
        job = jobs(ctx).get(job_id)
        if job is None:
            raise generic("Job not found")
        return job

    def seed_job(ctx: Context, name: str, verb: Verb) -> StreamJob:
        """The seed's lookup (job or drive id): a job that cannot take `verb` now is not
        active, as the seed answered."""
        job = jobs(ctx).find(name)
        if not job.accepts(verb) or job.committing:
            raise QMPError(DEVICE_NOT_ACTIVE, f"No active block job on device '{name}'")
        return job

    async def stream(ctx: Context, args: dict[str, Any]) -> None:
        # the device as a drive id or a node name; base-node as the base's file name
        drive, base, backing_file = stream_target(
            ctx.backend, args["device"], args.get("base"), args.get("base-node"),
            args.get("backing-file"))
        with as_qmp_errors():
            jobs(ctx).start_stream(
                drive,
                device(ctx, drive, seed=False),
                job_id=args.get("job-id"),
                base=base,
                speed=args.get("speed", 0),
                on_error=args.get("on-error", "report"),
                backing_file=backing_file,
                auto_finalize=args.get("auto-finalize", True),
                auto_dismiss=args.get("auto-dismiss", True),
            )

    async def stream_old(ctx: Context, args: dict[str, Any]) -> None:
        drive = args["device"]
        dev = device(ctx, drive, seed=True)
        jobs(ctx).start_stream(drive, dev, base=args.get("base"), seed=True)

    async def set_speed_old(ctx: Context, args: dict[str, Any]) -> None:
        if args["value"] < 0:
            raise generic(NEGATIVE_SPEED)
        with as_qmp_errors():
            seed_job(ctx, args["device"], Verb.SET_SPEED).set_speed(args["value"])

    async def cancel_old(ctx: Context, args: dict[str, Any]) -> None:
        name = args["device"]
        job = jobs(ctx).find(name)
        if job.cancel_requested:
            raise QMPError(DEVICE_IN_USE, f"Block job '{job.id}' is already being cancelled")
        with as_qmp_errors():
            seed_job(ctx, name, Verb.CANCEL).cancel()

    async def set_speed(ctx: Context, args: dict[str, Any]) -> None:
        with as_qmp_errors():
            block_job(ctx, args["device"]).set_speed(args["speed"])

    async def cancel(ctx: Context, args: dict[str, Any]) -> None:
        job = block_job(ctx, args["device"])
        if job.paused and not args.get("force", False):
            raise generic(f"The block job for device '{args['device']}' is currently paused")
        with as_qmp_errors():
            job.cancel()

    def verb(find: Callable[[Context, str], StreamJob], key: str,
             act: Callable[[StreamJob], None]) -> Handler:
        async def handler(ctx: Context, args: dict[str, Any]) -> None:
            job = find(ctx, args[key])
            with as_qmp_errors():
                act(job)

        return handler

    async def query(ctx: Context, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [job.info() for job in jobs(ctx).jobs()]

    async def query_jobs(ctx: Context, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [job.job_info() for job in jobs(ctx).jobs()]

    registry.add("block_stream", {"device": "str", "*base": "str"}, stream_old)
    registry.add(
        "block-stream",
        {
            "*job-id": "str",
            "device": "str",
            "*base": "str",
            "*base-node": "str",
            "*backing-file": "str",
            "*speed": "int",
            "*on-error": ON_ERROR,
            "*auto-finalize": "bool",
            "*auto-dismiss": "bool",
        },
        stream,
    )
    registry.add("block_job_set_speed", {"device": "str", "value": "int"}, set_speed_old)
    registry.add("block-job-set-speed", {"device": "str", "speed": "int"}, set_speed)
    registry.add("block_job_cancel", {"device": "str"}, cancel_old)
    registry.add("block-job-cancel", {"device": "str", "*force": "bool"}, cancel)
    for name, act in (("pause", StreamJob.pause), ("resume", StreamJob.resume),
                      ("complete", StreamJob.complete)):
        registry.add(f"block-job-{name}", {"device": "str"}, verb(block_job, "device", act))
    for name, act in (("finalize", StreamJob.finalize), ("dismiss", StreamJob.dismiss)):
        registry.add(f"block-job-{name}", {"id": "str"}, verb(block_job, "id", act))
    registry.add("query-block-jobs", None, query)
    for name, act in (("cancel", StreamJob.cancel), ("pause", StreamJob.pause),
                      ("resume", StreamJob.resume), ("complete", StreamJob.complete),
                      ("finalize", StreamJob.finalize), ("dismiss", StreamJob.dismiss)):
        registry.add(f"job-{name}", {"id": "str"}, verb(any_job, "id", act))
    registry.add("query-jobs", None, query_jobs)
