"""The pid file of `vdisk serve --pidfile`: refuse a live vdisk, replace a stale file.

The file holds the daemon's pid and a newline. It is written atomically (a temporary
file in the same directory, renamed over) once the daemon is ready, and removed when it
stops (only if it still names this process).
"""

from __future__ import annotations

import os

from vdisk.errors import VdiskError


def read_pid(path: str) -> int | None:
    """The pid in the file, None if missing; -1 if unreadable or garbage."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(64).strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise VdiskError(f"{path}: cannot read the pid file: {e.strerror}") from None
    return int(text) if text.isdigit() and int(text) > 0 else -1


def process_alive(pid: int) -> bool:
    """True if pid runs (a zombie is not running)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat.rsplit(b")", 1)[-1].split()[:1]
    return state not in ([b"Z"], [b"X"])


def is_vdisk(pid: int) -> bool:
    """True if pid is a running `vdisk` (the script, or `python -m vdisk`)."""
    if not process_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    if any(os.path.basename(a) == b"vdisk" for a in argv[:2]):
        return True
    return any(a == b"-m" and b == b"vdisk" for a, b in zip(argv, argv[1:], strict=False))


def check_pidfile(path: str) -> str | None:
    """Refuse if the file names a live vdisk; a note if it is stale (it is then removed)."""
    pid = read_pid(path)
    if pid is None:
        return None
    if pid > 0 and pid != os.getpid() and is_vdisk(pid):
        raise VdiskError(f"{path}: vdisk is already running (pid {pid})")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise VdiskError(f"{path}: cannot remove the stale pid file: {e.strerror}") from None
    what = f"pid {pid} is not a running vdisk" if pid > 0 else "no valid pid in it"
    return f"{path}: replaced a stale pid file ({what})"


def write_pidfile(path: str, pid: int) -> None:
    """Write pid to path atomically (tmp file + fsync + rename)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{pid}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{pid}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise VdiskError(f"{path}: cannot write the pid file: {e.strerror}") from None


def check_writable(path: str) -> None:
    """Fail early (before starting) if the pid file's directory cannot take it."""
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise VdiskError(f"{path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VdiskError(f"{path}: directory {parent} is not writable")


def remove_pidfile(path: str, pid: int) -> None:
    """Remove the pid file if it still names pid."""
    try:
        if read_pid(path) == pid:
            os.unlink(path)
    except (OSError, VdiskError):
        pass
