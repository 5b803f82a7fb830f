"""qemu-storage-daemon 7.2 as the oracle for QMP answers: one qcow2 chain opened the way
QEMU opens a drive (the top as a blockdev, its backing chain from the image headers), a
QMP monitor on a UNIX socket; always stopped after."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.daemon import launch, stop

needs_qsd = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                               reason="needs qemu-storage-daemon")


@contextmanager
def qsd_serving(tmp_path: Path, top: Path, node_name: str = "top",
                name: str = "qsd") -> Iterator[Path]:
    """qemu-storage-daemon with `top` (qcow2) as node `node_name`; yields its QMP socket."""
    sock = tmp_path / f"{name}.sock"
    cmd = ["qemu-storage-daemon",
           "--blockdev", f"driver=qcow2,node-name={node_name},file.driver=file,"
                         f"file.filename={top}",
           "--chardev", f"socket,path={sock},server=on,wait=off,id=mon0",
           "--monitor", "chardev=mon0"]
    proc = launch(cmd, qmp_path=sock, log_path=tmp_path / f"{name}.log",
                  name="qemu-storage-daemon")
    try:
        yield sock
    finally:
        stop(proc)
