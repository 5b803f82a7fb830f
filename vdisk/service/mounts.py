"""The mount point: create it, clear a dead vdisk mount left by a killed daemon, refuse busy."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
from dataclasses import dataclass

from vdisk.errors import VdiskError

log = logging.getLogger("vdisk.mounts")

VDISK_FSTYPE = "fuse.vdisk"
PROBE_TIMEOUT = 5.0  # seconds a live vdisk at the mount point gets to answer statfs


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


def _probe(path: str, timeout: float = PROBE_TIMEOUT) -> str:
    """'dead', 'alive' or 'hung': a FUSE mount whose daemon died answers ENOTCONN (statfs
    always asks the daemon; stat may be answered from the kernel's attribute cache). A
    daemon that is alive but stuck would block us forever, hence the thread."""
    result: list[str] = []

    def statfs() -> None:
        try:
            os.statvfs(path)
            result.append("alive")
        except OSError as e:
            result.append("dead" if e.errno == errno.ENOTCONN else "alive")

    t = threading.Thread(target=statfs, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else "hung"


def resolve_mountpoint(path: str) -> str:
    """An absolute, resolved mount point path, without ever stat()ing a mount point (which
    may belong to a stuck FUSE daemon): the parent is resolved, and the path itself only
    when nothing is mounted there."""
    path = os.path.abspath(path)
    candidate = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    if mounts_at(candidate, resolve=False):
        return candidate
    return os.path.realpath(candidate)


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """True if something is mounted at path (per /proc/self/mountinfo)."""
    return bool(mounts_at(os.fspath(path)))


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Detach whatever is mounted at path, stacked mounts included; never raises (for
    clean-up code: tests, benchmarks, the torture loop)."""
    target = os.fspath(path)
    for _ in range(5):
        if not is_mounted(target):
            return
        subprocess.run(["fusermount3", "-u", "-z", target], capture_output=True, check=False)
        if is_mounted(target):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def lazy_unmount(path: str) -> None:
    """Detach the mount at path (MNT_DETACH), via fusermount3 -u -z."""
    res = subprocess.run(
        ["fusermount3", "-u", "-z", path], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        reason = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"
        raise VdiskError(f"{path}: cannot unmount the stale vdisk mount: {reason}")


def prepare_mountpoint(path: str) -> list[str]:
    """Make path (from resolve_mountpoint) ready to mount on: created if missing; a dead
    vdisk mount is cleared (and reported on stderr); a live mount or a non-empty directory
    is refused. Returns the directories created here, deepest first (a failed start
    removes them with remove_created)."""
    for _ in range(8):  # mounts may be stacked; clear dead vdisk ones one by one
        entries = mounts_at(path, resolve=False)
        if not entries:
            break
        top = entries[-1]
        if top.fstype != VDISK_FSTYPE:
            raise VdiskError(f"{path}: busy (a {top.fstype} file system is mounted there)")
        state = _probe(path)
        if state == "alive":
            raise VdiskError(f"{path}: busy (another vdisk is serving there)")
        if state == "hung":
            raise VdiskError(f"{path}: busy (a vdisk is mounted there and does not answer)")
        lazy_unmount(path)
        log.warning("%s: cleared a stale vdisk mount (its daemon died)", path)
    else:
        raise VdiskError(f"{path}: busy (cannot clear stacked mounts)")
    missing = []
    d = path
    while not os.path.lexists(d) and d != os.path.dirname(d):
        missing.append(d)
        d = os.path.dirname(d)
    created: list[str] = []
    try:
        for d in reversed(missing):
            try:
                os.mkdir(d)
                created.insert(0, d)
            except FileExistsError:
                pass  # made by someone else meanwhile: checked below like any directory
    except OSError as e:
        remove_created(created)
        raise VdiskError(f"{path}: cannot create mount point: {e.strerror}") from None
    if not os.path.isdir(path):
        raise VdiskError(f"{path}: busy (not a directory)")
    try:
        if os.listdir(path):
            raise VdiskError(f"{path}: busy (directory is not empty)")
    except OSError as e:
        raise VdiskError(f"{path}: cannot read mount point: {e.strerror}") from None
    return created


def remove_created(dirs: list[str]) -> None:
    """Remove directories prepare_mountpoint created (deepest first) while they are empty;
    never raises (a directory someone put something in, or mounted on, stays)."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError as e:
            log.debug("%s: left in place: %s", d, e.strerror)
            return


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
