"""`vdisk qmp SOCKET COMMAND [key=value ...]`: run one QMP command and print its answer.

Each value is parsed as JSON when it parses (speed=1048576, enable=["x"], force=true),
else taken as a string (device=drive0). The answer's "return" value is printed as JSON;
an error answer is printed as one line "vdisk: CLASS: desc" and exits 1.
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


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "qmp",
        help="run one QMP command on a vdisk control socket",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("socket", metavar="SOCKET", help="the daemon's QMP socket")
    p.add_argument("command", metavar="COMMAND", help="the command, e.g. query-block")
    p.add_argument("arguments", metavar="key=value", nargs="*", help="command arguments")
    p.add_argument("--compact", action="store_true", help="print the answer on one line")
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


async def _execute(path: str, command: str, arguments: dict[str, Any]) -> Any:
    async with await QMPClient.connect(path) as client:
        return await client.execute(command, arguments)


def run(args: argparse.Namespace) -> int:
    arguments = parse_arguments(args.arguments)
    try:
        result = trio.run(_execute, args.socket, args.command, arguments)
    except QMPError as e:
        print(f"vdisk: {e.cls}: {e.desc}", file=sys.stderr)
        return 1
    if args.compact:
        print(json.dumps(result, separators=(",", ":")))
    else:
        print(json.dumps(result, indent=2))
    return 0
