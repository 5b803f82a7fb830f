"""The block job QMP commands, in the seed's spelling and QEMU's modern one.

block_stream / block-stream, block_job_set_speed / block-job-set-speed,
block_job_cancel / block-job-cancel, block-job-pause, block-job-resume, query-block-jobs.

The daemon wires them with `register_block_jobs(registry, manager, lookup)`, where
`lookup(drive_id)` returns the drive's BlockDevice or None. When `manager`/`lookup`
are not given, they are taken from the backend at call time (`ctx.backend.jobs` and
`ctx.backend.block_device(drive_id)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from control.errors import DEVICE_NOT_FOUND, GENERIC_ERROR, QMPError
from control.jobs import JobManager, as_qmp_errors
from control.nodes import stream_target
from control.registry import Context, Enum, Registry
from vdisk.block.job import NEGATIVE_SPEED
from vdisk.block.stream import StreamDevice

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
    """Add every block job command (with its aliases) to `registry`."""

    def backend(ctx: Context) -> JobsBackend:
        if not isinstance(ctx.backend, JobsBackend):
            raise QMPError(GENERIC_ERROR, "this server runs no block jobs")
        return ctx.backend

    def jobs(ctx: Context) -> JobManager:
        return manager if manager is not None else backend(ctx).jobs

    def device(ctx: Context, drive: str) -> StreamDevice:
        find = lookup if lookup is not None else backend(ctx).block_device
        dev = find(drive)
        if dev is None:
            raise QMPError(DEVICE_NOT_FOUND, f"Device '{drive}' not found")
        return dev

    def check_speed(speed: int) -> int:
        if speed < 0:
            raise QMPError(GENERIC_ERROR, NEGATIVE_SPEED)
        return speed

    async def stream(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        speed = check_speed(args.get("speed", 0))
        drive, base, backing_file = stream_target(
            ctx.backend, args["device"], args.get("base"), args.get("base-node"),
            args.get("backing-file"))
        dev = device(ctx, drive)
        jobs(ctx).start_stream(
            drive,
            dev,
            job_id=args.get("job-id"),
            base=base,
            speed=speed,
            on_error=args.get("on-error", "report"),
            backing_file=backing_file,
        )
        return {}

    async def set_speed_old(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        speed = check_speed(args["value"])
        with as_qmp_errors():
            jobs(ctx).find(args["device"]).set_speed(speed)
        return {}

    async def set_speed(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        speed = check_speed(args["speed"])
        with as_qmp_errors():
            jobs(ctx).find(args["device"]).set_speed(speed)
        return {}

    async def cancel(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        with as_qmp_errors():
            jobs(ctx).find(args["device"]).cancel()
        return {}

    async def pause(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        with as_qmp_errors():
            jobs(ctx).find(args["device"]).pause()
        return {}

    async def resume(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        with as_qmp_errors():
            jobs(ctx).find(args["device"]).resume()
        return {}

    async def query(ctx: Context, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [job.info() for job in jobs(ctx).jobs()]

    registry.add("block_stream", {"device": "str", "*base": "str"}, stream)
    registry.add(
        "block-stream",
        {
            "device": "str",
            "*job-id": "str",
            "*base": "str",
            "*base-node": "str",
            "*speed": "int",
            "*on-error": ON_ERROR,
            "*backing-file": "str",
        },
        stream,
    )
    registry.add("block_job_set_speed", {"device": "str", "value": "int"}, set_speed_old)
    registry.add("block-job-set-speed", {"device": "str", "speed": "int"}, set_speed)
    registry.add("block_job_cancel", {"device": "str"}, cancel)
    registry.add("block-job-cancel", {"device": "str", "*force": "bool"}, cancel)
    registry.add("block-job-pause", {"device": "str"}, pause)
    registry.add("block-job-resume", {"device": "str"}, resume)
    registry.add("query-block-jobs", None, query)
