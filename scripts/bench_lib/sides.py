"""The two servers under test, started the same way on the same chain copy.

Each side is a context manager: it starts the daemon, waits until the served file and the
QMP socket work, and on exit (also on failure or Ctrl-C) stops the daemon, kills it if it
lingers, and unmounts whatever it left behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_lib.chain import Chain
from control.client import qmp_listening
from vdisk.service.mounts import force_unmount, is_mounted  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of pid, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Side:
    """A running server: `file` is the served raw file, `device` the QMP stream target."""

    name = "?"
    device = "?"

    def __init__(self, chain: Chain, work: Path, *, copy_on_read: bool = False,
                 streamable: bool = False) -> None:
        self.chain = chain
        self.streamable = streamable
        self.work = work
        self.copy_on_read = copy_on_read
        self.qmp_path = work / f"{self.name}-qmp.sock"
        self.log_path = work / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.mount: Path = work / "mnt"
        self.file: Path = work / "mnt"

    def command(self) -> list[str]:
        raise NotImplementedError

    def cwd(self) -> Path:
        return ROOT

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> Side:
        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.cwd(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not (qmp_listening(self.qmp_path) and is_mounted(self.mount)):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                       f"{self.log_path.read_text(errors='replace')[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start (see {self.log_path})")
                time.sleep(0.05)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=STOP_TIMEOUT)
        finally:
            force_unmount(self.mount)

    def qmp(self) -> Any:
        """A connected qemu.qmp legacy client (close it when done)."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        client = QEMUMonitorProtocol(str(self.qmp_path))
        client.connect()
        return client

    def memory(self) -> dict[str, int]:
        return memory(self.pid)


class VdiskSide(Side):
    name = "vdisk"
    device = "d0"
    source = ROOT  # where `python -m vdisk` runs from (a checked-out revision, or the tree)

    def cwd(self) -> Path:
        return self.source

    def __init__(self, chain: Chain, work: Path, **kw: bool) -> None:
        super().__init__(chain, work, **kw)
        self.mount = work / "mnt"
        self.file = self.mount / "d0"

    def command(self) -> list[str]:
        cor = "on" if self.copy_on_read else "off"
        return ["env", f"PYTHONPATH={self.source}", sys.executable, "-m", "vdisk", "serve", "--mount", str(self.mount),
                "--qmp", str(self.qmp_path), "--log-level", "warning",
                "--drive", f"id=d0,file={self.chain.top},copy-on-read={cor}"]


class QsdSide(Side):
    name = "qsd"
    device = "fmt0"

    def __init__(self, chain: Chain, work: Path, **kw: bool) -> None:
        super().__init__(chain, work, **kw)
        self.mount = self.file = work / "export.raw"  # a FUSE export mounts over a file

    def command(self) -> list[str]:
        self.mount.touch()
        node = "fmt0"
        cmd = ["qemu-storage-daemon",
               "--blockdev", f"driver=file,node-name=file0,filename={self.chain.top}",
               "--blockdev", "driver=qcow2,node-name=fmt0,file=file0"]
        if self.copy_on_read:
            cmd += ["--blockdev", "driver=copy-on-read,node-name=cor0,file=fmt0"]
            node = "cor0"
        # QEMU 7.2's writable FUSE export holds RESIZE, which block-stream's filter node
        # refuses to share: a stream needs a read-only export (see docs/PERFORMANCE.md)
        writable = "off" if self.streamable else "on"
        cmd += ["--export", f"type=fuse,id=exp0,node-name={node},mountpoint={self.mount},"
                f"writable={writable}",
                "--chardev", f"socket,path={self.qmp_path},server=on,wait=off,id=mon0",
                "--monitor", "chardev=mon0"]
        return cmd


SIDES: dict[str, type[Side]] = {"vdisk": VdiskSide, "qsd": QsdSide}
