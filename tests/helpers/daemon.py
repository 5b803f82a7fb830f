"""Test helper: run `vdisk serve` as a subprocess, and always clean up after it.

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
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from control.client import qmp_listening
from vdisk.service.mounts import force_unmount, is_mounted  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0


def vdisk_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vdisk", *args]


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
        from qemu.qmp.legacy import QEMUMonitorProtocol

        client = QEMUMonitorProtocol(str(self.qmp_path))
        client.connect()
        try:
            return client.cmd(command, **args)
        finally:
            try:
                client.close()
            except EOFError:  # the server closed first (expected after 'quit')
                if command != "quit":
                    raise

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
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(vdisk_cmd(*args, *extra), cwd=ROOT, stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
    srv = Served(proc, mount, qmp_path, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while not qmp_listening(qmp_path):
        if proc.poll() is not None:
            raise RuntimeError(f"vdisk serve exited with {proc.returncode}:\n{srv.stderr}")
        if time.monotonic() > deadline:
            cleanup(srv)
            raise RuntimeError(f"vdisk serve did not start:\n{srv.stderr}")
        time.sleep(0.02)
    return srv


def cleanup(srv: Served) -> None:
    """Stop the daemon (SIGTERM, then SIGKILL) and make sure its mount is gone."""
    try:
        if srv.proc.poll() is None:
            srv.proc.send_signal(signal.SIGTERM)
            try:
                srv.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                srv.proc.kill()
                srv.proc.wait(timeout=STOP_TIMEOUT)
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


def run_serve(tmp_path: Path, args: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `vdisk serve ARGS` to completion (for start-up errors)."""
    return subprocess.run(vdisk_cmd("serve", *args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
