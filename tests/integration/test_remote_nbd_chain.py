"""Chains over NBD (qemu-nbd on a UNIX socket, started by the tests): a local qcow2 top
over nbd+unix, judged against qemu-img reading the very same chain through QEMU's own
NBD client (info, map, convert)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.chains import MiB, create, remote_site_images
from tests.helpers.commands import qemu_img, qemu_io, vdisk
from vdisk.engine.chain import close_chain, iter_chain, open_chain

SIZE = 8 * MiB


class QemuNbd:
    def __init__(self, image: Path, fmt: str, sock: Path) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-t", "--read-only", "--shared=8", "-f", fmt, "-x", "exp", "-k",
             str(sock), str(image)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)

    def url(self) -> str:
        return f"nbd+unix:///exp?socket={self.sock}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[QemuNbd, QemuNbd]]:
    """(mid's guest view as raw over NBD, a standalone qcow2 file's bytes over NBD)."""
    root = tmp_path / "root"
    remote_site_images(root)
    create(root / "solo.qcow2", SIZE)
    qemu_io(root / "solo.qcow2", "write -P 0x41 1M 2M", "write -c -P 0x42 6M 64k")
    a = QemuNbd(root / "mid.qcow2", "qcow2", tmp_path / "mid.sock")
    b = QemuNbd(root / "solo.qcow2", "raw", tmp_path / "solo.sock")
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def _top(tmp: Path, url: str, fmt: str, name: str) -> Path:
    top = create(tmp / name, SIZE, backing=url, backing_fmt=fmt)
    qemu_io(top, "write -P 0x31 0 64k", "write -P 0x32 3M 128k", "write -z 7M 64k")
    return top


@pytest.mark.slow
@pytest.mark.parametrize(("which", "fmt"), [(0, "raw"), (1, "qcow2")])
def test_top_over_nbd_unix_reads_maps_and_infos_like_qemu_img(
        served: tuple[QemuNbd, QemuNbd], tmp_path: Path, which: int, fmt: str) -> None:
    server = served[which]
    top = _top(tmp_path, server.url(), fmt, f"top{which}.qcow2")
    qemu_img("convert", "-O", "raw", top, tmp_path / "want.raw")
    want = (tmp_path / "want.raw").read_bytes()
    chain = open_chain(str(top), read_only=True)
    try:
        layers = list(iter_chain(chain))
        assert [i.remote for i in layers] == [False, True]
        assert layers[1].format_name == fmt and layers[1].path == server.url()
        got = bytearray(SIZE)
        for off in range(0, SIZE, MiB):
            chain.read_into(off, memoryview(got)[off:off + MiB])
        assert bytes(got) == want
    finally:
        close_chain(chain)
    ours = json.loads(vdisk("map", "--output", "json", top).stdout)
    theirs = json.loads(qemu_img("map", "--output", "json", top))
    assert ours == theirs
    info = json.loads(vdisk("info", "--backing-chain", "--output", "json", top).stdout)
    qinfo = json.loads(qemu_img("info", "--backing-chain", "--output", "json", top))
    keys = ("filename", "format", "virtual-size", "backing-filename", "full-backing-filename",
            "backing-filename-format", "cluster-size")
    assert [{k: i[k] for k in keys if k in i} for i in info] == [
        {k: i[k] for k in keys if k in i} for i in qinfo]
