"""The two servers under test, started the same way on the same chain copy.

Each side is a context manager: it starts the daemon, waits until the served file and the
QMP socket work, and on exit (also on failure or Ctrl-C) stops the daemon, kills it if it
lingers, and unmounts whatever it left behind.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench_lib.chain import Chain
from tests.helpers import ROOT
from tests.helpers.daemon import launch, stop
from tests.helpers.qmp import QMP
from vdisk.service.mounts import force_unmount, is_mounted


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
        self.proc = launch(self.command(), qmp_path=self.qmp_path, log_path=self.log_path,
                           name=self.name, cwd=self.cwd(), mount=self.mount,
                           ready=lambda: is_mounted(self.mount))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.proc is not None:
                stop(self.proc)
        finally:
            force_unmount(self.mount)

    def qmp(self) -> QMP:
        """A QMP session (close it when done)."""
        return QMP(self.qmp_path)

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
