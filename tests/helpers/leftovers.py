"""What a run may leave behind, found and cleared: mounts, loop devices, processes.

Processes started by a test session carry SESSION_ENV=<token> in their environment
(tests/conftest.py sets it), so that they can be told from those of other runs on the
same machine, also after they daemonized themselves.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vdisk.service.mounts import force_unmount

SESSION_ENV = "VDISK_TEST_SESSION"
# programs a session starts that hold images, mounts or sockets (matched on argv[0..2])
DAEMONS = ("vdisk", "qemu-storage-daemon", "qemu-nbd", "qemu-io", "faulty_fs.py", "slow_fs.py",
           "torture.py", "torture_lib.worker", "bench.py", "nbdkit", "nbd-server", "nginx")


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[Mount]:
    """Every mount of this mount namespace (/proc/self/mountinfo), in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if " - " not in line or len(fields) < 5:
                continue
            fstype = line.split(" - ", 1)[1].split()[0]
            out.append(Mount(_unescape(fields[4]), fstype))
    return out


def under(path: str, root: str | os.PathLike[str]) -> bool:
    """path is root or below it."""
    root = os.fspath(root).rstrip("/")
    return path == root or path.startswith(root + "/")


def mounts_under(root: str | os.PathLike[str]) -> list[str]:
    """Mount points at root or below it."""
    return [m.point for m in mounts() if under(m.point, root)]


def loops() -> list[tuple[str, str]]:
    """(device, backing file) of every loop device in use (from /sys/block)."""
    out = []
    for back_file in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
        try:
            back = back_file.read_text().strip()
        except OSError:
            continue
        out.append((f"/dev/{back_file.parts[3]}", back.removesuffix(" (deleted)")))
    return out


def loops_under(root: str | os.PathLike[str]) -> list[str]:
    """Loop devices whose backing file is at root or below it."""
    return [name for name, back in loops() if under(back, root)]


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _is_daemon(argv: list[str]) -> bool:
    head = argv[:3]
    names = {os.path.basename(a) for a in head}
    if any(d in names for d in DAEMONS):
        return True
    return any(a == "-m" and b in DAEMONS for a, b in zip(head, head[1:], strict=False))


def session_processes(token: str) -> list[tuple[int, str]]:
    """(pid, command line) of the daemons whose environment holds SESSION_ENV=token,
    other than this process and its ancestors."""
    mine = f"{SESSION_ENV}={token}".encode()
    skip = {os.getpid()}
    pid = os.getppid()
    while pid > 1 and pid not in skip:
        skip.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if mine not in env.split(b"\0"):
            continue
        argv = _argv(int(name))
        if argv and _is_daemon(argv):
            found.append((int(name), " ".join(argv)))
    return found


def kill_all(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL for what is still there after grace seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def unmount_all(points: list[str]) -> None:
    """Detach mounts, innermost first."""
    for point in sorted(set(points), key=len, reverse=True):
        force_unmount(point)


def detach_loops(devices: list[str]) -> None:
    for dev in devices:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
