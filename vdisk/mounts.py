"""The mount point: create it, clear a dead vdisk mount left by a killed daemon, refuse busy."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from dataclasses import dataclass

from vdisk.errors import VdiskError

log = logging.getLogger("vdisk.mounts")

VDISK_FSTYPE = "fuse.vdisk"


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    fstype: str
    source: str
    dev: str = ""  # "major:minor"


def _unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \ooo."""
    out, i = [], 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == "\\" and len(octal) == 3 and octal.isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_at(
    path: str, mountinfo: str = "/proc/self/mountinfo", *, resolve: bool = True
) -> list[MountEntry]:
    """Every mount whose mount point is path (the last one is on top). resolve=False for an
    already resolved path: resolving stats the mount point, which a FUSE daemon must never
    do to its own mount from its serving thread."""
    target = os.path.realpath(path) if resolve else path
    found = []
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        rest = right.split()
        if _unescape(fields[4]) == target and len(rest) >= 2:
            found.append(MountEntry(target, rest[0], _unescape(rest[1]), fields[2]))
    return found


def _is_dead(path: str) -> bool:
    """A FUSE mount whose daemon died answers ENOTCONN (statfs always asks the daemon;
    stat may be answered from the kernel's attribute cache)."""
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def lazy_unmount(path: str) -> None:
    """Detach the mount at path (MNT_DETACH), via fusermount3 -u -z."""
    res = subprocess.run(
        ["fusermount3", "-u", "-z", path], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        reason = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"
        raise VdiskError(f"{path}: cannot unmount the stale vdisk mount: {reason}")


def prepare_mountpoint(path: str) -> None:
    """Make path ready to mount on: created if missing; a dead vdisk mount is cleared (and
    reported on stderr); a live mount or a non-empty directory is refused."""
    path = os.path.realpath(path)
    for _ in range(8):  # mounts may be stacked; clear dead vdisk ones one by one
        entries = mounts_at(path)
        dead = _is_dead(path)
        top = entries[-1] if entries else None
        if dead and (top is None or top.fstype == VDISK_FSTYPE):
            lazy_unmount(path)
            log.warning("%s: cleared a stale vdisk mount (its daemon died)", path)
            continue
        if top is not None and top.fstype == VDISK_FSTYPE:
            raise VdiskError(f"{path}: busy (another vdisk is serving there)")
        if top is not None:
            state = "a dead" if dead else "a"
            raise VdiskError(f"{path}: busy ({state} {top.fstype} file system is mounted there)")
        break
    else:
        raise VdiskError(f"{path}: busy (cannot clear stacked mounts)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise VdiskError(f"{path}: cannot create mount point: {e.strerror}") from None
    if not os.path.isdir(path):
        raise VdiskError(f"{path}: busy (not a directory)")
    try:
        if os.listdir(path):
            raise VdiskError(f"{path}: busy (directory is not empty)")
    except OSError as e:
        raise VdiskError(f"{path}: cannot read mount point: {e.strerror}") from None


def set_readahead(path: str, kib: int) -> bool:
    """Best effort: raise the kernel readahead of the file system mounted at path (a
    resolved path; FUSE starts at 128 KiB). Reads mountinfo and sysfs only, never the
    file system itself."""
    entries = mounts_at(path, resolve=False)
    if not entries or not entries[-1].dev:
        return False
    try:
        with open(f"/sys/class/bdi/{entries[-1].dev}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError as e:
        log.debug("%s: cannot set readahead: %s", path, e)
        return False
    return True
