"""Persistent dirty bitmaps in the qcow2 engine, checked with QEMU's tools: qemu-img check
(no leaks, no corruption), qemu-img info (flags), qemu-nbd -B + qemu-img map (the bits)."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.bitmaps import bitmap_flags, expected, read_bitmap
from tests.helpers.commands import assert_clean, qemu_img, qemu_io
from vdisk.engine.dirty_bitmap import BitmapError, DirtyBitmap
from vdisk.engine.qcow2 import open_qcow2
from vdisk.errors import CorruptImageError

MiB = 1 << 20


def _image(tmp_path: Path, size: int = 16 * MiB, *bitmaps: str, opts: str = "") -> Path:
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", *(["-o", opts] if opts else []), p, str(size))
    for spec in bitmaps:  # "name[:granularity[:disable]]"
        name, *rest = spec.split(":")
        args = ["-g", rest[0]] if rest and rest[0] else []
        if len(rest) > 1:
            args.append("--disable")
        qemu_img("bitmap", "--add", *args, p, name)
    return p


def test_mark_sets_touched_granules() -> None:
    bm = DirtyBitmap("b", 10_000_000, 16)
    for off, n in [(0, 1), (65535, 2), (9_999_000, 1000), (300_000, 1_000_000)]:
        bm.mark(off, n)
    want = expected([(0, 1), (65535, 2), (9_999_000, 1000), (300_000, 1_000_000)],
                    65536, 10_000_000)
    assert bm.dirty_ranges() == want
    granules = {g for a, n in want for g in range(a // 65536, -(-(a + n) // 65536))}
    assert bm.count() == len(granules) * 65536


def test_writes_are_kept_in_the_bitmap(tmp_path: Path) -> None:
    p = _image(tmp_path, 16 * MiB, "b0", "b4k:4096", "off::disable")
    rnd = random.Random(5)
    writes: list[tuple[int, int]] = []
    img = open_qcow2(str(p), read_only=False)
    try:
        for _ in range(40):
            off = rnd.randrange(0, 16 * MiB - 1)
            n = rnd.randrange(1, min(16 * MiB - off, 300_000) + 1)
            if rnd.random() < 0.7:
                img.write(off, rnd.randbytes(n))
            else:
                img.write_zeroes(off, n, unmap=rnd.random() < 0.5)
            writes.append((off, n))
        assert bitmap_flags(p) == {"b0": ["in-use", "auto"], "b4k": ["in-use", "auto"],
                                   "off": ["in-use"]}
    finally:
        img.close()
    assert_clean(p)
    assert bitmap_flags(p) == {"b0": ["auto"], "b4k": ["auto"], "off": []}
    assert read_bitmap(p, "b0", tmp_path) == expected(writes, 65536, 16 * MiB)
    assert read_bitmap(p, "b4k", tmp_path) == expected(writes, 4096, 16 * MiB)
    assert read_bitmap(p, "off", tmp_path) == []
    # a second session adds to what the first one recorded
    img = open_qcow2(str(p), read_only=False)
    img.write(15 * MiB, b"x")
    img.close()
    assert_clean(p)
    assert read_bitmap(p, "b0", tmp_path) == expected(writes + [(15 * MiB, 1)], 65536,
                                                       16 * MiB)


def test_open_without_writes_leaves_the_file_alone(tmp_path: Path) -> None:
    p = _image(tmp_path, 4 * MiB, "b0")
    before = p.read_bytes()
    img = open_qcow2(str(p), read_only=False)
    img.read(0, 4096)
    img.close()
    assert p.read_bytes() == before


def test_qemu_bits_survive_a_vdisk_session(tmp_path: Path) -> None:
    """Bits QEMU recorded are read, kept and written back with ours."""
    p = _image(tmp_path, 8 * MiB, "b0")
    qemu_io(p, "write 1M 64k", "write 7M 4k")
    img = open_qcow2(str(p), read_only=False)
    img.write(3 * MiB, b"y" * 5)
    img.close()
    assert_clean(p)
    assert read_bitmap(p, "b0", tmp_path) == expected(
        [(MiB, 65536), (7 * MiB, 4096), (3 * MiB, 5)], 65536, 8 * MiB)


def test_crash_leaves_in_use_and_check_clean(tmp_path: Path) -> None:
    """A process killed with the image open leaves in_use set: qemu-img check finds no
    corruption, and the next open treats the bitmap as inconsistent."""
    p = _image(tmp_path, 4 * MiB, "b0")
    code = ("import sys, os\nfrom vdisk.engine.qcow2 import open_qcow2\n"
            f"img = open_qcow2({str(p)!r}, read_only=False)\n"
            "img.write(0, b'a' * 70000); img.flush(); os._exit(9)\n")
    res = subprocess.run([".venv/bin/python", "-c", code], cwd=Path(__file__).parents[2])
    assert res.returncode == 9
    assert bitmap_flags(p) == {"b0": ["in-use", "auto"]}
    res2 = subprocess.run(["qemu-img", "check", "--output=json", str(p)],
                          capture_output=True, text=True)
    rep = json.loads(res2.stdout)
    assert res2.returncode in (0, 3) and rep["check-errors"] == 0 and "corruptions" not in rep
    img = open_qcow2(str(p), read_only=False)
    try:
        [bm] = img.bitmaps.bitmaps if img.bitmaps else []
        assert bm.inconsistent and not bm.recording
        assert img.bitmaps is not None
        assert img.bitmaps.info() == [{"name": "b0", "recording": False, "persistent": True,
                                       "busy": False, "granularity": 65536, "count": 0,
                                       "inconsistent": True}]
        with pytest.raises(BitmapError, match="inconsistent and cannot be used"):
            img.bitmaps.clear("b0")
        img.write(0, b"b")
    finally:
        img.close()
    assert bitmap_flags(p) == {"b0": ["in-use", "auto"]}  # left as it was, like QEMU
    assert_clean(p, leaks_ok=True)
    img = open_qcow2(str(p), read_only=False)
    assert img.bitmaps is not None
    img.bitmaps.remove("b0")
    img.close()
    assert bitmap_flags(p) == {}
    assert_clean(p, leaks_ok=True)  # the crash's leaked reserve; nothing of the bitmap


def test_add_store_remove(tmp_path: Path) -> None:
    p = _image(tmp_path, 8 * MiB)
    img = open_qcow2(str(p), read_only=False)
    assert img.bitmaps is not None
    img.bitmaps.add("n", "new", 512, persistent=True, disabled=False)
    img.bitmaps.add("n", "tmp", None, persistent=False, disabled=False)
    img.write(2 * MiB, b"z" * 1000)
    img.close()
    assert_clean(p)
    assert bitmap_flags(p) == {"new": ["auto"]}
    assert read_bitmap(p, "new", tmp_path) == [(2 * MiB, 1024)]
    img = open_qcow2(str(p), read_only=False)
    assert img.bitmaps is not None
    assert [b["name"] for b in img.bitmaps.info()] == ["new"]
    img.bitmaps.remove("new")
    assert bitmap_flags(p) == {}  # removed from the image at once, as QEMU does
    img.close()
    assert_clean(p)
    info = json.loads(qemu_img("info", "--output=json", p))
    assert "bitmaps" not in info["format-specific"]["data"]


def test_clear(tmp_path: Path) -> None:
    p = _image(tmp_path, 8 * MiB, "b0")
    qemu_io(p, "write 0 1M")
    img = open_qcow2(str(p), read_only=False)
    assert img.bitmaps is not None
    img.bitmaps.clear("b0")
    assert bitmap_flags(p) == {"b0": ["in-use", "auto"]}
    img.close()
    assert read_bitmap(p, "b0", tmp_path) == []
    assert_clean(p)


def test_read_only_open(tmp_path: Path) -> None:
    p = _image(tmp_path, 8 * MiB, "b0")
    qemu_io(p, "write 0 64k")
    before = p.read_bytes()
    img = open_qcow2(str(p), read_only=True)
    assert img.bitmaps is not None
    [bm] = img.bitmaps.bitmaps
    assert bm.readonly and bm.dirty_ranges() == [(0, 65536)]
    with pytest.raises(BitmapError, match="readonly and cannot be modified"):
        img.bitmaps.clear("b0")
    img.close()
    assert p.read_bytes() == before


def test_broken_directory_fails_the_open(tmp_path: Path) -> None:
    p = _image(tmp_path, 8 * MiB, "b0")
    info = json.loads(qemu_img("info", "--output=json", p))
    assert info["format-specific"]["data"]["bitmaps"]
    raw = bytearray(p.read_bytes())
    # find the directory through the header extension and corrupt its type byte
    pos = int.from_bytes(raw[100:104], "big")  # header_length: the extensions follow
    while True:
        t, n = int.from_bytes(raw[pos:pos + 4], "big"), int.from_bytes(raw[pos + 4:pos + 8], "big")
        if t == 0x23852875:
            diroff = int.from_bytes(raw[pos + 8 + 16:pos + 8 + 24], "big")
            break
        assert t, "no bitmaps extension"
        pos += 8 + (n + 7) // 8 * 8
    raw[diroff + 16] = 7
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptImageError, match="Bitmap 'b0' doesn't satisfy the constraints"):
        open_qcow2(str(p), read_only=True)


@pytest.mark.slow
def test_stopping_at_any_write_of_the_store_never_corrupts(tmp_path: Path) -> None:
    """Stop the clean-close store after each of its writes in turn (what a crash there
    leaves, every earlier write on disk): qemu-img check finds no corruption, and the
    bitmap is either still in use (old directory) or stored with every written range."""
    src = _image(tmp_path, 8 * MiB, "b0", "b1:4096")
    writes = [(MiB, 5000), (6 * MiB, 70_000)]
    total = None
    k = 0
    while total is None or k <= total:
        p = tmp_path / f"k{k}.qcow2"
        p.write_bytes(src.read_bytes())
        img = open_qcow2(str(p), read_only=False)
        for off, n in writes:
            img.write(off, b"q" * n)
        calls = 0
        real = img.f.pwrite

        def counted(data: object, offset: int, _k: int = k, real: Any = real) -> None:
            nonlocal calls
            calls += 1
            if calls > _k:
                raise OSError(5, "stopped here")
            real(data, offset)

        img.bm.f.pwrite = counted  # type: ignore[method-assign]
        try:
            img.close()
        except OSError:
            pass
        else:
            total = calls
        res = subprocess.run(["qemu-img", "check", "--output=json", str(p)],
                             capture_output=True, text=True)
        rep = json.loads(res.stdout)
        assert res.returncode in (0, 3) and "corruptions" not in rep, (k, rep)
        flags = bitmap_flags(p)
        if flags == {"b0": ["auto"], "b1": ["auto"]}:
            assert read_bitmap(p, "b0", tmp_path) == expected(writes, 65536, 8 * MiB)
        else:
            assert flags == {"b0": ["in-use", "auto"], "b1": ["in-use", "auto"]}, (k, flags)
        k += 1
    assert total is not None and total >= 5
