"""vdisk.block.stats: the counters and their QMP shape, in-process."""

from __future__ import annotations

import tracemalloc

from vdisk.block.stats import IOStats, empty_qmp, now


def test_counters_and_shape() -> None:
    s = IOStats()
    assert "idle_time_ns" not in s.as_qmp()
    t0 = now()
    s.read(512, t0)
    s.write(4096, 100, t0)
    s.write(0, 10, t0)
    s.unmap(65536, t0)
    s.flush(t0)
    q = s.as_qmp()
    assert (q["rd_bytes"], q["rd_operations"], q["wr_bytes"], q["wr_operations"]) == (
        512, 1, 110, 2)
    assert (q["unmap_bytes"], q["unmap_operations"], q["flush_operations"]) == (65536, 1, 1)
    assert q["wr_highest_offset"] == 4196 and q["idle_time_ns"] >= 0
    assert set(empty_qmp()) == set(q) - {"idle_time_ns"}


def test_counting_allocates_nothing_that_stays() -> None:
    """The counting on the hot path keeps nothing per request (tracemalloc): 20000 calls
    leave at most a few counters' worth (an int that grew a digit), not 20000 objects."""
    s = IOStats()
    for _ in range(100):  # warm up
        s.read(4096, now())
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(10000):
        t0 = now()
        s.read(4096, t0)
        s.write(0, 4096, t0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(d.size_diff for d in after.compare_to(before, "filename")
                if d.traceback[0].filename.endswith("stats.py"))
    assert grown < 1024
