"""`vdisk serve --config FILE`: the daemon's settings and drives in TOML.

    mount = "/srv/vdisk/mnt"          # --mount
    qmp = "/run/vdisk/qmp.sock"       # --qmp
    allow-other = false               # --allow-other
    log-level = "info"                # --log-level debug|info|warning|error
    log = "stderr"                    # --log stderr|journald
    log-file = "/var/log/vdisk.log"   # --log-file
    pidfile = "/run/vdisk/vdisk.pid"  # --pidfile

    [[drive]]                         # one table per --drive
    id = "d0"
    file = "/var/lib/images/top.qcow2"
    format = "qcow2"                  # optional: qcow2 or raw (probed)
    copy-on-read = true               # optional: default on for read-write drives
    read-only = false                 # optional
    backing-owner-check = true        # optional: false serves backing files the image
                                      # owner could not read (docs/SECURITY.md)

Relative paths are relative to the directory of the file. Every error is one line
naming the file, the key and the reason.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from typing import Any

from vdisk.errors import VdiskError
from vdisk.service.daemon import DriveSpec
from vdisk.service.logsetup import DESTINATIONS, LEVELS

_PATHS = ("mount", "qmp", "log-file", "pidfile")
_TOP: dict[str, type] = {
    "mount": str, "qmp": str, "allow-other": bool, "log-level": str, "log": str,
    "log-file": str, "pidfile": str, "drive": list,
}
_DRIVE: dict[str, type] = {
    "id": str, "file": str, "format": str, "copy-on-read": bool, "read-only": bool,
    "backing-owner-check": bool,
}
_TYPE_NAMES = {str: "a string", bool: "true or false", list: "an array of [[drive]] tables"}


@dataclass(frozen=True)
class FileConfig:
    """What a config file sets (None: not set)."""

    path: str
    mount: str | None = None
    qmp: str | None = None
    allow_other: bool | None = None
    log_level: str | None = None
    log: str | None = None
    log_file: str | None = None
    pidfile: str | None = None
    drives: tuple[DriveSpec, ...] = ()


def drive_id_problem(drive_id: str) -> str | None:
    """Why drive_id cannot name a drive file, or None."""
    if not drive_id:
        return "is empty"
    if "/" in drive_id or drive_id in (".", "..") or "\0" in drive_id:
        return f"'{drive_id}' cannot be a file name"
    return None


def _check_keys(where: str, table: dict[str, Any], known: dict[str, type]) -> None:
    for key, value in table.items():
        if key not in known:
            raise VdiskError(f"{where}{key}: unknown key (known: {', '.join(known)})")
        want = known[key]
        if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            raise VdiskError(
                f"{where}{key}: expected {_TYPE_NAMES[want]}, got {type(value).__name__}"
            )


def _drive(where: str, table: Any, base_dir: str) -> DriveSpec:
    if not isinstance(table, dict):
        raise VdiskError(f"{where}expected a [[drive]] table")
    _check_keys(where, table, _DRIVE)
    for key in ("id", "file"):
        if not table.get(key):
            raise VdiskError(f"{where}{key}: missing (every [[drive]] needs id and file)")
    problem = drive_id_problem(table["id"])
    if problem:
        raise VdiskError(f"{where}id: {problem}")
    fmt = table.get("format")
    if fmt is not None and fmt not in ("qcow2", "raw"):
        raise VdiskError(f"{where}format: '{fmt}' is not qcow2 or raw")
    return DriveSpec(
        id=table["id"],
        file=os.path.join(base_dir, table["file"]),
        format=fmt,
        copy_on_read=table.get("copy-on-read"),
        read_only=bool(table.get("read-only", False)),
        backing_owner_check=bool(table.get("backing-owner-check", True)),
    )


def load_config(path: str) -> FileConfig:
    """Read and check a config file; VdiskError (one line) on any problem."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise VdiskError(f"{path}: cannot read the config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise VdiskError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise VdiskError(f"{path}: not valid TOML: not UTF-8 text") from None
    where = f"{path}: "
    _check_keys(where, data, _TOP)
    base_dir = os.path.dirname(path)
    for key, choices in (("log-level", LEVELS), ("log", DESTINATIONS)):
        if key in data and data[key] not in choices:
            raise VdiskError(f"{where}{key}: '{data[key]}' is not one of {', '.join(choices)}")
    for key in _PATHS:
        if key in data and not data[key]:
            raise VdiskError(f"{where}{key}: is empty")
    paths = {k: os.path.join(base_dir, data[k]) for k in _PATHS if k in data}
    drives = tuple(
        _drive(f"{path}: [[drive]] #{i + 1}: ", table, base_dir)
        for i, table in enumerate(data.get("drive", []))
    )
    return FileConfig(
        path=path,
        mount=paths.get("mount"),
        qmp=paths.get("qmp"),
        allow_other=data.get("allow-other"),
        log_level=data.get("log-level"),
        log=data.get("log"),
        log_file=paths.get("log-file"),
        pidfile=paths.get("pidfile"),
        drives=drives,
    )
