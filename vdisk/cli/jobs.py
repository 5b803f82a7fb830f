"""`vdisk jobs SOCKET [--watch]`: show a daemon's block jobs (progress bars until they end)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import trio

from control.client import QMPClient
from control.errors import QMPError
from vdisk.cli._progress import Progress, human

POLL = 0.25  # seconds between queries while watching
FINAL_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


EPILOG = """\
examples:
  vdisk jobs /run/vdisk/vm1/qmp.sock            # one line per job
  vdisk jobs /run/vdisk/vm1/qmp.sock --watch    # progress bars until the jobs end
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "jobs", help="show the block jobs of a running daemon",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("socket", help="the daemon's QMP socket")
    p.add_argument("--watch", action="store_true", help="show progress until every job ends")
    p.set_defaults(func=run)


def describe(job: dict[str, Any]) -> str:
    state = job.get("status", "?")
    if job.get("io-status", "ok") != "ok":
        state += f" io-status={job['io-status']}"
    speed = job.get("speed", 0)
    limit = f"{human(speed)}/s" if speed else "unlimited"
    return (
        f"{job.get('device')}: {job.get('type')} {job.get('offset')}/{job.get('len')} bytes, "
        f"{state}, speed {limit}"
    )


def describe_event(ev: dict[str, Any]) -> str:
    data = ev.get("data", {})
    name = ev.get("event")
    if name == "BLOCK_JOB_ERROR":
        return f"{data.get('device')}: {data.get('operation')} error, action {data.get('action')}"
    what = "cancelled" if name == "BLOCK_JOB_CANCELLED" else "completed"
    if "error" in data:
        what = f"failed: {data['error']}"
    return f"{data.get('device')}: {what} at {data.get('offset')}/{data.get('len')} bytes"


async def _run(args: argparse.Namespace) -> int:
    client = await QMPClient.connect(args.socket)
    try:
        jobs = await client.execute("query-block-jobs")
        if not jobs:
            print("no active block jobs")
            return 0
        if not args.watch:
            for job in jobs:
                print(describe(job))
            return 0
        progress = Progress()
        while jobs:
            for ev in client.pending_events():
                if ev.get("event", "").startswith("BLOCK_JOB_"):
                    progress.message(describe_event(ev))
            progress.update([(f"{j['device']} {j['status']}", j["offset"], j["len"]) for j in jobs])
            await trio.sleep(POLL)
            jobs = await client.execute("query-block-jobs")
        # Final events arrive before the job leaves the list.
        for ev in client.pending_events():
            if ev.get("event", "").startswith("BLOCK_JOB_"):
                progress.message(describe_event(ev))
        return 0
    finally:
        await client.aclose()


def run(args: argparse.Namespace) -> int:
    try:
        return trio.run(_run, args)
    except QMPError as e:
        print(f"vdisk: {args.socket}: {e.cls}: {e.desc}", file=sys.stderr)
        return 1
