"""Block devices as images and backing files (QEMU's host_device): loop devices here.

Raw and qcow2 on a device are served, written, streamed from and inspected; qemu-img
(compare, check, info, map) and qemu-io judge the results. A qcow2 image on a device
cannot grow it: allocation past the device's end fails with ENOSPC, and the image stays
consistent.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.chains import MiB, sha
from tests.helpers.commands import qemu_img, qemu_io, run, vdisk
from tests.helpers.daemon import serving
from tests.helpers.qmp import qmp_session

pytestmark = [pytest.mark.root, pytest.mark.slow]


@contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    """A loop device on backing for the block's duration (detached again after)."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    dev = run("losetup", "--find", "--show", backing).stdout.strip()
    try:
        yield dev
    finally:
        run("losetup", "-d", dev)


def _file(p: Path, size: int) -> Path:
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def _qcow2_source(tmp: Path) -> Path:
    src = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "32M")
    qemu_io(src, "write -P 0x11 0 1M", "write -P 0x22 5M 64k", "write -z 6M 1M",
            "write -P 0x33 31M 1M")
    return src


def test_info_map_check_of_devices_equal_qemu(tmp_path: Path) -> None:
    with loop_device(_file(tmp_path / "raw.img", 8 * MiB)) as raw_dev, \
            loop_device(_file(tmp_path / "q.img", 16 * MiB)) as q_dev:
        qemu_io(raw_dev, "write -P 7 1M 64k", fmt="raw")
        qemu_img("convert", "-O", "qcow2", _qcow2_source(tmp_path), q_dev)
        for dev in (raw_dev, q_dev):
            for extra in ([], ["--output=json"]):
                assert vdisk("info", *extra, dev).stdout == qemu_img("info", *extra, dev)
                assert vdisk("map", *extra, dev).stdout == run(
                    "qemu-img", "map", *extra, dev).stdout
        assert vdisk("check", q_dev).stdout == qemu_img("check", q_dev)
        res = vdisk("check", raw_dev, check=False)
        assert res.returncode == 63 == run("qemu-img", "check", raw_dev, check=False).returncode


def test_serve_raw_device(tmp_path: Path) -> None:
    back = _file(tmp_path / "raw.img", 16 * MiB)
    with loop_device(back) as dev:
        qemu_io(dev, "write -P 0x44 0 2M", fmt="raw")
        with serving(tmp_path, f"id=d0,file={dev},format=raw") as srv:
            served = srv.path("d0")
            assert served.stat().st_size == 16 * MiB
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", served, dev)
            qemu_io(served, "write -P 0x55 3M 1M", "flush", fmt="raw")
            assert srv.stop() == 0, srv.stderr
        qemu_io(dev, "read -P 0x55 3M 1M", "read -P 0x44 0 2M", fmt="raw")
    qemu_io(back, "read -P 0x55 3M 1M", fmt="raw")


def test_serve_qcow2_on_device_and_enospc(tmp_path: Path) -> None:
    src = _qcow2_source(tmp_path)
    want = tmp_path / "want.raw"
    qemu_img("convert", "-O", "raw", src, want)
    with loop_device(_file(tmp_path / "dev.img", 4 * MiB)) as dev:
        qemu_img("convert", "-O", "qcow2", src, dev)  # about 2.5 MiB of the 4 MiB used
        with serving(tmp_path, f"id=d0,file={dev}") as srv:
            served = srv.path("d0")
            assert served.stat().st_size == 32 * MiB
            assert sha(served) == sha(want)
            qemu_io(served, "write -P 0x66 8M 512k", "flush", fmt="raw")
            # the device is full before 4 MiB more are allocated: ENOSPC, nothing else
            fd = os.open(served, os.O_WRONLY)
            try:
                with pytest.raises(OSError) as ei:
                    for off in range(10 * MiB, 14 * MiB, MiB):
                        os.pwrite(fd, b"\x77" * MiB, off)
                        os.fsync(fd)
            finally:
                os.close(fd)
            assert ei.value.errno == errno.ENOSPC
            qemu_io(served, "read -P 0x66 8M 512k", "read -P 0x11 0 1M", fmt="raw")
            assert srv.stop() == 0, srv.stderr
        qemu_img("check", dev)  # consistent: no leaks, no corruption
        qemu_io(dev, "read -P 0x66 8M 512k", "read -P 0x22 5M 64k", "read -P 0x33 31M 1M",
                fmt="qcow2")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_overlay_on_device_backing_streams(tmp_path: Path, fmt: str) -> None:
    src = _qcow2_source(tmp_path)
    with loop_device(_file(tmp_path / "base.img", 32 * MiB)) as dev:
        qemu_img("convert", "-O", fmt, src, dev)
        top = tmp_path / "top.qcow2"
        vdisk("create", "-q", "-f", "qcow2", "-b", dev, "-F", fmt, top)
        qemu_io(top, "write -P 0x99 5M 4k")
        info = json.loads(vdisk("info", "--output=json", "--backing-chain", top).stdout)
        assert info == json.loads(qemu_img("info", "--output=json", "--backing-chain", top))
        expect = tmp_path / "expect.raw"
        qemu_img("convert", "-O", "raw", top, expect)
        with serving(tmp_path, f"id=d0,file={top},copy-on-read=off") as srv, \
                qmp_session(srv.qmp_path) as q:
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", srv.path("d0"), expect)
            assert q.ok("block-stream", device="d0") == {}
            ev = q.wait_event("BLOCK_JOB_COMPLETED")
            assert "error" not in ev["data"]
            assert srv.stop() == 0, srv.stderr
        assert "backing-filename" not in json.loads(qemu_img("info", "--output=json", top))
        qemu_img("check", top)
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, expect)
        qemu_io(dev, "read -P 0x22 5M 4k", fmt=fmt)  # the device was only read
