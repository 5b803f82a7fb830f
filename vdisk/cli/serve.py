"""`vdisk serve`: serve drives as raw files over FUSE, controlled over a QMP socket.

  vdisk serve --mount DIR --qmp SOCKET \\
      --drive id=ID,file=IMAGE[,format=qcow2|raw][,copy-on-read=on|off][,read-only=on|off]

Runs in the foreground until SIGTERM, SIGINT, SIGHUP or the QMP `quit` command, then
flushes every drive, unmounts and exits 0. Each drive appears as DIR/ID, a raw file of
the drive's virtual size (it never grows; fallocate punch-hole/zero-range and
SEEK_DATA/SEEK_HOLE work). Copy-on-read is on by default for read-write drives.
DIR is created if missing; a dead vdisk mount left there by a killed daemon is
lazily unmounted; any other mount, or a non-empty DIR, is refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vdisk.daemon import DriveSpec, ServeConfig, serve
from vdisk.errors import VdiskError

_BOOL = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}
_KEYS = ("id", "file", "format", "copy-on-read", "read-only")


def parse_drive(text: str) -> DriveSpec:
    """Parse one --drive value (QEMU -drive style key=value list)."""
    opts: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise VdiskError(f"--drive {text}: expected key=value, got '{item}'")
        if key not in _KEYS:
            raise VdiskError(
                f"--drive {text}: unknown option '{key}' (known: {', '.join(_KEYS)})"
            )
        if key in opts:
            raise VdiskError(f"--drive {text}: option '{key}' given twice")
        opts[key] = value
    for key in ("id", "file"):
        if not opts.get(key):
            raise VdiskError(f"--drive {text}: missing {key}=")
    drive_id = opts["id"]
    if "/" in drive_id or drive_id in (".", "..") or "\0" in drive_id:
        raise VdiskError(f"--drive {text}: id '{drive_id}' cannot be a file name")
    fmt = opts.get("format")
    if fmt is not None and fmt not in ("qcow2", "raw"):
        raise VdiskError(f"--drive {text}: format '{fmt}' is not qcow2 or raw")

    def flag(key: str) -> bool | None:
        if key not in opts:
            return None
        value = opts[key].lower()
        if value not in _BOOL:
            raise VdiskError(f"--drive {text}: {key}='{opts[key]}' is not on or off")
        return _BOOL[value]

    return DriveSpec(
        id=drive_id,
        file=os.path.abspath(opts["file"]),
        format=fmt,
        copy_on_read=flag("copy-on-read"),
        read_only=bool(flag("read-only")),
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve drives as raw files over FUSE, with a QMP control socket",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mount", required=True, metavar="DIR", help="mount point (created)")
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="QMP UNIX socket path")
    p.add_argument(
        "--drive", action="append", default=[], metavar="SPEC",
        help="id=ID,file=IMAGE[,format=qcow2|raw][,copy-on-read=on|off][,read-only=on|off]",
    )
    p.add_argument("--allow-other", action="store_true", help="let other users use the mount")
    p.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="log level (default: info)",
    )
    p.add_argument("--engine-threads", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vdisk: %(levelname)s: %(message)s"))
    for name in ("vdisk", "control", "pyfuse3"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(level.upper() if name != "pyfuse3" or level == "debug" else "WARNING")


def run(args: argparse.Namespace) -> int:
    if not args.drive:
        raise VdiskError("serve: at least one --drive is required")
    drives = tuple(parse_drive(text) for text in args.drive)
    seen: set[str] = set()
    for d in drives:
        if d.id in seen:
            raise VdiskError(f"--drive id={d.id}: duplicate drive id '{d.id}'")
        seen.add(d.id)
    setup_logging(args.log_level)
    serve(ServeConfig(
        mount=args.mount, qmp=args.qmp, drives=drives, allow_other=args.allow_other,
        engine_threads=args.engine_threads,
    ))
    return 0
