"""Servers as subprocesses, always cleaned up after.

launch() starts any server with a QMP socket (`vdisk serve`; the bench also starts
qemu-storage-daemon) and returns once the socket answers; stop() ends it. For the tests,
`vdisk serve` itself:

    with serving(tmp_path, "id=d0,file=/path/top.qcow2") as srv:
        data = srv.path("d0").read_bytes()     # the drive's FUSE file
        srv.qmp("query-block")                 # one command over qemu.qmp's legacy client
        assert srv.stop() == 0                 # SIGTERM, wait; stderr in srv.stderr

On leaving the block (also on failure) the daemon is stopped (SIGTERM, then SIGKILL after
a grace period) and any mount left at the mount point is lazily unmounted, so a failing
test never leaves a mount or a process behind.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from control.client import qmp_listening
from tests.helpers import ROOT
from tests.helpers.commands import vdisk, vdisk_cmd
from tests.helpers.qmp import qmp_command
from vdisk.service.mounts import force_unmount, is_mounted  # noqa: F401 (re-exported)
from vdisk.service.pidfile import process_alive

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class StartError(RuntimeError):
    """The server exited, or did not answer on its QMP socket in time."""


def log_tail(path: Path, start: int = 0, lines: int = 40) -> str:
    """The last lines a log file got from byte offset start on."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def stop(proc: subprocess.Popen[Any], sig: int | None = signal.SIGTERM,
         timeout: float = STOP_TIMEOUT) -> int:
    """Send sig (if it still runs; None: it was told to stop already) and wait; SIGKILL if
    it is not gone after timeout seconds. Its exit status (-9 when it had to be killed)."""
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=timeout)


def launch(cmd: Sequence[str], *, qmp_path: Path, log_path: Path, name: str = "vdisk serve",
           cwd: Path = ROOT, ready: Callable[[], bool] | None = None,
           mount: Path | None = None, timeout: float = START_TIMEOUT, append: bool = False,
           new_session: bool = False) -> subprocess.Popen[bytes]:
    """Start cmd, its stdout and stderr going to log_path (appended to with append), and
    return once a server answers on the QMP socket qmp_path (and ready(), if given, is
    true). If it exits first, or is not ready within timeout seconds, it is stopped (and
    whatever is mounted at mount is detached) and StartError says why, with the end of
    its log: it is never left running, also on Ctrl-C."""
    start = log_path.stat().st_size if append and log_path.exists() else 0
    with open(log_path, "ab" if append else "wb") as log:
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=new_session)
    try:
        deadline = time.monotonic() + timeout
        while not (qmp_listening(qmp_path) and (ready is None or ready())):
            if proc.poll() is not None:
                raise StartError(f"{name} exited with status {proc.returncode}:\n"
                                 f"{log_tail(log_path, start)}")
            if time.monotonic() > deadline:
                raise StartError(f"{name} did not start in {timeout:.0f} s:\n"
                                 f"{log_tail(log_path, start)}")
            time.sleep(0.02)
    except BaseException:
        try:
            stop(proc, timeout=10)
        finally:
            if mount is not None:
                force_unmount(mount)
        raise
    return proc


def wait_gone(pid: int, timeout: float = 30) -> None:
    """Wait for a process that is not our child (a daemonized vdisk) to end."""
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still running"
        time.sleep(0.05)


class Served:
    """A running `vdisk serve`."""

    def __init__(self, proc: subprocess.Popen[bytes], mount: Path, qmp_path: Path,
                 log_path: Path) -> None:
        self.proc = proc
        self.mount = mount
        self.qmp_path = qmp_path
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def path(self, drive_id: str) -> Path:
        """The FUSE file of a drive."""
        return self.mount / drive_id

    def qmp(self, command: str, **args: Any) -> Any:
        """Run one QMP command with qemu.qmp's legacy client; its return value."""
        return qmp_command(self.qmp_path, command, **args)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the daemon to exit by itself; its exit status."""
        return self.proc.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send sig (if still running) and wait for the exit; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """kill -9, leaving the dead mount behind (as a crash would)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)


def start(
    tmp_path: Path,
    drives: Sequence[str],
    *,
    extra: Sequence[str] = (),
    mount: Path | None = None,
    qmp_path: Path | None = None,
    name: str = "serve",
) -> Served:
    """Start `vdisk serve` and wait until its QMP socket accepts (the mount is then live)."""
    mount = mount or tmp_path / "mnt"
    qmp_path = qmp_path or tmp_path / "qmp.sock"
    log_path = tmp_path / f"{name}.log"
    args = ["serve", "--mount", str(mount), "--qmp", str(qmp_path)]
    for d in drives:
        args += ["--drive", d]
    proc = launch(vdisk_cmd(*args, *extra), qmp_path=qmp_path, log_path=log_path, mount=mount)
    return Served(proc, mount, qmp_path, log_path)


def cleanup(srv: Served) -> None:
    """Stop the daemon (SIGTERM, then SIGKILL) and make sure its mount is gone."""
    try:
        stop(srv.proc)
    finally:
        force_unmount(srv.mount)


@contextmanager
def serving(
    tmp_path: Path,
    *drives: str,
    extra: Sequence[str] = (),
    mount: Path | None = None,
    qmp_path: Path | None = None,
    name: str = "serve",
) -> Iterator[Served]:
    """`vdisk serve` with the given --drive specs for the duration of the block."""
    srv = start(tmp_path, drives, extra=extra, mount=mount, qmp_path=qmp_path, name=name)
    try:
        yield srv
    finally:
        cleanup(srv)


def run_serve(tmp_path: Path, args: Sequence[str], timeout: float = 30.0
              ) -> subprocess.CompletedProcess[str]:
    """Run `vdisk serve ARGS` to completion (for start-up errors)."""
    return vdisk("serve", *args, check=False, timeout=timeout)

