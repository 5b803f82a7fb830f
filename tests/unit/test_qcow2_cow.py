"""Writes to shared (snapshot) and compressed clusters, and header rewrites (set_backing)."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from tests.helpers.commands import assert_clean, guest_view, qemu_img, qemu_io
from vdisk.engine.chain import close_chain, open_chain
from vdisk.engine.qcow2 import check_qcow2, open_qcow2
from vdisk.errors import ReadOnlyError

SIZE = 8 << 20


def _random_writes(img: object, model: bytearray, seed: int, n: int = 60) -> None:
    rnd = random.Random(seed)
    for _ in range(n):
        off = rnd.randrange(0, SIZE - 1)
        ln = rnd.randrange(1, min(SIZE - off, 200_000) + 1)
        if rnd.random() < 0.75:
            data = rnd.randbytes(ln)
            img.write(off, data)  # type: ignore[attr-defined]
            model[off:off + ln] = data
        else:
            img.write_zeroes(off, ln, unmap=rnd.random() < 0.5)  # type: ignore[attr-defined]
            model[off:off + ln] = bytes(ln)


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "extended_l2=on"])
def test_write_after_internal_snapshot(tmp_path: Path, opts: str) -> None:
    p = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, str(p), str(SIZE))
    qemu_io(p, "write -P 1 0 3M", "write -P 2 5M 1M")
    qemu_img("snapshot", "-c", "s1", str(p))
    snap = guest_view(p, tmp_path)
    model = bytearray(snap)
    with open_qcow2(str(p), read_only=False) as img:
        _random_writes(img, model, 1)
        assert img.read(0, SIZE) == model
    assert_clean(p)
    assert check_qcow2(str(p)).clean
    assert guest_view(p, tmp_path) == model
    assert guest_view(p, tmp_path, "-l", "snapshot.name=s1") == snap
    # and again on top of our own writes, after a second snapshot
    qemu_img("snapshot", "-c", "s2", str(p))
    with open_qcow2(str(p), read_only=False) as img:
        _random_writes(img, model, 2)
    assert_clean(p)
    assert guest_view(p, tmp_path) == model
    assert guest_view(p, tmp_path, "-l", "snapshot.name=s1") == snap
    assert "s2" in qemu_img("snapshot", "-l", str(p))


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_write_to_compressed(tmp_path: Path, ctype: str) -> None:
    src = tmp_path / "src.raw"
    rnd = random.Random(4)
    src.write_bytes(b"".join(rnd.randbytes(100) * 40 for _ in range(SIZE // 4000)) +
                    bytes(SIZE - SIZE // 4000 * 4000))
    p = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={ctype}",
             str(src), str(p))
    model = bytearray(src.read_bytes())
    with open_qcow2(str(p), read_only=False) as img:
        _random_writes(img, model, 3)
        assert img.read(0, SIZE) == model
    assert_clean(p)
    assert check_qcow2(str(p)).clean
    assert guest_view(p, tmp_path) == model


def test_set_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(1).randbytes(SIZE))
    base2 = tmp_path / "base2.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(base), str(base2))
    p = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=off", "-b", "base.raw", "-F", "raw",
             str(p), str(SIZE))
    qemu_io(p, "write -P 3 1M 100k")
    # an unknown header extension must survive rewrites
    with open(p, "r+b") as f:
        f.seek(100)
        hlen = struct.unpack(">I", f.read(4))[0]
        f.seek(hlen)
        head = f.read(4096 - hlen)
    ext = struct.pack(">II", 0x12345678, 5) + b"hello\0\0\0"
    with open(p, "r+b") as f:
        f.seek(8)
        boff, bsize = struct.unpack(">QI", f.read(12))
        f.seek(hlen)
        f.write(ext + head[:boff - hlen + bsize])
        f.seek(8)
        f.write(struct.pack(">Q", boff + len(ext)))
    want = guest_view(p, tmp_path)
    img = open_chain(str(p), read_only=False)
    try:
        img.set_backing("base2.qcow2", "qcow2")
        assert img.backing_name == "base2.qcow2" and img.backing_format == "qcow2"
    finally:
        close_chain(img)
    info = json.loads(qemu_img("info", "--output=json", str(p)))
    assert info["backing-filename"] == "base2.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert_clean(p)
    assert guest_view(p, tmp_path) == want
    raw = p.read_bytes()[:65536]
    assert b"\x12\x34\x56\x78\x00\x00\x00\x05hello" in raw
    with open_qcow2(str(p), read_only=False) as img:
        img.set_backing(None, None)
        assert img.backing_name is None and img.backing is None
    info = json.loads(qemu_img("info", "--output=json", str(p)))
    assert "backing-filename" not in info and "backing-filename-format" not in info
    assert_clean(p)
    assert b"hello" in p.read_bytes()[:65536]
    with open_qcow2(str(p), read_only=True) as img:
        with pytest.raises(ReadOnlyError):
            img.set_backing("x", "raw")
        with pytest.raises(ReadOnlyError):
            img.write(0, b"x")
