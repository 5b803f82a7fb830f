"""`vdisk qmp SOCKET COMMAND [key=value ...]`: run one QMP command and print its answer.

Each value is parsed as JSON when it parses (speed=1048576, enable=["x"], force=true),
else taken as a string (device=drive0). The answer's "return" value is printed as JSON;
an error answer is printed as one line "vdisk: CLASS: desc" and exits 1.
With --wait-event NAME, the first event NAME received after the command was sent is
printed too (e.g. BLOCK_JOB_COMPLETED after block-stream).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio

from control.client import QMPClient
from control.errors import QMPError
from vdisk.errors import VdiskError

EPILOG = """\
examples:
  vdisk qmp vdisk.sock query-block
  vdisk qmp vdisk.sock block-stream device=disk0 speed=1048576
  vdisk qmp vdisk.sock block-stream device=disk0 --wait-event BLOCK_JOB_COMPLETED
  vdisk qmp vdisk.sock quit
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "qmp",
        help="run one QMP command on a vdisk control socket",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("socket", metavar="SOCKET", help="the daemon's QMP socket")
    p.add_argument("command", metavar="COMMAND", help="the command, e.g. query-block")
    p.add_argument("arguments", metavar="key=value", nargs="*", help="command arguments")
    p.add_argument("--compact", action="store_true", help="print the answer on one line")
    p.add_argument(
        "--wait-event", metavar="NAME", help="then wait for the event NAME and print it too"
    )
    p.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="give up waiting after SECONDS"
    )
    p.set_defaults(func=run)


def parse_arguments(pairs: list[str]) -> dict[str, Any]:
    """{"key": value} from key=value words (values as JSON when they parse, else str)."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise VdiskError(f"argument {pair!r}: expected key=value")
        if key in args:
            raise VdiskError(f"argument {key!r} given twice")
        try:
            args[key] = json.loads(text)
        except ValueError:
            args[key] = text
    return args


async def _execute(
    path: str, command: str, arguments: dict[str, Any], wait_event: str | None
) -> list[Any]:
    async with await QMPClient.connect(path) as client:
        out = [await client.execute(command, arguments)]
        if wait_event is not None:
            while True:
                event = await client.next_event()
                if event.get("event") == wait_event:
                    out.append(event)
                    break
        return out


def run(args: argparse.Namespace) -> int:
    arguments = parse_arguments(args.arguments)
    if args.timeout is not None and args.timeout <= 0:
        raise VdiskError(f"--timeout {args.timeout}: must be positive")

    async def main() -> list[Any]:
        with trio.fail_after(args.timeout if args.timeout is not None else float("inf")):
            return await _execute(args.socket, args.command, arguments, args.wait_event)

    try:
        answers = trio.run(main)
    except QMPError as e:
        print(f"vdisk: {e.cls}: {e.desc}", file=sys.stderr)
        return 1
    except trio.TooSlowError:
        what = f"event {args.wait_event}" if args.wait_event else "the answer"
        raise VdiskError(f"{args.socket}: timed out waiting for {what}") from None
    for value in answers:
        if args.compact:
            print(json.dumps(value, separators=(",", ":")))
        else:
            print(json.dumps(value, indent=2))
    return 0
