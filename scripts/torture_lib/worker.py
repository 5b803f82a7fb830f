"""One I/O process of the torture: random I/O on the served drive file, against a model.

Run as `python -m torture_lib.worker PARAMS_JSON` (cwd scripts/). It owns a set of disjoint,
sector-aligned regions: only it writes there, so it knows their exact content. It reads
anywhere, and checks what it reads in its own regions (the latest acknowledged content)
and in the unowned regions (the reference: nobody writes there). Messages to the parent,
one JSON list per line on stdout, each sent only after the event it reports:

  ["W", seq, off, len, dseed]  about to write gen_data(dseed, len) at off
  ["Z", seq, off, len]         about to punch a hole (zeroes) over [off, off+len)
  ["A", seq]                   op seq returned successfully
  ["F", seq]                   fsync returned: every op <= seq is durable
  ["M", off, len, text]        a read returned wrong data
  ["E", seq, errno, t, text]   an I/O error (t: CLOCK_MONOTONIC); the worker then stops
  ["S", stats]                 totals, sent last
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import random
import sys
import time
from typing import Any

SECTOR = 512
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
DIRECT_ALIGN = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def gen_data(dseed: int, length: int) -> bytes:
    """The bytes of one write (the parent regenerates them from the seed)."""
    return random.Random(dseed).randbytes(length)


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate({mode:#x}): {os.strerror(e)}")


def punch_hole(fd: int, off: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)


def first_diff(a: bytes, b: bytes) -> int:
    for i in range(0, len(a), SECTOR):
        if a[i : i + SECTOR] != b[i : i + SECTOR]:
            for j in range(i, min(i + SECTOR, len(a))):
                if a[j] != b[j]:
                    return j
    return -1


class Worker:
    def __init__(self, p: dict[str, Any]) -> None:
        self.rng = random.Random(p["seed"])
        self.path: str = p["path"]
        self.owned: list[list[int]] = p["owned"]
        self.unowned: list[list[int]] = p["unowned"]
        self.others: list[list[int]] = p["others"]
        self.deadline = time.monotonic() + p["max_seconds"]
        self.pace: float = p["pace"]
        self.use_direct: bool = p.get("direct", True)
        self.dfd = -1
        with open(p["ref"], "rb") as f:
            self.model = bytearray(f.read())
        self.seq = 0
        self.stats = {"ops": 0, "writes": 0, "bytes_written": 0, "punches": 0, "fsyncs": 0,
                      "reads": 0, "bytes_read_checked": 0}

    def send(self, *msg: Any) -> None:
        os.write(1, (json.dumps(list(msg)) + "\n").encode())

    def _range_in(self, region: list[int], max_len: int) -> tuple[int, int]:
        start, end = region
        size = end - start
        r = self.rng.random()
        if r < 0.3:
            length = self.rng.randint(1, min(SECTOR + 100, size))
        elif r < 0.7:
            length = self.rng.randint(SECTOR, min(8192, size))
        else:
            length = self.rng.randint(1, min(max_len, size))
        if self.rng.random() < 0.3:  # sector-aligned
            length = max(SECTOR, length // SECTOR * SECTOR)
            off = start + self.rng.randrange(0, (size - length) // SECTOR + 1) * SECTOR
        else:
            off = self.rng.randint(start, end - length)
        return off, length

    def _direct(self, off: int, length: int) -> tuple[int, int] | None:
        """The range aligned for O_DIRECT (None if nothing aligned is left), sometimes."""
        if self.dfd < 0 or self.rng.random() >= 0.25:
            return None
        lo = -(-off // DIRECT_ALIGN) * DIRECT_ALIGN
        hi = (off + length) // DIRECT_ALIGN * DIRECT_ALIGN
        return (lo, hi - lo) if hi > lo else None

    def write(self, fd: int) -> None:
        off, length = self._range_in(self.rng.choice(self.owned), 256 << 10)
        direct = self._direct(off, length)
        if direct:
            off, length = direct
        self.seq += 1
        dseed = self.rng.getrandbits(63)
        data = gen_data(dseed, length)
        self.send("W", self.seq, off, length, dseed)
        if direct:
            buf = mmap.mmap(-1, length)
            buf[:] = data
            n = os.pwritev(self.dfd, [buf], off)
            buf.close()
        else:
            n = os.pwrite(fd, data, off)
        if n != length:
            raise OSError(errno.EIO, f"short write: {n} of {length} bytes")
        self.model[off : off + length] = data
        self.send("A", self.seq)
        self.stats["writes"] += 1
        self.stats["bytes_written"] += length

    def punch(self, fd: int) -> None:
        off, length = self._range_in(self.rng.choice(self.owned), 128 << 10)
        self.seq += 1
        self.send("Z", self.seq, off, length)
        if self.rng.random() < 0.3:
            fallocate(fd, FALLOC_FL_ZERO_RANGE, off, length)
        else:
            punch_hole(fd, off, length)
        self.model[off : off + length] = bytes(length)
        self.send("A", self.seq)
        self.stats["punches"] += 1

    def fsync(self, fd: int) -> None:
        os.fsync(fd)
        self.send("F", self.seq)
        self.stats["fsyncs"] += 1

    def read(self, fd: int) -> None:
        r = self.rng.random()
        pool = self.owned if r < 0.6 or not (self.unowned or self.others) else (
            self.unowned if (r < 0.85 and self.unowned) or not self.others else self.others)
        region = self.rng.choice(pool)
        off, length = self._range_in(region, 256 << 10)
        direct = self._direct(off, length)
        if direct:
            off, length = direct
            buf = mmap.mmap(-1, length)
            n = os.preadv(self.dfd, [buf], off)
            data = buf[:n]
            buf.close()
        else:
            data = os.pread(fd, length, off)
        self.stats["reads"] += 1
        if pool is self.others:
            if len(data) != length:
                raise OSError(errno.EIO, f"short read: {len(data)} of {length} bytes")
            return  # another worker's region: its content is not ours to know
        want = bytes(self.model[off : off + length])
        if data != want:
            if len(data) != length:
                raise OSError(errno.EIO, f"short read: {len(data)} of {length} bytes")
            at = off + first_diff(data, want)
            self.send("M", at, length,
                      f"read [{off}, +{length}) differs at {at}: got {data[at - off:at - off + 8].hex()} "
                      f"want {want[at - off:at - off + 8].hex()} "
                      f"({'own' if pool is self.owned else 'unowned'} region, after op {self.seq})")
        else:
            self.stats["bytes_read_checked"] += length

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        self.dfd = os.open(self.path, os.O_RDWR | os.O_DIRECT) if self.use_direct else -1
        ops = [self.write, self.read, self.fsync, self.punch]
        weights = [45, 30, 10, 15]
        try:
            while time.monotonic() < self.deadline:
                op = self.rng.choices(ops, weights)[0]
                try:
                    op(fd)
                except OSError as e:
                    self.send("E", self.seq, e.errno, time.monotonic(), f"{op.__name__}: {e}")
                    return
                self.stats["ops"] += 1
                if self.pace:
                    time.sleep(self.rng.uniform(0, self.pace))
        finally:
            for f in (fd, self.dfd):
                try:
                    if f >= 0:
                        os.close(f)
                except OSError:
                    pass
            self.send("S", self.stats)


def main() -> None:
    params = json.loads(sys.argv[1])
    try:
        fd_ok = True
        Worker(params).run()
    except OSError as e:  # open failed: the mount is gone already
        fd_ok = False
        os.write(1, (json.dumps(["E", 0, e.errno, time.monotonic(), f"open: {e}"]) + "\n").encode())
    if not fd_ok:
        os.write(1, (json.dumps(["S", {}]) + "\n").encode())


if __name__ == "__main__":
    main()
