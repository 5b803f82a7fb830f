"""Real clients on the FUSE file: a loop device with ext4 (fsck clean, fstrim through
fallocate), and qemu-io / qemu-img treating it as a raw image."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.commands import guest_view, qemu_img, qemu_io, run
from tests.helpers.daemon import serving

MiB = 1 << 20


def _losetup(path: Path) -> str:
    res = subprocess.run(["losetup", "-f", "--show", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"no loop device: {res.stderr.strip()}")
    return res.stdout.strip()


@pytest.mark.slow
@pytest.mark.root
def test_ext4_on_loop_device(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, "96M")
    qemu_io(base, "write -P 0xee 0 8M")  # junk under the file system
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd=tmp_path)
    fs = tmp_path / "fs"
    fs.mkdir()
    files = {f"f{i}": os.urandom(300_000 * (i + 1)) for i in range(6)}
    with serving(tmp_path, f"id=disk,file={top}") as srv:
        loop = _losetup(srv.path("disk"))
        mounted = False
        try:
            run("mkfs.ext4", "-q", "-F", loop)
            run("mount", "-t", "ext4", loop, fs)
            mounted = True
            for name, data in files.items():
                (fs / name).write_bytes(data)
            os.sync()
            (fs / "f0").unlink()
            trim = run("fstrim", "-v", fs)
            assert "trimmed" in trim.stdout
            run("umount", fs)
            mounted = False
            run("fsck.ext4", "-fn", loop)
            run("mount", "-t", "ext4", "-o", "ro", loop, fs)
            mounted = True
            for name, data in files.items():
                if name != "f0":
                    assert (fs / name).read_bytes() == data
            run("umount", fs)
            mounted = False
        finally:
            if mounted:
                subprocess.run(["umount", "-l", str(fs)], check=False)
            subprocess.run(["losetup", "-d", loop], check=False)
        assert srv.stop() == 0
    qemu_img("check", top)
    # the image alone (no daemon) still holds a clean file system
    raw = tmp_path / "disk.raw"
    raw.write_bytes(guest_view(top, tmp_path))
    run("fsck.ext4", "-fn", raw)


def test_qemu_tools_as_raw_clients(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", top, "4M")
    qemu_io(top, "write -P 0x12 1M 64k")
    with serving(tmp_path, f"id=d0,file={top}") as srv:
        dev = srv.path("d0")
        qemu_io(dev, "write -P 0xab 100k 70k", "read -P 0xab 100k 70k", "read -P 0x12 1M 64k",
                "write -z 1M 4k", "read -P 0 1M 4k", "flush", fmt="raw")
        # discard through fallocate(PUNCH_HOLE): reads as zeroes afterwards
        qemu_io(dev, "discard 120k 8k", "read -P 0 120k 8k", fmt="raw")
        qemu_img("compare", "-U", "-f", "raw", "-F", "qcow2", dev, top)
        assert srv.stop() == 0
    expect = tmp_path / "expect.raw"
    qemu_img("create", "-f", "raw", expect, "4M")
    qemu_io(expect, "write -P 0x12 1M 64k", "write -P 0xab 100k 70k", "write -z 1M 4k",
            "write -z 120k 8k", fmt="raw")
    qemu_img("compare", "-f", "qcow2", "-F", "raw", top, expect)
    qemu_img("check", top)
