"""One drive on a slow disk does not stall the daemon (issue 10, section 1).

The top image of drive "slow" lives on a FUSE file whose fsync and fdatasync take 500 ms
(tests/helpers/slow_fs.py). A writer keeps that drive busy with writes that allocate
(each in a region of its own, so each needs a new L2 table, new clusters and refcounts,
which once synced on the event-loop thread) and an fsync after each round. Meanwhile QMP
commands and 4 KiB O_DIRECT reads of another drive are timed: their p99 stays under 50 ms
while the slow drive's syncs take over 500 ms each.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.commands import assert_clean, qemu_img, qemu_io
from tests.helpers.daemon import serving
from tests.helpers.qmp import QMP
from tests.helpers.slow_fs import slow_sync_file, syncs

pytestmark = [pytest.mark.root, pytest.mark.slow]

DELAY = 0.5
BOUND = 0.050  # seconds, p99
REGION = 512 << 20  # guest bytes one L2 table maps (64 KiB clusters)
INTERVAL = 0.005  # seconds between probes


def _p99(samples: list[float]) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * 0.99))]


def test_a_slow_disk_stalls_neither_qmp_nor_other_drives(tmp_path: Path) -> None:
    slow_src = tmp_path / "slow.qcow2"
    qemu_img("create", "-f", "qcow2", str(slow_src), "64G")
    fast = tmp_path / "fast.qcow2"
    qemu_img("create", "-f", "qcow2", str(fast), "64M")
    qemu_io(fast, "write -P 0x5a 0 64M")
    with slow_sync_file(tmp_path, slow_src, DELAY) as slow_disk, serving(
            tmp_path, f"id=slow,file={slow_disk},format=qcow2",
            f"id=fast,file={fast},format=qcow2,copy-on-read=off") as srv:
        stop = threading.Event()
        errors: list[BaseException] = []
        rounds = [0]

        def writer() -> None:
            try:
                fd = os.open(srv.path("slow"), os.O_RDWR)
                try:
                    region = 1
                    while not stop.is_set() and region < 120:
                        for _ in range(2):  # each write in a table of its own
                            os.pwrite(fd, bytes([region & 0xff]) * 4096, region * REGION)
                            region += 1
                        os.fsync(fd)
                        rounds[0] += 1
                finally:
                    os.close(fd)
            except BaseException as e:  # reported by the test
                errors.append(e)

        rng = random.Random(1)
        reads: list[float] = []
        qmps: list[float] = []
        q = QMP(srv.qmp_path)
        fd = os.open(srv.path("fast"), os.O_RDONLY | os.O_DIRECT)
        page = mmap.mmap(-1, 4096)  # page-aligned, for O_DIRECT
        try:
            t = threading.Thread(target=writer)
            t.start()
            # Probes at a steady rate, each timed from when it was due (not from when it
            # could be sent), so a stall of the loop counts for every probe it delays.
            start = time.monotonic()
            i = 0
            while time.monotonic() < start + 30 and rounds[0] < 3 and t.is_alive():
                due = start + i * INTERVAL
                i += 1
                now = time.monotonic()
                if now < due:
                    time.sleep(due - now)
                if i % 2:
                    off = rng.randrange(0, 64 << 20, 4096)
                    assert os.preadv(fd, [page], off) == 4096
                    assert page[:4] == b"\x5a" * 4
                    reads.append(time.monotonic() - due)
                else:
                    q.ok("query-block")
                    qmps.append(time.monotonic() - due)
            stop.set()
            t.join(60)
        finally:
            stop.set()
            page.close()
            os.close(fd)
            q.q.close()
        assert not errors, errors
        done = syncs(slow_src)
        assert len(done) >= rounds[0] and min(done) >= DELAY, done  # slow throughout
        assert rounds[0] >= 3, rounds
        assert len(reads) > 100, len(reads)
        assert _p99(reads) < BOUND, (f"reads of the other drive: p99 {_p99(reads) * 1000:.1f} ms, "
                                     f"max {max(reads) * 1000:.1f} ms over {len(reads)}")
        assert _p99(qmps) < BOUND, (f"QMP: p99 {_p99(qmps) * 1000:.1f} ms, "
                                    f"max {max(qmps) * 1000:.1f} ms over {len(qmps)}")
        print(f"slow drive: {len(done)} syncs of {min(done):.2f}-{max(done):.2f} s; "
              f"other drive reads p99 {_p99(reads) * 1000:.1f} ms ({len(reads)}), "
              f"QMP p99 {_p99(qmps) * 1000:.1f} ms")
        assert srv.stop() == 0
    assert_clean(slow_src)
    out = qemu_io(slow_src, "read -P 1 0x20000000 4k")
    assert "read 4096/4096" in out
