"""Simulated power loss: the disk keeps what was synced plus ANY subset of the 512-byte
sectors written since the last fdatasync. Whatever subset survives, qemu-img check must
find no corruption (leaks allowed). This proves the barrier placement, not just the
write order that a SIGKILL would see."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.helpers.commands import qemu_check
from vdisk.engine.qcow2 import create_qcow2, open_qcow2


class Recorder:
    """Wraps an image's ImageFile: remembers the file at each sync and writes since."""

    def __init__(self, img: object, path: Path, rnd: random.Random, tmp: Path) -> None:
        f = img.f  # type: ignore[attr-defined]
        self.path = path
        self.rnd = rnd
        self.tmp = tmp
        self.crashes = 0
        self.synced = path.read_bytes()
        self.pending: list[tuple[int, bytes]] = []
        orig_pwrite, orig_pwritev, orig_sync = f.pwrite, f.pwritev, f.sync

        def pwrite(data: bytes, offset: int) -> None:
            self.pending.append((offset, bytes(data)))
            orig_pwrite(data, offset)

        def pwritev(bufs: list, offset: int, direct: bool = False) -> None:
            self.pending.append((offset, b"".join(bytes(b) for b in bufs)))
            orig_pwritev(bufs, offset, direct)

        def sync() -> None:
            if self.pending:  # a power loss just before every sync
                self.check_crash()
            orig_sync()
            self.synced = path.read_bytes()
            self.pending = []

        f.pwrite, f.pwritev, f.sync = pwrite, pwritev, sync

    def check_crash(self) -> None:
        out = self.tmp / "crash.qcow2"
        self.crash_image(self.rnd, out)
        rc, q = qemu_check(out)
        assert rc in (0, 3) and q.get("corruptions", 0) == 0, q
        out.unlink()
        self.crashes += 1

    def crash_image(self, rnd: random.Random, out: Path) -> None:
        img = bytearray(self.synced)
        for off, data in self.pending:
            for s in range(off - off % 512, off + len(data), 512):  # sector granularity
                if rnd.random() < 0.5:
                    continue
                a, b = max(s, off), min(s + 512, off + len(data))
                if len(img) < b:
                    img.extend(bytes(b - len(img)))
                img[a:b] = data[a - off:b - off]
        out.write_bytes(bytes(img))


@pytest.mark.parametrize("cs,compat,rbits", [
    pytest.param(4096, "1.1", 16, marks=pytest.mark.slow),
    pytest.param(512, "1.1", 64, marks=pytest.mark.slow),
    (65536, "0.10", 16),
])
def test_power_loss_subsets(tmp_path: Path, cs: int, compat: str, rbits: int) -> None:
    size = 4 << 20
    p = tmp_path / "p.qcow2"
    create_qcow2(str(p), size, cluster_size=cs, compat=compat, refcount_bits=rbits)
    rnd = random.Random(cs + rbits)
    with open_qcow2(str(p), read_only=False) as img:
        rec = Recorder(img, p, rnd, tmp_path)
        for step in range(120):
            off = rnd.randrange(0, size - 1)
            n = rnd.randrange(1, min(size - off, rnd.choice([2000, 40000, 300000])) + 1)
            r = rnd.random()
            if r < 0.65:
                img.write(off, rnd.randbytes(n))
            elif r < 0.9:
                img.write_zeroes(off, n, unmap=rnd.random() < 0.6)
            else:
                img.flush()
            if step % 4 == 3:
                for _ in range(2):
                    rec.check_crash()
    assert rec.crashes >= 60


@pytest.mark.slow
def test_power_loss_with_l2_evictions(tmp_path: Path) -> None:
    """A 2-table L2 cache: dirty tables are written back on eviction, mid-request."""
    size = 4 << 20
    p = tmp_path / "p.qcow2"
    create_qcow2(str(p), size, cluster_size=512, refcount_bits=16)
    rnd = random.Random(77)
    model = bytearray(size)
    with open_qcow2(str(p), read_only=False) as img:
        img.l2_cache.capacity = 2
        rec = Recorder(img, p, rnd, tmp_path)
        for step in range(100):
            off = rnd.randrange(0, size - 1)
            n = rnd.randrange(1, min(size - off, rnd.choice([2000, 40000])) + 1)
            if rnd.random() < 0.75:
                d = rnd.randbytes(n)
                img.write(off, d)
                model[off:off + n] = d
            else:
                img.write_zeroes(off, n, unmap=rnd.random() < 0.6)
                model[off:off + n] = bytes(n)
            if step % 5 == 4:
                rec.check_crash()
        assert img.read(0, size) == model
    assert rec.crashes >= 20
