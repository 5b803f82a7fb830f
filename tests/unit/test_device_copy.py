"""Copy-up on real qcow2 chains (the stream's path, including the in-kernel copy of runs a
backing layer holds as plain data): the top ends up with the same guest view (qemu-img
compare against a raw made before), and qemu-img check finds it clean."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.helpers.commands import qemu_check, qemu_img, qemu_io
from vdisk.block.device import BlockDevice
from vdisk.engine.chain import iter_chain, open_chain

MiB = 1 << 20

CASES = [
    # (base cluster, mid cluster or None, top cluster, top extra options, size)
    (65536, None, 65536, "", 8 * MiB),
    (4096, None, 65536, "", 8 * MiB),
    (65536, 4096, 512, "", 3 * MiB + 512),
    (65536, None, 65536, "extended_l2=on", 8 * MiB),
    (65536, 65536, 4096, "compat=0.10", 5 * MiB - 4096),
]


def _pattern(path: Path, size: int, rnd: random.Random, fmt: str = "qcow2") -> None:
    cmds = []
    for _ in range(12):
        off = rnd.randrange(0, size - 512) // 512 * 512
        n = min(size - off, rnd.choice([512, 4096, 65536, 300 * 1024, MiB]))
        kind = rnd.random()
        if kind < 0.8:
            cmds.append(f"write -P {rnd.randrange(1, 255)} {off} {n}")
        else:
            cmds.append(f"write -z {off} {n}")
    qemu_io(path, *cmds, fmt=fmt)


# streaming to a base needs a middle layer above it
COMBOS = [(c, wb) for c in range(len(CASES)) for wb in (False, True) if not wb or CASES[c][1]]


@pytest.mark.parametrize(("case", "with_base"), COMBOS)
async def test_copy_up_step_matches_qemu(tmp_path: Path, case: int, with_base: bool) -> None:
    bcs, mcs, tcs, topt, size = CASES[case]
    rnd = random.Random(case * 2 + with_base)
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={bcs}", str(base), str(size))
    qemu_io(base, f"write -P 0x11 0 {size - size % 512}")
    _pattern(base, size, rnd)
    below = base
    if mcs is not None:
        mid = tmp_path / "mid.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={mcs}", "-b", str(below),
                 "-F", "qcow2", str(mid))
        _pattern(mid, size, rnd)
        below = mid
    top = tmp_path / "top.qcow2"
    opts = f"cluster_size={tcs}" + (f",{topt}" if topt else "")
    qemu_img("create", "-f", "qcow2", "-o", opts, "-b", str(below), "-F", "qcow2", str(top))
    _pattern(top, size, rnd)
    want = tmp_path / "want.raw"
    qemu_img("convert", "-O", "raw", str(top), str(want))

    img = open_chain(str(top))
    fast = [0]
    orig = img.write_from  # type: ignore[attr-defined]

    def counted(*args: int, direct: bool = False) -> int:
        n = orig(*args, direct=direct)
        fast[0] += n
        return n

    img.write_from = counted  # type: ignore[attr-defined]
    dev = BlockDevice("d0", img, copy_on_read=False, read_only=False)
    stop = None
    if with_base:
        stop = next(i for i in iter_chain(img) if i.path.endswith("base.qcow2"))
    try:
        off = 0
        step = rnd.choice([MiB, 4 * MiB, 300 * 1024])
        while off < size:
            await dev.copy_up_step(off, step, base=stop, zeroes=True)
            off += step
        assert await dev.read(0, size) == want.read_bytes()
        await dev.flush()
        if not topt:  # standard L2 entries: runs the backing holds as plain data go in-kernel
            assert fast[0] > 0
    finally:
        await dev.close()
    qemu_img("compare", "-f", "qcow2", "-F", "raw", str(top), str(want))
    rc, q = qemu_check(top)
    assert rc == 0 and q.get("corruptions", 0) == 0 and q.get("leaks", 0) == 0, q
    if not with_base:  # everything is in the top now: it reads the same without a backing
        qemu_img("rebase", "-u", "-b", "", str(top))
        qemu_img("compare", "-f", "qcow2", "-F", "raw", str(top), str(want))
