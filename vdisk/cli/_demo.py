"""`vdisk demo`: a guided tour that builds a chain, serves it, streams it live, checks it.

Everything happens in a fresh temporary folder that is removed at the end, also on Ctrl-C
and on errors: the filesystem mount and the loop device are released first, then the
daemon is stopped (it runs in its own session, so a terminal's Ctrl-C reaches only us and
the teardown keeps its order), then the folder is deleted.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import trio

from control.client import QMPClient
from vdisk.cli._progress import Progress, human
from vdisk.engine.chain import close_chain, iter_chain, open_chain
from vdisk.errors import VdiskError

SIZE = 64 << 20  # virtual size of the disk
FILES = 8
FILE_SIZE = 3 << 20
DEFAULT_SPEED = 4 << 20  # bytes/s: the stream of ~25 MiB stays visible for a few seconds
READ_PAUSE = 0.12  # seconds between MiB read through the mount, for the same reason
START_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0
POLL = 0.2
DRIVE = "disk0"
# Where Debian keeps mkfs.ext4, losetup and mount: not on a normal user's PATH.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
PACKAGES = {"mkfs.ext4": "e2fsprogs", "losetup": "util-linux", "mount": "mount",
            "umount": "mount", "fusermount3": "fuse3"}  # Debian's name for each tool


@dataclass
class Demo:
    """The demo's resources, released by `teardown` in reverse order of creation."""

    out: TextIO
    speed: int = DEFAULT_SPEED
    tmp: str = ""
    daemon: subprocess.Popen[bytes] | None = None
    loop: str | None = None
    fs_mounted: bool = False
    notes: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def p(self, *names: str) -> str:
        return os.path.join(self.tmp, *names)


