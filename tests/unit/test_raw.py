"""The raw driver against qemu-img/qemu-io as oracles."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.helpers.commands import qemu_img, qemu_info, qemu_io, qemu_map
from vdisk.engine.image import Status
from vdisk.engine.raw import create_raw, open_raw
from vdisk.errors import ImageError, ReadOnlyError, UnsupportedImageError

MiB = 1 << 20


def runs(img, start: int = 0) -> list[tuple[int, int, Status]]:
    out = []
    off = start
    while off < img.virtual_size:
        ext = img.layer_status(off, img.virtual_size - off)
        assert ext.offset == off and ext.length > 0
        if out and out[-1][2] is ext.status:
            out[-1] = (out[-1][0], out[-1][1] + ext.length, ext.status)
        else:
            out.append((off, ext.length, ext.status))
        off += ext.length
    return out


def qemu_runs(path: Path) -> list[tuple[int, int, Status]]:
    return [
        (e["start"], e["length"], Status.DATA if e["data"] else Status.ZERO)
        for e in qemu_map(path)
    ]


def test_create_matches_qemu(tmp_path: Path) -> None:
    p = tmp_path / "a.raw"
    create_raw(str(p), 3 * MiB + 100)
    info = qemu_info(p)
    assert info["format"] == "raw"
    assert info["virtual-size"] == 3 * MiB + 512
    with open_raw(str(p), read_only=True) as img:
        assert img.virtual_size == info["virtual-size"]
        ours = img.info()
        for key in ("virtual-size", "format", "actual-size", "dirty-flag"):
            assert ours[key] == info[key], key
        assert img.cluster_size == 65536
        assert img.backing is None and img.backing_name is None


def test_odd_sized_file_like_qemu(tmp_path: Path) -> None:
    p = tmp_path / "odd.raw"
    p.write_bytes(os.urandom(1000))
    with open_raw(str(p), read_only=True) as img:
        assert img.virtual_size == qemu_info(p)["virtual-size"] == 1024
        assert runs(img) == qemu_runs(p)
        assert img.read(0, 1024) == p.read_bytes() + bytes(24)


def test_write_read_and_status_match_qemu(tmp_path: Path) -> None:
    p = tmp_path / "b.raw"
    qemu_img("create", "-f", "raw", p, "8M")
    with open_raw(str(p), read_only=False) as img:
        img.write(MiB, b"\x11" * 65536)
        img.write(5 * MiB + 512, memoryview(b"\x22" * 4096))
        img.flush()
        assert img.read(MiB, 65536) == b"\x11" * 65536
        assert runs(img) == qemu_runs(p)
    qemu_io(p, "read -P 0x11 1M 64k", "read -P 0x22 5243392 4k", "read -P 0 2M 1M", fmt="raw")


def test_write_zeroes_unmap_punches_hole(tmp_path: Path) -> None:
    p = tmp_path / "c.raw"
    create_raw(str(p), 4 * MiB)
    with open_raw(str(p), read_only=False) as img:
        img.write(0, os.urandom(4 * MiB))
        img.flush()
        before = os.stat(p).st_blocks
        img.write_zeroes(MiB, 2 * MiB, unmap=True)
        img.write_zeroes(3 * MiB + 4096, 8192, unmap=False)
        img.flush()
        assert os.stat(p).st_blocks < before
        # before reading: ext4 reports cached pages of unwritten extents as data
        assert (MiB, 2 * MiB, Status.ZERO) in runs(img)
        assert runs(img) == qemu_runs(p)
        assert img.read(MiB, 2 * MiB) == bytes(2 * MiB)
        assert img.read(3 * MiB + 4096, 8192) == bytes(8192)
        assert img.virtual_size == 4 * MiB == os.stat(p).st_size
    qemu_io(p, "read -P 0 1M 2M", "read -P 0 3149824 8k", fmt="raw")


def test_never_grows(tmp_path: Path) -> None:
    p = tmp_path / "d.raw"
    create_raw(str(p), MiB)
    with open_raw(str(p), read_only=False) as img:
        with pytest.raises(OSError) as e:
            img.write(MiB - 512, b"x" * 1024)
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError):
            img.write_zeroes(MiB, 512)
        img.write(MiB - 512, b"y" * 512)
    assert os.path.getsize(p) == MiB


def test_read_only_refuses_writes(tmp_path: Path) -> None:
    p = tmp_path / "e.raw"
    create_raw(str(p), MiB)
    img = open_raw(str(p), read_only=True)
    with pytest.raises(ReadOnlyError):
        img.write(0, b"a")
    with pytest.raises(ReadOnlyError):
        img.write_zeroes(0, 512)
    with pytest.raises(UnsupportedImageError):
        img.set_backing("x.raw", "raw")
    img.set_backing(None, None)
    img.close()
    img.close()  # idempotent
    with pytest.raises(OSError):
        img.read(0, 1)


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="No such file"):
        open_raw(str(tmp_path / "missing.raw"), read_only=True)
    with pytest.raises(ImageError, match="directory"):
        open_raw(str(tmp_path), read_only=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="FIFO, not a regular file"):
        open_raw(str(fifo), read_only=True)


def test_probed_raw_refuses_qcow2_magic(tmp_path: Path) -> None:
    from vdisk.engine.chain import close_chain, open_chain, probe_format

    p = tmp_path / "g.raw"
    create_raw(str(p), MiB)
    top = open_chain(str(p), read_only=False)
    try:
        with pytest.raises(OSError) as e:
            top.write(0, b"QFI\xfb" + bytes(508))
        assert e.value.errno == errno.EPERM
        top.write(0, b"QF")
        with pytest.raises(OSError):
            top.write(2, b"I\xfb")
        top.write(512, b"QFI\xfb")
    finally:
        close_chain(top)
    assert probe_format(str(p)) == "raw"
    top = open_chain(str(p), fmt="raw", read_only=False)  # explicit format: allowed
    try:
        top.write(0, b"QFI\xfb")
    finally:
        close_chain(top)
