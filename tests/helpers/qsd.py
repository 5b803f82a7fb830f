"""qemu-storage-daemon 7.2 as the oracle for QMP answers and events.

    with qsd_serving(tmp_path, Node("d0", top), Node("ro", other, read_only=True)) as sock:
        with qmp_session(sock) as q: ...

Each Node is a format node named like a vdisk drive id over a file node; its backing
chain is opened from the image header, as vdisk does. No export: the tests compare the
QMP plane. The daemon is stopped on leaving the block, also on failure.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.daemon import launch, stop


@dataclass(frozen=True)
class Node:
    name: str
    file: Path
    fmt: str = "qcow2"
    read_only: bool = False

    def args(self) -> list[str]:
        ro = ",read-only=on" if self.read_only else ""
        return ["--blockdev", f"driver=file,node-name={self.name}-file,filename={self.file}{ro}",
                "--blockdev", f"driver={self.fmt},node-name={self.name},file={self.name}-file{ro}"]


@contextmanager
def qsd_serving(tmp_path: Path, *nodes: Node, name: str = "qsd") -> Iterator[Path]:
    """A qemu-storage-daemon with these nodes and a QMP monitor; yields the socket path."""
    args: list[str] = []
    for node in nodes:
        args += node.args()
    with _qsd(tmp_path, args, name) as sock:
        yield sock


@contextmanager
def _qsd(tmp_path: Path, args: list[str], name: str) -> Iterator[Path]:
    """qemu-storage-daemon with these block arguments and a QMP monitor on
    tmp_path/NAME.sock; stopped on leaving the block."""
    sock = tmp_path / f"{name}.sock"
    cmd = ["qemu-storage-daemon", *args,
           "--chardev", f"socket,path={sock},server=on,wait=off,id=mon0",
           "--monitor", "chardev=mon0"]
    proc = launch(cmd, qmp_path=sock, log_path=tmp_path / f"{name}.log",
                  name="qemu-storage-daemon")
    try:
        yield sock
    finally:
        stop(proc)


needs_qsd = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                               reason="needs qemu-storage-daemon")


@contextmanager
def qsd_chain(tmp_path: Path, top: Path, node_name: str = "top",
              name: str = "qsd") -> Iterator[Path]:
    """qemu-storage-daemon with `top` (qcow2) as node `node_name`, its file node made by
    QEMU (file.driver=file), the way QEMU opens a drive; yields its QMP socket."""
    args = ["--blockdev", f"driver=qcow2,node-name={node_name},file.driver=file,"
                          f"file.filename={top}"]
    with _qsd(tmp_path, args, name) as sock:
        yield sock