def sha256_file(path: str, pause: Callable[[], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if pause is not None:
                pause()
    return h.hexdigest()


def find_tool(name: str) -> str | None:
    """The path of a host tool: on PATH, else in the sbin folders; None if neither."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def tool(name: str) -> str:
    """find_tool, or VdiskError saying that the tool is missing and what provides it."""
    path = find_tool(name)
    if path is None:
        package = PACKAGES.get(name)
        hint = f" (Debian/Ubuntu package {package})" if package else ""
        raise VdiskError(f"{name} is not installed{hint}: not on PATH, nor in "
                         f"{', '.join(SBIN_DIRS)}")
    return path


def _run(*cmd: str) -> str:
    """Run a host tool; its stdout, or VdiskError with its last stderr line."""
    res = subprocess.run([tool(cmd[0]), *cmd[1:]], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        err = res.stderr.strip().splitlines()
        raise VdiskError(f"{cmd[0]} failed: {err[-1] if err else f'exit {res.returncode}'}")
    return res.stdout


# -- the chain -----------------------------------------------------------------------

def make_files(folder: str) -> dict[str, str]:
    """Files of random data (different sizes) in folder; their sha256 by name."""
    os.makedirs(folder)
    rng = random.Random(0x5EED)
    sums = {}
    for i in range(FILES):
        name = f"file{i}.bin"
        data = rng.randbytes(FILE_SIZE - i * 4096)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def chain_lines(top_path: str) -> list[str]:
    """One line per layer, top first: name, format, virtual size, allocated on disk."""
    top = open_chain(top_path, read_only=True, force_share=True)
    try:
        lines = []
        for img in iter_chain(top):
            info = img.info()
            disk = info.get("actual-size")
            on_disk = human(disk) if isinstance(disk, int) else "?"
            backing = f"backing {img.backing_name}" if img.backing_name else "no backing file"
            lines.append(
                f"    {os.path.basename(img.path)}: {img.format_name}, "
                f"{human(img.virtual_size)}, {on_disk} on disk, {backing}"
            )
        return lines
    finally:
        close_chain(top)


def build_chain(demo: Demo) -> dict[str, str]:
    from vdisk.engine.qcow2 import create_qcow2

    sums = make_files(demo.p("files"))
    total = sum(os.path.getsize(demo.p("files", n)) for n in sums)
    _run("mkfs.ext4", "-q", "-F", "-L", "vdisk-demo", "-d", demo.p("files"),
         demo.p("base.raw"), f"{SIZE >> 20}M")
    create_qcow2(demo.p("top.qcow2"), SIZE, backing_name="base.raw", backing_format="raw")
    demo.say(f"1. Built a {human(SIZE)} ext4 disk holding {len(sums)} files "
             f"({human(total)}) in base.raw (mkfs.ext4 -d), and an empty qcow2 overlay "
             "top.qcow2 on it (vdisk's create API). The chain:")
    for line in chain_lines(demo.p("top.qcow2")):
        demo.say(line)
    return sums


# -- the daemon ----------------------------------------------------------------------

def _accepting(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _log_tail(demo: Demo) -> str:
    try:
        with open(demo.p("serve.log"), errors="replace") as f:
            lines = f.read().strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def start_daemon(demo: Demo) -> None:
    cmd = [sys.executable, "-m", "vdisk", "serve", "--mount", demo.p("mnt"),
           "--qmp", demo.p("qmp.sock"),
           "--drive", f"id={DRIVE},file={demo.p('top.qcow2')},format=qcow2"]
    with open(demo.p("serve.log"), "wb") as log:
        demo.daemon = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not _accepting(demo.p("qmp.sock")):
        if demo.daemon.poll() is not None:
            raise VdiskError(f"vdisk serve exited with status {demo.daemon.returncode}: "
                             f"{_log_tail(demo)}")
        if time.monotonic() > deadline:
            raise VdiskError(f"vdisk serve did not start in {START_TIMEOUT:.0f} s")
        time.sleep(0.05)
    demo.say(f"2. Started `vdisk serve` (pid {demo.daemon.pid}): the top image is the raw "
             f"file mnt/{DRIVE} (FUSE), controlled over the QMP socket qmp.sock.")


def stop_daemon(demo: Demo) -> int | None:
    proc, demo.daemon = demo.daemon, None
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    mnt = os.path.realpath(demo.p("mnt"))
    fusermount = find_tool("fusermount3")
    if _mounted(mnt) and fusermount:  # only if the daemon died without unmounting
        subprocess.run([fusermount, "-u", "-z", mnt], capture_output=True, check=False)
    return proc.returncode


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(len(line.split()) > 4 and line.split()[4] == path for line in f)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def fuse_unavailable(device: str = "/dev/fuse", mtab: str = "/etc/mtab") -> str | None:
    """Why this user cannot serve a FUSE file system here, or None if it can."""
    if not os.path.exists(device):
        return (f"there is no {device} (load the kernel module: modprobe fuse; "
                "in a container, pass the device in)")
    if not os.access(device, os.R_OK | os.W_OK):
        st, user = os.stat(device), _user_name(os.geteuid())
        group = _group(st.st_gid)
        if st.st_mode & 0o060 == 0o060 and st.st_gid != 0:  # the group may: join it
            fix = f"add {user} to group {group} (as root: adduser {user} {group}; log in again)"
        else:
            fix = (f"give {user} read and write access to {device} (for example a group "
                   "that owns it, with mode 0660)")
        return (f"{device} is {stat.filemode(st.st_mode)} {_user_name(st.st_uid)}:{group}, "
                f"so user {user} cannot open it. Run the demo as root, or {fix}")
    if os.geteuid() != 0:
        path = find_tool("fusermount3")
        if path is None:
            return ("fusermount3 is not installed (Debian/Ubuntu package fuse3); users "
                    "other than root need it to mount")
        st = os.stat(path)
        if not (st.st_mode & stat.S_ISUID and st.st_uid == 0):
            return f"{path} is not setuid root, so users other than root cannot mount with it"
        if not os.path.exists(mtab):  # it could mount, but not unmount: a mount left behind
            return (f"there is no {mtab}, which fusermount3 needs to unmount for users other "
                    f"than root. As root: ln -s ../proc/self/mounts {mtab}")
    return None


# -- the mount -----------------------------------------------------------------------

def loop_unavailable() -> str | None:
    """Why the disk cannot be mounted through a loop device here, or None if it can."""
    if os.geteuid() != 0:
        return "not running as root"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control"
    for name in ("losetup", "mount", "umount"):
        if find_tool(name) is None:
            return f"{name} is not installed"
    return None


def mount_disk(demo: Demo) -> bool:
    """Attach the FUSE file to a loop device and mount its ext4 read-only; False to skip."""
    why = loop_unavailable()
    if why is None:
        try:
            demo.loop = _run("losetup", "--find", "--show", "--read-only",
                             demo.p("mnt", DRIVE)).strip()
            os.makedirs(demo.p("fs"))
            _run("mount", "-t", "ext4", "-o", "ro,noload", demo.loop, demo.p("fs"))
            demo.fs_mounted = True
        except VdiskError as e:
            why = str(e)
    if why is not None:
        demo.say(f"3. Skipping the loop mount ({why}); reading the raw file mnt/{DRIVE} "
                 "instead.")
        return False
    demo.say(f"3. Attached mnt/{DRIVE} to {demo.loop} and mounted its ext4 read-only "
             "on fs/ (losetup, mount).")
    return True


# -- the stream ----------------------------------------------------------------------

class Stopped(Exception):
    """The reader thread was told to stop."""


def _read_files(
    demo: Demo, names: list[str], mounted: bool, stop: threading.Event
) -> dict[str, str]:
    """sha256 of each file through the mount (or of the whole drive file), read slowly
    enough that the stream and the reads visibly overlap; stops early once stop is set."""

    def pause() -> None:
        if stop.wait(READ_PAUSE):
            raise Stopped()

    if not mounted:
        return {DRIVE: sha256_file(demo.p("mnt", DRIVE), pause)}
    return {n: sha256_file(demo.p("fs", n), pause) for n in names}


async def stream(demo: Demo, names: list[str], mounted: bool) -> tuple[dict[str, str], str]:
    """Start block-stream, show its progress while reading; (sums read, final event line)."""
    progress = Progress(demo.out)
    async with await QMPClient.connect(demo.p("qmp.sock")) as qmp:
        await qmp.execute("block-stream", {"device": DRIVE, "speed": demo.speed})
        demo.say(f"4. Streaming: QMP block-stream device={DRIVE} speed={human(demo.speed)}/s "
                 "copies base.raw's data into top.qcow2 while we read the files "
                 "(copy-on-read helps):")
        result: dict[str, dict[str, str]] = {}
        stop = threading.Event()

        async def reader() -> None:
            result["sums"] = await trio.to_thread.run_sync(
                _read_files, demo, names, mounted, stop
            )

        final: dict[str, Any] | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            try:
                while final is None:
                    jobs = await qmp.execute("query-block-jobs")
                    for job in jobs:
                        progress.update([(f"   {job['device']}", job["offset"], job["len"])])
                    for ev in qmp.pending_events():
                        if ev.get("event") in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                            final = ev
                    if final is None:
                        await trio.sleep(POLL)
            finally:
                if final is None:
                    stop.set()  # interrupted: let the reader thread end now
        data = final["data"]
        progress.update([(f"   {data['device']}", data["offset"], data["len"])], force=True)
        if final["event"] != "BLOCK_JOB_COMPLETED" or "error" in data:
            raise VdiskError(f"the stream did not complete: {final['event']} "
                             f"{data.get('error', '')}".strip())
        depth = (await qmp.execute("query-block"))[0]["inserted"]["backing_file_depth"]
    return result["sums"], (f"   BLOCK_JOB_COMPLETED: the job went over all {human(data['len'])}; "
                            f"query-block now shows backing_file_depth {depth}.")


# -- the whole run -------------------------------------------------------------------

def _single(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception to report from a trio nursery's group (Ctrl-C wins)."""
    if eg.subgroup(KeyboardInterrupt) is not None:
        return KeyboardInterrupt()
    leaves: list[BaseException] = []
    todo: list[BaseException] = [eg]
    while todo:
        e = todo.pop()
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        elif not isinstance(e, trio.Cancelled):
            leaves.append(e)
    return leaves[0] if len(leaves) == 1 else eg


def teardown(demo: Demo, keep_folder: bool = False) -> list[str]:
    """Release everything (each step independent of the others); what failed."""
    problems = []
    if demo.fs_mounted:
        umount = find_tool("umount") or "umount"
        res = subprocess.run([umount, demo.p("fs")], capture_output=True, check=False)
        if res.returncode != 0:
            subprocess.run([umount, "-l", demo.p("fs")], capture_output=True, check=False)
        if _mounted(os.path.realpath(demo.p("fs"))):
            problems.append(f"could not unmount {demo.p('fs')}")
        demo.fs_mounted = False
    if demo.loop is not None:
        losetup = find_tool("losetup") or "losetup"
        res = subprocess.run([losetup, "-d", demo.loop], capture_output=True, check=False)
        if res.returncode != 0:
            problems.append(f"losetup -d {demo.loop} failed")
        demo.loop = None
    try:
        status = stop_daemon(demo)
        if status not in (None, 0):
            problems.append(f"vdisk serve exited with status {status}: {_log_tail(demo)}")
    except OSError as e:
        problems.append(f"stopping vdisk serve: {e}")
    if demo.tmp and not keep_folder:
        shutil.rmtree(demo.tmp, ignore_errors=True)
        if os.path.exists(demo.tmp):
            problems.append(f"could not remove {demo.tmp}")
    return problems


def main_steps(demo: Demo) -> None:
    why = fuse_unavailable()
    if why is not None:
        raise VdiskError(f"cannot serve the disk through FUSE: {why}")
    sums = build_chain(demo)
    with open(demo.p("base.raw"), "rb") as f:
        disk_sum = hashlib.sha256(f.read()).hexdigest()
    start_daemon(demo)
    mounted = mount_disk(demo)
    try:
        read, event_line = trio.run(stream, demo, sorted(sums), mounted)
    except BaseExceptionGroup as eg:
        raise _single(eg) from None
    demo.say(event_line)
    expect = sums if mounted else {DRIVE: disk_sum}
    bad = [n for n in expect if read.get(n) != expect[n]]
    if bad:
        raise VdiskError(f"checksum mismatch: {', '.join(bad)}")
    what = f"{len(expect)} files" if mounted else f"the whole {human(SIZE)} disk"
    demo.say(f"5. Checksums verified: sha256 of {what} read during the stream match "
             "the originals.")
    loop = demo.loop
    for problem in teardown(demo, keep_folder=True):
        raise VdiskError(problem)
    if mounted:
        demo.say(f"6. Unmounted fs/, detached {loop}, stopped the daemon (SIGTERM). "
                 "The chain now:")
    else:
        demo.say("6. Stopped the daemon (SIGTERM), which unmounted mnt/. The chain now:")
    for line in chain_lines(demo.p("top.qcow2")):
        demo.say(line)
    top = open_chain(demo.p("top.qcow2"), read_only=True)
    try:
        if top.backing is not None:
            raise VdiskError("top.qcow2 still has a backing file after the stream")
        h = hashlib.sha256()
        for off in range(0, SIZE, 1 << 20):
            h.update(top.read(off, 1 << 20))
    finally:
        close_chain(top)
    if h.hexdigest() != disk_sum:
        raise VdiskError("top.qcow2 does not hold the same bytes as base.raw")
    demo.say("   top.qcow2 stands alone and reads back byte for byte like base.raw.")


def run_demo(out: TextIO | None = None, speed: int = DEFAULT_SPEED) -> int:
    """Run the demo; 0 on success, 130 on Ctrl-C. Errors raise VdiskError after cleanup."""
    demo = Demo(out or sys.stdout, speed=speed)
    demo.tmp = tempfile.mkdtemp(prefix="vdisk-demo-")
    demo.say(f"vdisk demo: working in {demo.tmp}")
    status = 0
    error: BaseException | None = None
    try:
        main_steps(demo)
    except KeyboardInterrupt:
        status = 130
    except Exception as e:  # reported in one line once everything is released
        error = e
    finally:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the teardown finish
        try:
            problems = teardown(demo)
        finally:
            signal.signal(signal.SIGINT, old)
    if status == 130:
        demo.say("Interrupted: cleaned up (mount, loop device, daemon, temporary folder).")
    if problems:
        raise VdiskError("demo clean-up: " + "; ".join(problems))
    if error is not None:
        if isinstance(error, OSError):
            where = f"{error.filename}: " if error.filename else ""
            raise VdiskError(f"demo failed: {where}{error.strerror or error}")
        if isinstance(error, VdiskError):
            raise VdiskError(f"demo failed: {error}")
        raise VdiskError(f"demo failed: {type(error).__name__}: {error}")
    if status == 0:
        demo.say(f"7. Removed {demo.tmp}. Done.")
    return status
