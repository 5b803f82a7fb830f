"""The access paths of the I/O matrix: the served file itself (O_DIRECT or buffered), a loop
device on it (buffered or --direct-io=on), and a VM guest's virtio disk on it.

Each path runs the same fio jobs; its figures are named PREFIX + job figure, e.g.
`loop_direct.randread_4k_j4_iops` (the O_DIRECT FUSE path keeps the unprefixed names).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench_lib.fio import Job

MAIN_JOBS = [  # order matters (writes allocate in the top) and is the same on both sides
    Job("seq_read_1m", "read", "1M"),
    Job("randread_4k_j1", "randread", "4k"),
    Job("randread_4k_j4", "randread", "4k", numjobs=4),
    Job("randwrite_4k_j1", "randwrite", "4k"),
    Job("randwrite_4k_j4", "randwrite", "4k", numjobs=4),
    Job("seq_write_1m", "write", "1M"),
]
GUEST_JOBS = [  # inside the VM guest (TCG is slow: one job each, the main patterns)
    Job("seq_read_1m", "read", "1M"),
    Job("randread_4k_j1", "randread", "4k"),
    Job("randwrite_4k_j1", "randwrite", "4k"),
    Job("seq_write_1m", "write", "1M"),
]
JOB_LABELS = {
    "seq_read_1m": "seq read 1M",
    "randread_4k_j1": "rand read 4K, 1 job",
    "randread_4k_j4": "rand read 4K, 4 jobs",
    "randwrite_4k_j1": "rand write 4K, 1 job",
    "randwrite_4k_j4": "rand write 4K, 4 jobs",
    "seq_write_1m": "seq write 1M",
}


@dataclass(frozen=True)
class AccessPath:
    name: str  # as given to --paths
    label: str  # prefix of the figures' labels
    fio_direct: bool  # fio's direct= on the target (the served file or /dev/loopN)
    loop: str | None = None  # None, "buffered" or "direct": a loop device in between
    guest: bool = False  # fio runs in a VM guest (GUEST_JOBS)

    @property
    def prefix(self) -> str:
        """The figures' key prefix ("" for today's O_DIRECT path)."""
        return "" if self.name == "fuse-direct" else self.name.replace("-", "_") + "."

    @property
    def jobs(self) -> list[Job]:
        return GUEST_JOBS if self.guest else MAIN_JOBS

    @property
    def end_fsync(self) -> bool:
        """Writes through a page cache end with an fsync, timed (the data reaches the server)."""
        return not self.fio_direct or self.loop == "buffered"


PATHS = {p.name: p for p in (
    AccessPath("fuse-direct", "", fio_direct=True),
    AccessPath("fuse-buffered", "FUSE buffered: ", fio_direct=False),
    AccessPath("loop-buffered", "loop (buffered): ", fio_direct=True, loop="buffered"),
    AccessPath("loop-direct", "loop --direct-io=on: ", fio_direct=True, loop="direct"),
    AccessPath("guest", "VM guest (TCG, cache=none): ", fio_direct=True, guest=True),
)}


def figure_key(path: AccessPath, job: Job) -> str:
    unit = "mbps" if job.bs == "1M" else "iops"
    return f"{path.prefix}{job.name}_{unit}"


def parse_paths(text: str) -> list[AccessPath]:
    """--paths: comma-separated names (or "all"), in the order of PATHS."""
    names = list(PATHS) if text.strip() == "all" else [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in PATHS]
    if unknown or not names:
        raise ValueError(f"unknown path(s) {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(PATHS)} or all")
    return [p for name, p in PATHS.items() if name in names]


def drop_cache(file: Path) -> None:
    """Write back and drop the page cache of file (the served FUSE file) only: each run starts
    with nothing of it cached, while the chain's images stay cached."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _losetup(*args: str) -> str:
    res = subprocess.run(["losetup", *args], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"losetup {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout.strip()


def detach(dev: str) -> None:
    """losetup -d, retried while the device is still busy."""
    for _ in range(50):
        res = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
        if res.returncode == 0 or "No such device" in res.stderr:
            return
        time.sleep(0.2)
    raise RuntimeError(f"losetup -d {dev}: {res.stderr.strip()}")


@contextmanager
def loop_device(file: Path, direct: bool) -> Iterator[Path]:
    """A loop device on file (its default buffered mode, or --direct-io=on, checked in
    /sys: losetup only warns when the kernel refuses direct I/O); detached on exit."""
    args = ["--find", "--show"] + (["--direct-io=on"] if direct else []) + [str(file)]
    dev = _losetup(*args)
    try:
        dio = Path(f"/sys/block/{Path(dev).name}/loop/dio").read_text().strip()
        if dio != ("1" if direct else "0"):
            raise RuntimeError(f"{dev} on {file}: direct I/O is {dio}, wanted "
                               f"{'on' if direct else 'off'}")
        yield Path(dev)
    finally:
        detach(dev)
