"""`vdisk stream IMAGE [--base B] [--speed BYTES]`: flatten an image offline.

Copies into IMAGE everything its backing chain above BASE holds, then points IMAGE's
backing file at BASE (or drops it). Runs the same stream job the daemon runs for
block-stream, over a BlockDevice without FUSE. Ctrl-C cancels at the next chunk and
keeps the backing file; a later run resumes, skipping what was copied.
"""

from __future__ import annotations

import argparse
import signal
import sys
from functools import partial
from typing import Any

import trio

from vdisk.block import loop_guard
from vdisk.block.device import BlockDevice
from vdisk.block.stream import StreamJob, find_base
from vdisk.cli._common import add_owner_check_option, parse_size
from vdisk.cli._progress import Progress
from vdisk.engine.chain import open_chain
from vdisk.errors import JobError, VdiskError

REFRESH = 0.2  # seconds between progress updates


EPILOG = """\
examples:
  vdisk stream top.qcow2                      # flatten the whole chain into top.qcow2
  vdisk stream top.qcow2 --base golden.qcow2 --speed 50M
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "stream",
        help="copy the backing chain's data into an image and drop (or shorten) its chain",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", help="the image to flatten (qcow2)")
    p.add_argument("--base", help="keep this backing image (and what is below it)")
    p.add_argument("--speed", default="0", help="bytes per second (K/M/G suffixes), 0 = unlimited")
    add_owner_check_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    speed = parse_size(args.speed, "--speed")
    loop_guard.install()
    return trio.run(_stream, args.image, args.base, speed, args.backing_owner_check == "on")


async def _stream(path: str, base_name: str | None, speed: int, owner_check: bool) -> int:
    # in a thread: opening may connect to servers, and a failed open closes with a sync
    top = await trio.to_thread.run_sync(partial(
        open_chain, path, backing_owner_check=owner_check,
        format_hint="only qcow2 images can be streamed into"))
    dev = BlockDevice("stream", top, copy_on_read=False, read_only=False)
    try:
        if top.format_name != "qcow2":
            raise VdiskError(f"{path}: cannot stream into a {top.format_name} image (qcow2 only)")
        try:
            base = find_base(top, base_name) if base_name is not None else None
        except JobError:
            raise VdiskError(f"{path}: --base {base_name!r} is not in its backing chain") from None
        events: list[tuple[str, dict[str, Any]]] = []
        progress = Progress()
        job = StreamJob(
            "stream", dev, base=base, speed=speed, emit=lambda n, d: events.append((n, d))
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.run)
            nursery.start_soon(_cancel_on_signal, job, nursery.cancel_scope)
            while not job.done.is_set():
                progress.update([(path, job.offset, job.len)])
                with trio.move_on_after(REFRESH):
                    await job.done.wait()
            progress.update([(path, job.offset, job.len)], force=True)
            nursery.cancel_scope.cancel()
        return _report(path, events, progress, top)
    finally:
        await dev.close()


async def _cancel_on_signal(job: StreamJob, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            job.request_stop()


def _report(path: str, events: list[tuple[str, dict[str, Any]]], progress: Progress, top: Any) -> int:
    status = 0
    for name, data in events:
        if name == "BLOCK_JOB_ERROR":
            progress.message(f"{path}: {data['operation']} error")
        elif name == "BLOCK_JOB_CANCELLED":
            print(f"vdisk: {path}: stream cancelled at {data['offset']}/{data['len']} bytes; "
                  "the backing file is unchanged", file=sys.stderr)
            status = 130
        elif "error" in data:
            print(f"vdisk: {path}: stream failed: {data['error']}; the backing file is unchanged",
                  file=sys.stderr)
            status = 1
        else:
            backing = top.backing_name or "none"
            progress.message(f"{path}: streamed; backing file: {backing}")
    return status
