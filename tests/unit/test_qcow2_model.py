"""Model-based: random unaligned writes, write_zeroes and flushes against a bytearray,
on a qcow2 overlay over a backing file; qemu-img compare and check are the oracles."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import pytest

from tests.helpers.commands import assert_clean, qemu_img, qemu_io, run
from vdisk.engine.chain import close_chain, open_chain
from vdisk.engine.qcow2 import create_qcow2, open_qcow2

SLOW = pytest.mark.slow  # 2 MiB clusters: several seconds each
CONFIGS = [
    # (cluster size, compat, refcount bits, extended L2, base format, virtual size)
    (512, "1.1", 16, False, "raw", 2 << 20),
    (512, "0.10", 16, False, "qcow2", 2 << 20),
    (4096, "1.1", 16, False, "qcow2", 8 << 20),
    (4096, "0.10", 16, False, "raw", 8 << 20),
    (65536, "1.1", 16, False, "raw", 16 << 20),
    (65536, "0.10", 16, False, "qcow2", 16 << 20),
    pytest.param((2 << 20, "1.1", 16, False, "qcow2", 24 << 20), marks=SLOW),
    pytest.param((2 << 20, "0.10", 16, False, "raw", 24 << 20), marks=SLOW),
    (4096, "1.1", 1, False, "raw", 8 << 20),
    (65536, "1.1", 64, False, "qcow2", 16 << 20),
    (65536, "1.1", 16, True, "raw", 16 << 20),
    (16384, "1.1", 8, True, "qcow2", 8 << 20),
    (65536, "1.1", 16, False, None, 16 << 20),
    pytest.param((2 << 20, "1.1", 16, True, "qcow2", 24 << 20), marks=SLOW),
    (8192, "1.1", 2, False, "raw", 8 << 20),
    (32768, "1.1", 4, True, None, 8 << 20),
    (1024, "1.1", 32, False, "qcow2", 4 << 20),
    (65536, "1.1", 16, False, "raw", (8 << 20) + 1536),  # virtual end inside a cluster
    (65536, "0.10", 16, False, None, (8 << 20) + 512),
    (65536, "1.1", 16, True, "qcow2", (4 << 20) + 2560),
    (4096, "0.10", 16, False, None, 8 << 20),
]


def _make_base(tmp: Path, fmt: str, size: int, seed: int) -> tuple[Path, bytes]:
    rnd = random.Random(seed)
    bsize = (size - size // 8) // 512 * 512  # shorter than the top: zeroes past its end
    base = tmp / f"base.{fmt}"
    qemu_img("create", "-f", fmt, str(base), str(bsize))
    cmds = []
    model = bytearray(bsize)
    for _ in range(25):
        off = rnd.randrange(0, bsize - 1)
        n = rnd.randrange(1, min(bsize - off, 200_000) + 1)
        pat = rnd.randrange(1, 256)
        cmds.append(f"write -P {pat} {off} {n}")
        model[off:off + n] = bytes([pat]) * n
    qemu_io(base, *cmds, fmt=fmt)
    return base, bytes(model)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_model(tmp_path: Path, cfg: tuple, seed: int) -> None:
    cs, compat, rbits, ext, base_fmt, size = cfg
    rnd = random.Random(zlib.crc32(repr((cfg, seed)).encode()))
    model = bytearray(size)
    top = tmp_path / "top.qcow2"
    if base_fmt:
        base, bmodel = _make_base(tmp_path, base_fmt, size, 1)
        model[:len(bmodel)] = bmodel
        create_qcow2(str(top), size, cluster_size=cs, backing_name=base.name,
                     backing_format=base_fmt, compat=compat, refcount_bits=rbits,
                     extended_l2=ext)
    else:
        create_qcow2(str(top), size, cluster_size=cs, compat=compat, refcount_bits=rbits,
                     extended_l2=ext)
    img = open_chain(str(top), read_only=False)
    try:
        for step in range(150):
            r = rnd.random()
            off = rnd.randrange(0, size - 1)
            maxn = rnd.choice([600, 5000, 3 * cs, 600_000])
            n = rnd.randrange(1, min(size - off, maxn) + 1)
            if rnd.random() < 0.15:  # aligned to clusters, to hit the zero-cluster paths
                off = off // cs * cs
                n = max(cs, n // cs * cs)
                n = min(n, size - off)
            elif rnd.random() < 0.07:  # up to the virtual end
                off = size - n
            if r < 0.6:
                data = rnd.randbytes(n)
                img.write(off, data)
                model[off:off + n] = data
            elif r < 0.85:
                img.write_zeroes(off, n, unmap=rnd.random() < 0.5)
                model[off:off + n] = bytes(n)
            elif r < 0.95:
                img.flush()
            else:
                k = rnd.randrange(0, size - 1)
                m = rnd.randrange(1, min(size - k, 300_000) + 1)
                assert img.read(k, m) == model[k:k + m], step
        assert img.read(0, size) == model
    finally:
        close_chain(img)
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(model))
    res = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(top), str(raw),
              check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert_clean(top)
    with open_qcow2(str(top), read_only=True) as q:  # reopened: metadata survived close
        assert q.backing_name == (f"base.{base_fmt}" if base_fmt else None)


@pytest.mark.slow
def test_refcount_table_growth(tmp_path: Path) -> None:
    """512 B clusters with 64-bit refcounts: the refcount table must move several times."""
    size = 8 << 20
    top = tmp_path / "grow.qcow2"
    create_qcow2(str(top), size, cluster_size=512, refcount_bits=64)
    rnd = random.Random(5)
    model = bytearray(size)
    with open_qcow2(str(top), read_only=False) as img:
        for off in range(0, size, 256 << 10):
            data = rnd.randbytes(256 << 10)
            img.write(off, data)
            model[off:off + len(data)] = data
        img.write_zeroes(1 << 20, 3 << 20, unmap=True)
        model[1 << 20:4 << 20] = bytes(3 << 20)
        img.write(2 << 20, b"x" * 70000)
        model[2 << 20:(2 << 20) + 70000] = b"x" * 70000
        assert img.read(0, size) == model
    with open(top, "rb") as f:
        f.seek(48)
        _, clusters = struct.unpack(">QI", f.read(12))
    assert clusters > 1
    assert_clean(top)
    raw = tmp_path / "m.raw"
    raw.write_bytes(bytes(model))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(top), str(raw))
