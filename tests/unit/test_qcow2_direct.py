"""Copies from the backing chain (Image.write_copy) skip the page cache: the top's new
clusters go through an O_DIRECT fd when the data is page-aligned memory, and through the
page cache otherwise; both leave the same image, judged by qemu-img and qemu-io."""

from __future__ import annotations

import mmap
import subprocess
from pathlib import Path

import pytest

from tests.helpers.commands import assert_clean, guest_view, qemu_img, qemu_io
from vdisk.engine import blocking
from vdisk.engine.chain import close_chain, open_chain

MiB = 1 << 20
SIZE = 16 * MiB


def resident(path: Path) -> int:
    """Bytes of path in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def aligned(data: bytes) -> memoryview:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return memoryview(buf)


def test_write_copy_bypasses_the_page_cache(tmp_path: Path) -> None:
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "raw", str(base), str(SIZE))
    qemu_io(base, "write -P 7 0 16M", fmt="raw")
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    img = open_chain(str(top), read_only=False)
    try:
        data = bytes([9]) * (4 * MiB)
        img.write_copy(0, aligned(data))  # page-aligned memory: O_DIRECT
        img.flush()
        assert img.f._direct >= 0  # type: ignore[attr-defined]
        assert resident(top) < MiB  # the 4 MiB never went through the cache (metadata may)
        img.write_copy(8 * MiB, data)  # bytes: not aligned, through the page cache
        assert resident(top) >= 4 * MiB
        img.write_copy(12 * MiB + 4096, aligned(data[:MiB]))  # a partial cluster: COW
        assert img.read(0, 4 * MiB) == data
    finally:
        close_chain(img)
    assert_clean(top)
    view = guest_view(top, tmp_path)
    assert view[:4 * MiB] == data and view[8 * MiB:12 * MiB] == data
    assert view[12 * MiB:12 * MiB + 4096] == bytes([7]) * 4096
    assert view[12 * MiB + 4096:13 * MiB + 4096] == data[:MiB]
    assert view[4 * MiB:8 * MiB] == bytes([7]) * (4 * MiB)


def test_write_copy_counts_as_blocking(tmp_path: Path) -> None:
    """An O_DIRECT write waits for the device: the loop guard's hook sees it."""
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", str(top), str(SIZE))
    img = open_chain(str(top), read_only=False)
    assert img.may_block("copy", 0, 65536)
    seen: list[str] = []
    old = blocking.set_check(seen.append)
    try:
        img.write_copy(0, aligned(bytes([1]) * (2 * MiB)))
    finally:
        blocking.set_check(old)
        close_chain(img)
    assert "O_DIRECT write" in seen
    assert qemu_io(top, "read -P 1 0 2M", fmt="qcow2")


@pytest.mark.parametrize("opts", ["extended_l2=on", "compat=0.10"])
def test_write_copy_other_layouts(tmp_path: Path, opts: str) -> None:
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, str(top), str(SIZE))
    img = open_chain(str(top), read_only=False)
    try:
        img.write_copy(2 * MiB, aligned(bytes([3]) * (3 * MiB)))
    finally:
        close_chain(img)
    assert_clean(top)
    assert guest_view(top, tmp_path)[2 * MiB:5 * MiB] == bytes([3]) * (3 * MiB)
