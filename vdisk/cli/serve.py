"""`vdisk serve`: serve drives as raw files over FUSE, controlled over a QMP socket.

  vdisk serve --mount DIR --qmp SOCKET \\
      --drive id=ID,file=IMAGE[,format=qcow2|raw][,copy-on-read=on|off][,read-only=on|off]
              [,backing-owner-check=on|off][,node-name=NAME][,backing.node-name=NAME]...
      [--metrics HOST:PORT|PATH]
  vdisk serve --config FILE [--daemonize --pidfile FILE] [--log-file FILE]

Runs until SIGTERM, SIGINT, SIGHUP or the QMP `quit` command, then flushes every
drive, unmounts and exits 0 (SIGUSR1 reopens the log file). In the foreground by
default; --daemonize returns once the mount is live and QMP answers (exit 0), or
prints the daemon's start-up error (exit 1). Each drive appears as DIR/ID, a raw file of
the drive's virtual size (it never grows; fallocate punch-hole/zero-range and
SEEK_DATA/SEEK_HOLE work). Copy-on-read is on by default for read-write drives.
Every image of a chain has a node name for QMP: node-name= names the top,
backing.node-name= the next, backing.backing.node-name= the one below, file.node-name=
(backing.file.node-name=...) the protocol node of an image; the others are made up as
#ID.DEPTH (#ID.DEPTH.file), DEPTH counted from the top at start-up. --metrics serves the
drives' I/O counters as a Prometheus text endpoint.
A backing file that the owner of an image above it could not read is refused, unless
the drive says backing-owner-check=off (see docs/SECURITY.md).
DIR is created if missing (and removed again if the start fails); a dead vdisk mount
left there by a killed daemon is lazily unmounted; any other mount, or a non-empty DIR,
is refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from dataclasses import dataclass

from vdisk.errors import VdiskError
from vdisk.service.config import (
    FileConfig,
    drive_id_problem,
    load_config,
    node_name_problem,
    parse_node_key,
)
from vdisk.service.daemon import DriveSpec, ServeConfig, serve
from vdisk.service.daemonize import READY_TIMEOUT, Readiness, daemonize
from vdisk.service.logsetup import DESTINATIONS, LEVELS, JournalHandler, Logs, setup_logging
from vdisk.service.metrics import parse_address
from vdisk.service.pidfile import check_pidfile, check_writable, remove_pidfile, write_pidfile

log = logging.getLogger("vdisk")

_BOOL = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}
_KEYS = ("id", "file", "format", "copy-on-read", "read-only", "backing-owner-check")


def parse_drive(text: str) -> DriveSpec:
    """Parse one --drive value (QEMU -drive style key=value list)."""
    opts: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise VdiskError(f"--drive {text}: expected key=value, got '{item}'")
        if key not in _KEYS and parse_node_key(key) is None:
            raise VdiskError(
                f"--drive {text}: unknown option '{key}' (known: {', '.join(_KEYS)}, "
                "node-name, backing.node-name, file.node-name, backing.file.node-name...)"
            )
        if key in opts:
            raise VdiskError(f"--drive {text}: option '{key}' given twice")
        opts[key] = value
    for key in ("id", "file"):
        if not opts.get(key):
            raise VdiskError(f"--drive {text}: missing {key}=")
    drive_id = opts["id"]
    problem = drive_id_problem(drive_id)
    if problem:
        raise VdiskError(f"--drive {text}: id {problem}")
    fmt = opts.get("format")
    if fmt is not None and fmt not in ("qcow2", "raw"):
        raise VdiskError(f"--drive {text}: format '{fmt}' is not qcow2 or raw")

    node_names = []
    for key, value in opts.items():
        node = parse_node_key(key)
        if node is not None:
            problem = node_name_problem(value)
            if problem:
                raise VdiskError(f"--drive {text}: {key}: {problem}")
            node_names.append((*node, value))

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
        backing_owner_check=flag("backing-owner-check") is not False,
        node_names=tuple(node_names),
    )


EPILOG = """\
examples:
  # foreground, logging to stderr; stop with Ctrl-C, SIGTERM or QMP quit
  vdisk serve --mount mnt --qmp vdisk.sock --drive id=disk0,file=top.qcow2

  # in the background: returns once mnt/disk0 is usable and QMP answers
  vdisk serve --daemonize --pidfile vdisk.pid --log-file vdisk.log \\
      --mount mnt --qmp vdisk.sock --drive id=disk0,file=top.qcow2,copy-on-read=off
  kill $(cat vdisk.pid)          # clean stop; vdisk.pid is removed

  # settings and drives from a TOML file (see docs/OPERATIONS.md), logs to journald
  vdisk serve --config /etc/vdisk/vm1.toml --log journald

