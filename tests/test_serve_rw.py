"""Several processes read, write, punch holes and fsync at random through FUSE at once;
the drive must match a model, then `qemu-img compare` and `qemu-img check` agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from chainutil import need_qcow2, qemu_img, qemu_io, qemu_raw
from serving import serving

MiB = 1 << 20
SIZE = 16 * MiB
WORKERS = 4

# Each worker owns [lo, hi): unaligned bounds, so clusters at the edges are shared with a
# neighbour (concurrent copy-on-read, COW and writes on one cluster). It checks every read
# against its own model and writes its final model to OUT.
WORKER = r"""
import ctypes, os, random, sys
path, lo, hi, seed, out, init = sys.argv[1:7]
lo, hi, seed = int(lo), int(hi), int(seed)
rng = random.Random(seed)
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
with open(init, "rb") as f:
    f.seek(lo)
    model = bytearray(f.read(hi - lo))
fd = os.open(path, os.O_RDWR)
for i in range(600):
    op = rng.random()
    off = rng.randrange(lo, hi)
    n = min(rng.choice([1, 511, 4096, 5000, 65536, 200000]), hi - off)
    if op < 0.45:
        data = os.urandom(n)
        assert os.pwrite(fd, data, off) == n
        model[off - lo : off - lo + n] = data
    elif op < 0.55:
        mode = rng.choice([0x03, 0x10])  # PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE
        if libc.fallocate(fd, mode, off, n) != 0:
            raise OSError(ctypes.get_errno(), "fallocate")
        model[off - lo : off - lo + n] = bytes(n)
    elif op < 0.6:
        os.fsync(fd)
    else:
        got = os.pread(fd, n, off)
        assert got == model[off - lo : off - lo + n], (seed, i, off, n)
os.close(fd)
with open(out, "wb") as f:
    f.write(model)
"""


def test_concurrent_random_io_matches_model(tmp_path: Path) -> None:
    need_qcow2()
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, str(SIZE))
    qemu_io(base, "write -P 0x3c 0 5M", "write -P 0x4d 9M 3M", "write -z 10M 64k")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd=tmp_path)
    qemu_io(top, "write -P 0x5e 4M 2M")
    init = tmp_path / "init.raw"
    init.write_bytes(qemu_raw(top, tmp_path))
    bounds = [0] + [i * SIZE // WORKERS + 12345 for i in range(1, WORKERS)] + [SIZE]
    model = bytearray(init.read_bytes())
    with serving(tmp_path, f"id=d0,file={top}") as srv:
        procs = []
        for i in range(WORKERS):
            out = tmp_path / f"model{i}"
            args = [str(srv.path("d0")), str(bounds[i]), str(bounds[i + 1]), str(i), str(out),
                    str(init)]
            procs.append((subprocess.Popen([sys.executable, "-c", WORKER, *args],
                                           stderr=subprocess.PIPE, text=True), out, i))
        for proc, _, _ in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        for _, out, i in procs:
            model[bounds[i] : bounds[i + 1]] = out.read_bytes()
        assert srv.path("d0").read_bytes() == model
        assert srv.stop() == 0
    expect = tmp_path / "expect.raw"
    expect.write_bytes(model)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", top, expect)
    qemu_img("check", top)
