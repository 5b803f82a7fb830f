"""A fence of the fast-path table waits off the event loop (issue 14: nothing blocks it).

Before the block layer changes where clusters lie in ways that may free them (zeroes,
discards, a new dirty bitmap, a backing switch, close), it waits for fast-path requests
still using the table. Such a request may be waiting for the disk: here the top image
lives on a FUSE file whose reads take DELAY seconds (tests/helpers/slow_fs.py), and a
4 KiB read that the C fast path serves is in flight when QMP adds a dirty bitmap, which
resets the table. The bitmap command has to wait for that read; QMP on another connection
must go on answering meanwhile.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from tests.helpers.commands import assert_clean, qemu_img, qemu_io
from tests.helpers.daemon import serving
from tests.helpers.qmp import QMP
from tests.helpers.slow_fs import slow_sync_file

pytestmark = [pytest.mark.root]

DELAY = 0.8
K = 4096


def _read(path: Path, off: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, K)  # page-aligned, as O_DIRECT wants
        assert os.preadv(fd, [buf], off) == K
        return bytes(buf)
    finally:
        os.close(fd)


def test_a_fence_waits_for_a_slow_fast_path_read_off_the_loop(tmp_path: Path) -> None:
    src = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", str(src), "16M")
    qemu_io(src, "write -P 0x61 0 1M")
    with slow_sync_file(tmp_path, src, DELAY) as disk, serving(
            tmp_path, f"id=d0,file={disk},format=qcow2,copy-on-read=off") as srv:
        assert "FUSE fast path on" in srv.stderr
        served = srv.path("d0")
        assert _read(served, 0) == b"\x61" * K  # served by the engine, then published
        slow = Path(str(src) + ".slow-reads")
        slow.touch()
        done: list[float] = []
        t0 = time.monotonic()

        def reader() -> None:
            assert _read(served, 0) == b"\x61" * K  # from the table: waits DELAY
            done.append(time.monotonic() - t0)

        r = threading.Thread(target=reader)
        r.start()
        time.sleep(DELAY / 4)  # the read is in the slow file system now
        probes: list[float] = []
        stop = threading.Event()

        def prober() -> None:
            with closing(QMP(srv.qmp_path)) as q:
                while not stop.is_set():
                    p0 = time.monotonic()
                    q.ok("query-version")
                    probes.append(time.monotonic() - p0)
                    time.sleep(0.01)

        p = threading.Thread(target=prober)
        p.start()
        try:
            with closing(QMP(srv.qmp_path)) as q:
                b0 = time.monotonic()
                added = q.q.cmd_raw("block-dirty-bitmap-add", {"node": "d0", "name": "b0"})
                bitmap_took = time.monotonic() - b0
        finally:
            stop.set()
            p.join(timeout=30)
            r.join(timeout=30)
            slow.unlink()
        assert "return" in added, added
        assert done, "the fast-path read did not finish"
        # the bitmap waited for the read that used the table...
        assert bitmap_took >= DELAY / 3, (bitmap_took, done)
        # ...while the loop went on answering QMP
        assert len(probes) >= 5, probes
        assert max(probes) < DELAY / 2, sorted(probes)[-5:]
        with closing(QMP(srv.qmp_path)) as q:
            assert "return" in q.q.cmd_raw("block-dirty-bitmap-remove", {"node": "d0", "name": "b0"})
    assert_clean(src)
