"""Several processes read, write, punch holes and fsync at random through FUSE at once;
the drive must match a model, then `qemu-img compare` and `qemu-img check` agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.commands import guest_view, qemu_img, qemu_io
from tests.helpers.daemon import serving

MiB = 1 << 20
SIZE = 16 * MiB
WORKERS = 4

# Worker i owns the 8 KiB units u with u % WORKERS == i, so every 64 KiB cluster is
# shared by all workers: first-touch copy-on-read, COW and writes of one cluster race
# between processes. Each worker checks its reads against its own model and writes its
# final model (the whole drive; only its own units count) to OUT.
UNIT = 8192
WORKER = r"""
import ctypes, os, random, sys
path, idx, nworkers, unit, out, init = sys.argv[1:7]
idx, nworkers, unit = int(idx), int(nworkers), int(unit)
rng = random.Random(idx)
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
with open(init, "rb") as f:
    model = bytearray(f.read())
units = range(idx, len(model) // unit, nworkers)
fd = os.open(path, os.O_RDWR | os.O_DIRECT)  # straight to the daemon: no page locks
for i in range(1500):
    op = rng.random()
    u = rng.choice(units) * unit
    off = u + rng.randrange(unit)
    n = rng.randrange(1, u + unit - off + 1)
    if op < 0.45:
        data = os.urandom(n)
        assert os.pwrite(fd, data, off) == n
        model[off : off + n] = data
    elif op < 0.55:
        mode = rng.choice([0x03, 0x10])  # PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE
        if libc.fallocate(fd, mode, off, n) != 0:
            raise OSError(ctypes.get_errno(), "fallocate")
        model[off : off + n] = bytes(n)
    elif op < 0.6:
        os.fsync(fd)
    else:
        got = os.pread(fd, n, off)
        assert got == model[off : off + n], (idx, i, off, n)
os.close(fd)
with open(out, "wb") as f:
    f.write(model)
"""


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["inline", "threads"])
def test_concurrent_random_io_matches_model(tmp_path: Path, engine: str) -> None:
    """inline: the daemon's normal mode. threads: every engine call goes to a worker
    thread, so requests interleave between the steps of a copy-on-read or copy-up (the
    range locks must keep them apart)."""
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, str(SIZE))
    qemu_io(base, "write -P 0x3c 0 5M", "write -P 0x4d 9M 3M", "write -z 10M 64k")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd=tmp_path)
    qemu_io(top, "write -P 0x5e 4M 2M")
    init = tmp_path / "init.raw"
    init.write_bytes(guest_view(top, tmp_path))
    model = bytearray(init.read_bytes())
    extra = ["--engine-threads"] if engine == "threads" else []
    with serving(tmp_path, f"id=d0,file={top}", extra=extra) as srv:
        procs = []
        for i in range(WORKERS):
            out = tmp_path / f"model{i}"
            args = [str(srv.path("d0")), str(i), str(WORKERS), str(UNIT), str(out), str(init)]
            procs.append((subprocess.Popen([sys.executable, "-c", WORKER, *args],
                                           stderr=subprocess.PIPE, text=True), out))
        for proc, _ in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        for i, (_, out) in enumerate(procs):
            theirs = out.read_bytes()
            for u in range(i * UNIT, SIZE, WORKERS * UNIT):
                model[u : u + UNIT] = theirs[u : u + UNIT]
        assert srv.path("d0").read_bytes() == model
        assert srv.stop() == 0
    expect = tmp_path / "expect.raw"
    expect.write_bytes(model)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", top, expect)
    qemu_img("check", top)


RACE = r"""
import mmap, os, random, sys, threading
drives, size, base_byte = sys.argv[1:-2], int(sys.argv[-2]), int(sys.argv[-1])
block = 4096
for n, path in enumerate(drives):
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    written = {}
    done = threading.Event()

    def writer():
        rng = random.Random(n)
        buf = mmap.mmap(-1, block)
        while not done.is_set():
            off = rng.randrange(size // block) * block
            data = os.urandom(block)
            buf[:] = data
            assert os.pwritev(fd, [buf], off) == block
            written[off] = data

    t = threading.Thread(target=writer)
    t.start()
    big = mmap.mmap(-1, size)
    os.preadv(fd, [big], 0)  # copy-on-read of everything, racing the writer
    done.set()
    t.join()
    got = mmap.mmap(-1, size)
    assert os.preadv(fd, [got], 0) == size
    os.close(fd)
    for off in range(0, size, block):
        expect = written.get(off, bytes([base_byte]) * block)
        assert got[off : off + block] == expect, (path, off, off in written)
    print(path, len(written))
"""


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["inline", "threads"])
def test_copy_on_read_never_overwrites_concurrent_writes(tmp_path: Path, engine: str) -> None:
    """Big O_DIRECT reads (1 MiB copy-on-read requests) race 4 KiB writes to the same
    ranges on fresh tops; every write must survive the copy-up."""
    size = 2 * MiB
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, str(size))
    qemu_io(base, f"write -P 0x6b 0 {size}")
    drives = []
    for i in range(8):
        top = tmp_path / f"top{i}.qcow2"
        qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd=tmp_path)
        drives.append((f"d{i}", top))
    extra = ["--engine-threads"] if engine == "threads" else []
    with serving(tmp_path, *(f"id={d},file={t}" for d, t in drives), extra=extra) as srv:
        res = subprocess.run([sys.executable, "-c", RACE,
                              *(str(srv.path(d)) for d, _ in drives), str(size), "107"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert srv.stop() == 0
    for _, top in drives:
        qemu_img("check", top)