command-line options override the config file's settings (--allow-other can only turn
it on); --drive options add drives to the file's [[drive]] tables.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve drives as raw files over FUSE, with a QMP control socket",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mount", metavar="DIR", help="mount point (created)")
    p.add_argument("--qmp", metavar="SOCKET", help="QMP UNIX socket path")
    p.add_argument(
        "--drive", action="append", default=[], metavar="SPEC",
        help="id=ID,file=IMAGE[,format=qcow2|raw][,copy-on-read=on|off][,read-only=on|off]"
        "[,backing-owner-check=on|off][,node-name=NAME][,backing.node-name=NAME]...",
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with settings and [[drive]]s")
    p.add_argument("--metrics", metavar="ADDR",
                   help="serve the drives' I/O counters for Prometheus at HOST:PORT or a "
                   "UNIX socket path")
    p.add_argument("--allow-other", action="store_true", help="let other users use the mount")
    p.add_argument("--daemonize", action="store_true",
                   help="detach; exit 0 once serving, or 1 with the start-up error")
    p.add_argument("--pidfile", metavar="FILE",
                   help="write the daemon's pid here once serving; removed on stop")
    p.add_argument("--log", choices=DESTINATIONS, help="log to stderr (default) or journald")
    p.add_argument("--log-file", metavar="FILE",
                   help="log to this file (appended; reopened on SIGUSR1)")
    p.add_argument("--log-level", choices=LEVELS, help="log level (default: info)")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT, help=argparse.SUPPRESS)
    p.add_argument("--engine-threads", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


@dataclass(frozen=True)
class Settings:
    """The command line merged over the config file."""

    config: ServeConfig
    log_level: str
    log: str
    log_file: str | None
    pidfile: str | None


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def settings(args: argparse.Namespace) -> Settings:
    """Merge the command line over --config; VdiskError on anything missing or wrong."""
    fc = load_config(args.config) if args.config else FileConfig(path="")
    drives = fc.drives + tuple(parse_drive(text) for text in args.drive)
    if not drives:
        raise VdiskError("serve: at least one --drive (or [[drive]] in --config) is required")
    seen: set[str] = set()
    for d in drives:
        if d.id in seen:
            raise VdiskError(f"--drive id={d.id}: duplicate drive id '{d.id}'")
        seen.add(d.id)
    mount = _absolute(args.mount) or fc.mount
    qmp = _absolute(args.qmp) or fc.qmp
    for name, value in (("mount", mount), ("qmp", qmp)):
        if not value:
            raise VdiskError(f"serve: --{name} is required (or {name} = ... in --config)")
    assert mount is not None and qmp is not None
    log_file = _absolute(args.log_file) or (fc.log_file if args.log is None else None)
    dest = args.log or fc.log or "stderr"
    if log_file and dest == "journald":
        raise VdiskError("serve: --log journald and --log-file: choose one")
    return Settings(
        config=ServeConfig(
            mount=mount, qmp=qmp, drives=drives,
            allow_other=bool(args.allow_other or fc.allow_other),
            engine_threads=args.engine_threads,
            metrics=parse_address(args.metrics) if args.metrics else fc.metrics,
        ),
        log_level=args.log_level or fc.log_level or "info",
        log=dest,
        log_file=log_file,
        pidfile=_absolute(args.pidfile) or fc.pidfile,
    )


def error_line(exc: BaseException) -> str:
    """The one line `vdisk` prints for a VdiskError or OSError (see vdisk.cli.main)."""
    if isinstance(exc, OSError) and not isinstance(exc, VdiskError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    return str(exc)


def run(args: argparse.Namespace) -> int:
    s = settings(args)
    logs = setup_logging(s.log_level, s.log, s.log_file)
    if s.pidfile:
        check_writable(s.pidfile)
        note = check_pidfile(s.pidfile)
        if note:
            log.warning("%s", note)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the daemon handles it (reopen)
    readiness = None
    if args.daemonize:
        readiness = daemonize(logs.fileno(), args.ready_timeout)
        if readiness is None:
            return 0  # the caller: the daemon is serving
        logs.redirect_std = logs.file is not None
    return _serve(s, logs, readiness)


def _serve(s: Settings, logs: Logs, readiness: Readiness | None) -> int:
    pid = os.getpid()
    written = False

    def on_ready() -> None:
        nonlocal written
        try:
            if s.pidfile:
                write_pidfile(s.pidfile, pid)
                written = True
        except VdiskError as e:
            if readiness is not None:
                readiness.failed(str(e))
            raise
        if readiness is not None:
            readiness.ready()

    try:
        serve(s.config, on_ready, logs.reopen)
    except (VdiskError, OSError) as e:
        if readiness is None:
            if logs.file is not None or isinstance(logs.handler, JournalHandler):
                log.error("%s", error_line(e))  # in the log too, not only on stderr
            raise  # in the foreground, vdisk.cli prints it
        log.error("%s", error_line(e))
        readiness.failed(error_line(e))
        return 1
    except BaseException:
        if readiness is not None:
            readiness.failed("internal error (see the log)")
        raise
    finally:
        if written and s.pidfile:
            remove_pidfile(s.pidfile, pid)
        if readiness is not None:
            readiness.close()
    return 0
