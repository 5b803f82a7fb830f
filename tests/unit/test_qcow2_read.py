"""Images made by qemu-img/qemu-io read back byte for byte as `qemu-img convert` gives."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.helpers.commands import guest_view, qemu_img, qemu_io
from vdisk.engine.chain import close_chain, open_chain
from vdisk.engine.image import Status
from vdisk.engine.qcow2 import open_qcow2

SIZE = 6 << 20


def _random_raw(path: Path, size: int, seed: int) -> None:
    """Random data with holes (zero runs), so convert leaves some clusters out."""
    rnd = random.Random(seed)
    buf = bytearray(size)
    pos = 0
    while pos < size:
        n = rnd.randrange(1, 300_000)
        if rnd.random() < 0.6:
            buf[pos:pos + n] = rnd.randbytes(min(n, size - pos))
        pos += n
    path.write_bytes(bytes(buf[:size]))


def _scribble(img: Path, seed: int, n: int = 12) -> None:
    """Unaligned pattern writes, zero writes and discards via qemu-io."""
    rnd = random.Random(seed)
    cmds = []
    for _ in range(n):
        off = rnd.randrange(0, SIZE - 200_000)
        ln = rnd.randrange(1, 150_000)
        r = rnd.random()
        if r < 0.6:
            cmds.append(f"write -P {rnd.randrange(1, 255)} {off} {ln}")
        elif r < 0.8:
            off, ln = off & ~65535, 131072
            cmds.append(f"write -z {off} {ln}")
        else:
            off, ln = off & ~65535, 65536
            cmds.append(f"discard {off} {ln}")
    qemu_io(img, *cmds)


def _variant(tmp: Path, name: str) -> Path:
    raw = tmp / "src.raw"
    _random_raw(raw, SIZE, 7)
    img = tmp / f"{name}.qcow2"
    opts = {
        "v3": "compat=1.1",
        "v2": "compat=0.10",
        "c512": "cluster_size=512",
        "c2m": "cluster_size=2M",
        "rc1": "refcount_bits=1",
        "rc64": "refcount_bits=64",
        "extl2": "extended_l2=on,cluster_size=64k",
        "zlib": "compression_type=zlib",
        "zstd": "compression_type=zstd",
        "prealloc": "preallocation=metadata",
        "extl2-2m": "extended_l2=on,cluster_size=2M",
    }[name]
    extra = ["-c"] if name in ("zlib", "zstd") else []
    qemu_img("convert", *extra, "-f", "raw", "-O", "qcow2", "-o", opts, str(raw), str(img))
    if name not in ("zlib", "zstd"):
        _scribble(img, 11)
    else:
        qemu_io(img, "write -P 5 100000 7000")  # a normal cluster among compressed ones
    return img


@pytest.mark.parametrize("name", ["v3", "v2", "c512", "c2m", "rc1", "rc64", "extl2", "zlib",
                                  "zstd", "prealloc", "extl2-2m"])
def test_read_variants(tmp_path: Path, name: str) -> None:
    img = _variant(tmp_path, name)
    want = guest_view(img, tmp_path)
    with open_qcow2(str(img), read_only=True) as q:
        assert q.read(0, SIZE) == want
        # unaligned pieces too
        rnd = random.Random(3)
        for _ in range(30):
            off = rnd.randrange(0, SIZE - 1)
            n = rnd.randrange(1, min(SIZE - off, 400_000) + 1)
            assert q.read(off, n) == want[off:off + n]


def _overlay(tmp: Path, base_fmt: str, opts: str) -> Path:
    base = tmp / f"base.{base_fmt}"
    raw = tmp / "base-src.raw"
    _random_raw(raw, SIZE - (1 << 20), 5)  # shorter than the top: zeroes past its end
    qemu_img("convert", "-f", "raw", "-O", base_fmt, str(raw), str(base))
    top = tmp / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, "-b", base.name, "-F", base_fmt, str(top),
             str(SIZE))
    rnd = random.Random(9)
    cmds = []
    for _ in range(20):
        off = rnd.randrange(0, SIZE - 100_000)
        ln = rnd.randrange(1, 20_000)
        if rnd.random() < 0.75:
            cmds.append(f"write -P {rnd.randrange(1, 255)} {off} {ln}")
        else:
            cmds.append(f"write -z {off & ~2047} {2048 * rnd.randrange(1, 40)}")
    qemu_io(top, *cmds)
    return top


@pytest.mark.parametrize("base_fmt,opts", [("raw", "compat=1.1"), ("qcow2", "compat=1.1"),
                                           ("raw", "compat=0.10"),
                                           ("qcow2", "extended_l2=on,cluster_size=64k"),
                                           ("raw", "extended_l2=on,cluster_size=16k")])
def test_read_overlay(tmp_path: Path, base_fmt: str, opts: str) -> None:
    top = _overlay(tmp_path, base_fmt, opts)
    want = guest_view(top, tmp_path)
    img = open_chain(str(top), read_only=True)
    try:
        assert img.backing_name == f"base.{base_fmt}"
        assert img.backing_format == base_fmt
        assert img.read(0, SIZE) == want
        # layer_status against qemu-img map (depth 0 = this layer)
        import json

        entries = json.loads(qemu_img("map", "--output=json", str(top)))
        for e in entries:
            if e["depth"] == 0 and e["present"]:
                exp = Status.DATA if e["data"] else Status.ZERO
            else:
                exp = Status.UNALLOCATED
            pos = e["start"]
            while pos < e["start"] + e["length"]:
                ext = img.layer_status(pos, e["start"] + e["length"] - pos)
                assert ext.status is exp, (e, ext)
                pos += ext.length
        # merged: a whole run in one extent unless the status changes
        ext = img.layer_status(0, SIZE)
        assert ext.offset == 0 and 0 < ext.length <= SIZE
    finally:
        close_chain(img)
    # without the backing attached, unallocated reads as zeroes
    with open_qcow2(str(top), read_only=True) as q:
        data = q.read(0, SIZE)
        for e in json.loads(qemu_img("map", "--output=json", str(top))):
            if e["depth"] > 0 or not e["present"]:
                assert data[e["start"]:e["start"] + e["length"]] == bytes(e["length"])


def test_read_snapshots(tmp_path: Path) -> None:
    img = _variant(tmp_path, "v3")
    before = guest_view(img, tmp_path)
    qemu_img("snapshot", "-c", "s1", str(img))
    _scribble(img, 12)
    qemu_img("snapshot", "-c", "s2", str(img))
    _scribble(img, 13)
    want = guest_view(img, tmp_path)
    assert want != before
    with open_qcow2(str(img), read_only=True) as q:
        assert q.read(0, SIZE) == want


def test_unknown_compat_and_autoclear_bits(tmp_path: Path) -> None:
    import struct

    img = _variant(tmp_path, "v3")
    want = guest_view(img, tmp_path)
    with open(img, "r+b") as f:
        f.seek(80)
        compat, autoclear = struct.unpack(">QQ", f.read(16))
        f.seek(80)
        f.write(struct.pack(">QQ", compat | 1 << 40, autoclear | 1 << 7))
    with open_qcow2(str(img), read_only=True) as q:
        assert q.read(0, SIZE) == want
    with open(img, "rb") as f:
        f.seek(88)
        assert struct.unpack(">Q", f.read(8))[0] == 1 << 7  # read-only: untouched
    with open_qcow2(str(img), read_only=False) as q:
        q.write(5, b"hello")
    with open(img, "rb") as f:
        f.seek(80)
        compat, autoclear = struct.unpack(">QQ", f.read(16))
    assert autoclear == 0
    assert compat & 1 << 40
    from tests.helpers.commands import assert_clean

    assert_clean(img)
    assert guest_view(img, tmp_path)[:10] == want[:5] + b"hello"


def test_layer_status_runs(tmp_path: Path) -> None:
    from vdisk.engine.qcow2 import create_qcow2

    p = tmp_path / "s.qcow2"
    create_qcow2(str(p), 4 << 20, cluster_size=512)  # one L2 table per 32 KiB
    with open_qcow2(str(p), read_only=False) as img:
        img.write(0, b"d" * (1 << 20))
        # 9 whole clusters (unallocated without a backing file: already zero, left alone)
        # and a partial one (written as zero data)
        img.write_zeroes(1 << 20, 5000, unmap=False)
        img.write_zeroes(2 << 20, 1 << 20, unmap=True)  # nothing allocated there either
        img.write_zeroes(4096, 8192, unmap=True)  # whole clusters inside data: ZERO
        e = img.layer_status(16384, 1 << 20)  # 32 L2 tables of DATA: answered in pieces
        assert e.status is Status.DATA and 0 < e.length <= 9 * 32768
        seen: list[list] = []
        pos = 0
        while pos < 4 << 20:
            e = img.layer_status(pos, (4 << 20) - pos)
            assert e.offset == pos and e.length > 0
            if seen and seen[-1][1] is e.status:
                seen[-1][0] += e.length
            else:
                seen.append([e.length, e.status])
            pos += e.length
    assert seen == [[4096, Status.DATA], [8192, Status.ZERO], [(1 << 20) - 12288, Status.DATA],
                    [4608, Status.UNALLOCATED], [512, Status.DATA],
                    [(3 << 20) - 5120, Status.UNALLOCATED]]
