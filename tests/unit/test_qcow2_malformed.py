"""Malformed or unsupported images are refused at open with one clear error, never written."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.commands import qemu_img, qemu_io
from vdisk.engine.qcow2 import is_qcow2, open_qcow2
from vdisk.errors import CorruptImageError, ImageError, UnsupportedImageError


def _patch(fmt: str, off: int, value: int) -> Callable[[Path], None]:
    def f(p: Path) -> None:
        with open(p, "r+b") as fh:
            fh.seek(off)
            fh.write(struct.pack(fmt, value))
    return f


def _or_bits(off: int, bits: int) -> Callable[[Path], None]:
    def f(p: Path) -> None:
        with open(p, "r+b") as fh:
            fh.seek(off)
            v = struct.unpack(">Q", fh.read(8))[0]
            fh.seek(off)
            fh.write(struct.pack(">Q", v | bits))
    return f


def _truncate(n: int) -> Callable[[Path], None]:
    def f(p: Path) -> None:
        with open(p, "r+b") as fh:
            fh.truncate(n)
    return f


def _bad_magic(p: Path) -> None:
    with open(p, "r+b") as fh:
        fh.write(b"XXXX")


def _overlap(p: Path) -> None:
    with open(p, "r+b") as fh:
        fh.seek(48)
        rt = fh.read(8)
        fh.seek(40)
        fh.write(rt)  # L1 table at the refcount table's offset


CASES: list[tuple[str, Callable[[Path], None], type, str, bool]] = [
    # name, damage, error type, message part, refused read-only too
    ("bad-magic", _bad_magic, CorruptImageError, "bad magic", True),
    ("truncated-header", _truncate(50), CorruptImageError, "truncated", True),
    ("truncated-tables", _truncate(70000), CorruptImageError, "beyond the end of file", True),
    ("cluster-bits", _patch(">I", 20, 30), CorruptImageError, "cluster_bits", True),
    ("l1-beyond-eof", _patch(">Q", 40, 1 << 40), CorruptImageError, "L1 table", True),
    ("l1-unaligned", _patch(">Q", 40, 0x30008), CorruptImageError, "not cluster aligned", True),
    ("l1-absurd", _patch(">I", 36, 0x2000000), CorruptImageError, "L1 table is too large",
     True),
    ("reftable-beyond-eof", _patch(">Q", 48, 1 << 30), CorruptImageError, "refcount table",
     True),
    ("reftable-too-big", _patch(">I", 56, 1 << 20), CorruptImageError, "too large", True),
    ("overlap", _overlap, CorruptImageError, "overlaps", True),
    ("backing-name-long", _patch(">I", 16, 5000), CorruptImageError, "backing file name",
     True),
    ("encryption", _patch(">I", 32, 1), UnsupportedImageError, "encrypt", True),
    ("unknown-incompat", _or_bits(72, 1 << 9), UnsupportedImageError, "incompatible", True),
    ("corrupt-bit", _or_bits(72, 1 << 1), CorruptImageError, "marked corrupt", False),
    ("dirty-bit", _or_bits(72, 1 << 0), UnsupportedImageError, "qemu-img check -r all", False),
    ("version", _patch(">I", 4, 4), UnsupportedImageError, "version", True),
]


def _make(tmp: Path) -> Path:
    p = tmp / "m.qcow2"
    qemu_img("create", "-f", "raw", str(tmp / "base.raw"), "8M")
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(p), "8M")
    qemu_io(p, "write -P 7 0 200k")
    return p


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_malformed(tmp_path: Path, case: tuple) -> None:
    name, damage, etype, part, ro_too = case
    p = _make(tmp_path)
    damage(p)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    modes = [False, True] if ro_too else [False]
    for ro in modes:
        with pytest.raises(etype) as ei:
            open_qcow2(str(p), read_only=ro)
        assert str(p) in str(ei.value) and part in str(ei.value), str(ei.value)
    if not ro_too:
        with open_qcow2(str(p), read_only=True) as img:
            assert img.read(0, 1000) == b"\x07" * 1000
    assert hashlib.sha256(p.read_bytes()).hexdigest() == digest


def test_external_data_file(tmp_path: Path) -> None:
    p = tmp_path / "e.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", str(p), "8M")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    for ro in (False, True):
        with pytest.raises(UnsupportedImageError, match="external data file") as ei:
            open_qcow2(str(p), read_only=ro)
        assert str(p) in str(ei.value)
    assert hashlib.sha256(p.read_bytes()).hexdigest() == digest


def test_missing_and_not_qcow2(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot open"):
        open_qcow2(str(tmp_path / "nope.qcow2"), read_only=True)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CorruptImageError, match="bad magic"):
        open_qcow2(str(tmp_path / "empty"), read_only=True)
    assert not is_qcow2(b"")
    assert is_qcow2(b"QFI\xfb\0\0\0\3")


def test_runtime_bad_l2_offset_is_eio(tmp_path: Path) -> None:
    p = _make(tmp_path)
    qemu_io(p, "write -P 9 7M 64k")
    with open(p, "rb") as fh:
        fh.seek(40)
        l1_off = struct.unpack(">Q", fh.read(8))[0]
        fh.seek(l1_off)
        l2_off = struct.unpack(">Q", fh.read(8))[0] & 0x00FFFFFFFFFFFE00
    # L2 entry for cluster 1 (64k..128k): point it beyond EOF; cluster 2: misaligned
    with open(p, "r+b") as fh:
        fh.seek(l2_off + 8)
        fh.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
        fh.seek(l2_off + 16)
        fh.write(struct.pack(">Q", (1 << 63) | 0x50200))
    with open_qcow2(str(p), read_only=False) as img:
        for off in (65536 + 5, 2 * 65536):
            with pytest.raises(OSError) as ei:
                img.read(off, 100)
            assert ei.value.errno == errno.EIO
        assert img.read(0, 1000) == b"\x07" * 1000  # other ranges still work
        assert img.read(7 << 20, 100) == b"\x09" * 100
    # an L1 entry pointing beyond EOF
    with open(p, "r+b") as fh:
        fh.seek(l1_off)
        fh.write(struct.pack(">Q", (1 << 63) | (1 << 41)))
    with open_qcow2(str(p), read_only=True) as img:
        with pytest.raises(OSError) as ei:
            img.read(0, 10)
        assert ei.value.errno == errno.EIO


@pytest.mark.slow
def test_fuzzed_headers_fail_cleanly(tmp_path: Path) -> None:
    """Random byte damage: open raises ImageError or works; I/O raises OSError or works;
    check_qcow2 raises ImageError or reports; never another exception."""
    import random

    from vdisk.engine.qcow2 import check_qcow2

    src_path = _make(tmp_path)
    qemu_io(src_path, "write -z 1M 64k", "write -P 4 3M 100k")
    qemu_img("snapshot", "-c", "s", str(src_path))
    src = src_path.read_bytes()
    rnd = random.Random(99)
    p = tmp_path / "fz.qcow2"
    for i in range(250):
        b = bytearray(src)
        for _ in range(rnd.randrange(1, 4)):
            pos = rnd.randrange(0, 112) if rnd.random() < 0.5 else rnd.randrange(0, len(b))
            b[pos] = rnd.randrange(256)
        p.write_bytes(b)
        ro = i % 2 == 0
        try:
            img = open_qcow2(str(p), read_only=ro)
        except ImageError:
            continue
        try:
            size = img.virtual_size
            for off in range(0, min(size, 8 << 20), 1 << 20):
                try:
                    img.read(off, min(1 << 20, size - off))
                except OSError:
                    pass
            if not ro and size > 70000:
                try:
                    img.write(rnd.randrange(0, size - 70000), b"z" * 70000)
                    img.write_zeroes(0, min(size, 1 << 20), unmap=True)
                    img.flush()
                except OSError:
                    pass
        finally:
            try:
                img.close()
            except OSError:
                pass
        try:
            check_qcow2(str(p))
        except ImageError:
            pass


def test_locks_and_force_share(tmp_path: Path) -> None:
    from tests.helpers.commands import run
    from vdisk.errors import LockError

    p = _make(tmp_path)
    with open_qcow2(str(p), read_only=False) as img:
        img.write(0, b"abc")
        with pytest.raises(LockError):
            open_qcow2(str(p), read_only=True)
        res = run("qemu-io", "-f", "qcow2", "-c", "read 0 512", str(p), check=False)
        assert res.returncode != 0 and "lock" in (res.stderr + res.stdout).lower()
        with open_qcow2(str(p), read_only=True, force_share=True) as peek:
            assert peek.read(3, 10) == b"\x07" * 10
        with pytest.raises(ImageError, match="force-share"):
            open_qcow2(str(p), read_only=False, force_share=True)
    with open_qcow2(str(p), read_only=True) as a, open_qcow2(str(p), read_only=True) as b:
        assert a.read(0, 3) == b.read(0, 3) == b"abc"


def test_not_regular_files(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="directory"):
        open_qcow2(str(tmp_path), read_only=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        open_qcow2(str(fifo), read_only=True)


def test_runtime_bad_entries_refuse_writes(tmp_path: Path) -> None:
    p = _make(tmp_path)
    with open(p, "rb") as fh:
        fh.seek(40)
        l1_off = struct.unpack(">Q", fh.read(8))[0]
        fh.seek(l1_off)
        l2_off = struct.unpack(">Q", fh.read(8))[0] & 0x00FFFFFFFFFFFE00
    with open(p, "r+b") as fh:
        fh.seek(l2_off + 8)
        fh.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
    size = p.stat().st_size
    with open_qcow2(str(p), read_only=False) as img:
        for op in (lambda: img.write(65536 + 100, b"x" * 10),
                   lambda: img.write(65536, b"x" * 65536),
                   lambda: img.write_zeroes(65536, 65536, unmap=True)):
            with pytest.raises(OSError) as ei:
                op()
            assert ei.value.errno == errno.EIO
        img.write(0, b"fine")
    assert p.stat().st_size < size + (1 << 20)  # nothing written out at the bogus offset


def test_compressed_bombs_inflate_one_cluster_at_most() -> None:
    import zlib

    import zstandard

    from vdisk.engine.qcow2.compress import decompress_cluster

    zb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20))
    assert decompress_cluster(1, zb, 65536) == bytes(65536)
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    db = c.compress(bytes(64 << 20)) + c.flush()
    assert decompress_cluster(0, db, 65536) == bytes(65536)
    with pytest.raises(OSError) as ei:
        decompress_cluster(1, b"garbage" * 10, 65536)
    assert ei.value.errno == errno.EIO
    with pytest.raises(OSError):
        decompress_cluster(0, zlib.compress(b"x")[2:-4][:3], 65536)  # short stream
