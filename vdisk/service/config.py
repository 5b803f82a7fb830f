"""`vdisk serve --config FILE`: the daemon's settings and drives in TOML.

    mount = "/srv/vdisk/mnt"          # --mount
    qmp = "/run/vdisk/qmp.sock"       # --qmp
    allow-other = false               # --allow-other
    log-level = "info"                # --log-level debug|info|warning|error
    log = "stderr"                    # --log stderr|journald
    log-file = "/var/log/vdisk.log"   # --log-file
    pidfile = "/run/vdisk/vdisk.pid"  # --pidfile
    metrics = "127.0.0.1:9101"        # --metrics HOST:PORT or a UNIX socket path

    [[drive]]                         # one table per --drive
    id = "d0"
    file = "/var/lib/images/top.qcow2"
    format = "qcow2"                  # optional: qcow2 or raw (probed)
    copy-on-read = true               # optional: default on for read-write drives
    read-only = false                 # optional
    backing-owner-check = true        # optional: false serves backing files the image
                                      # owner could not read (docs/SECURITY.md)
    node-name = "top"                 # optional node names (control.nodes): the top,
    backing.node-name = "base"        # the next image down, backing.backing..., and
    "file.node-name" = "top-file"     # protocol nodes (quoted here: file is the path)

Relative paths are relative to the directory of the file. Every error is one line
naming the file, the key and the reason.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from vdisk.errors import VdiskError
from vdisk.service.daemon import DriveSpec
from vdisk.service.logsetup import DESTINATIONS, LEVELS
from vdisk.service.metrics import Address, parse_address

_PATHS = ("mount", "qmp", "log-file", "pidfile")
_TOP: dict[str, type] = {
    "mount": str, "qmp": str, "allow-other": bool, "log-level": str, "log": str,
    "log-file": str, "pidfile": str, "drive": list, "metrics": str,
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
    metrics: Address | None = None
    drives: tuple[DriveSpec, ...] = ()


# QEMU's rule for ids and node names (id_wellformed), and its limit of 31 bytes.
NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
NODE_NAME_MAX = 31


def node_name_problem(name: str) -> str | None:
    """Why `name` cannot be a given node name, or None."""
    if not NODE_NAME.fullmatch(name):
        return (f"'{name}' is not a valid node name (a letter, then letters, digits, "
                "'-', '.' or '_')")
    if len(name) > NODE_NAME_MAX:
        return f"'{name}' is longer than {NODE_NAME_MAX} characters"
    return None


def parse_node_key(key: str) -> tuple[int, bool] | None:
    """(depth, protocol node?) of the node a drive option names: "node-name" (the top's
    format node), "backing.node-name" (the next), "file.node-name" (the top's protocol
    node), "backing.backing.file.node-name"...; None if `key` names no node."""
    parts = key.split(".")
    if parts[-1] != "node-name":
        return None
    path = parts[:-1]
    protocol = bool(path) and path[-1] == "file"
    if protocol:
        path = path[:-1]
    if any(p != "backing" for p in path):
        return None
    return len(path), protocol


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


def _flatten(prefix: str, table: dict[str, Any], out: dict[str, Any]) -> None:
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(f"{prefix}{key}.", value, out)
        else:
            out[prefix + key] = value


def _node_names(where: str, table: dict[str, Any]) -> tuple[tuple[int, bool, str], ...]:
    """Take the node name keys out of a [[drive]] table: node-name, backing.node-name,
    backing.backing.node-name..., "file.node-name" (quoted: file is the image's path),
    backing.file.node-name."""
    flat: dict[str, Any] = {}
    for key in [k for k in table if k == "backing" or parse_node_key(k) is not None]:
        value = table.pop(key)
        if isinstance(value, dict):
            _flatten(f"{key}.", value, flat)
        else:
            flat[key] = value
    names = []
    for key, value in flat.items():
        node = parse_node_key(key)
        if node is None:
            raise VdiskError(f"{where}{key}: unknown key (node names are node-name, "
                             "backing.node-name, \"file.node-name\", backing.file.node-name...)")
        if not isinstance(value, str):
            raise VdiskError(f"{where}{key}: expected a string, got {type(value).__name__}")
        problem = node_name_problem(value)
        if problem:
            raise VdiskError(f"{where}{key}: {problem}")
        names.append((*node, value))
    return tuple(names)


def _drive(where: str, table: Any, base_dir: str) -> DriveSpec:
    if not isinstance(table, dict):
        raise VdiskError(f"{where}expected a [[drive]] table")
    table = dict(table)
    node_names = _node_names(where, table)
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
        node_names=node_names,
    )


def _metrics(where: str, data: dict[str, Any], base_dir: str) -> Address | None:
    text = data.get("metrics")
    if text is None:
        return None
    if "/" in text:
        text = os.path.join(base_dir, text)
    return parse_address(text, f"{where}metrics:")


def load_config(path: str) -> FileConfig:
    """Read and check a config file; VdiskError (one line) on any problem."""
    import tomllib  # here: a daemon started without --config does not need it

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
        metrics=_metrics(where, data, base_dir),
        drives=drives,
    )
