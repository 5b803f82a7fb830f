"""Guest I/O while a stream runs: random writes and discards through FUSE (checked against
a model), kill -9 mid-stream, and ext4 on a loop device over the FUSE file."""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.chains import KiB, MiB, create, three_layers
from tests.helpers.commands import check_clean, qemu_info, qemu_io, run, to_raw
from tests.helpers.daemon import force_unmount, serving
from tests.helpers.qmp import qmp_session

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def random_io(fd: int, model: bytearray, rng: random.Random, *, discard: bool) -> str:
    """One random guest operation applied to the FUSE file and to the model."""
    size = len(model)
    r = rng.random()
    if discard and r < 0.08:
        off = rng.randrange(0, size // 65536) * 65536
        n = 65536 * rng.randint(1, 4)
        n = min(n, size - off)
        punch_hole(fd, off, n)
        model[off:off + n] = bytes(n)
        return "discard"
    if r < 0.25:
        off = rng.randrange(0, size - 256 * KiB)
        n = rng.randint(1, 256 * KiB)
        assert os.pread(fd, n, off) == model[off:off + n], f"read {off}+{n}"
        return "read"
    n = rng.choice([rng.randint(1, 4096), rng.randint(1, 65536), rng.randint(65536, 300000)])
    off = rng.randrange(0, size - n)
    data = rng.randbytes(n)
    assert os.pwrite(fd, data, off) == n
    model[off:off + n] = data
    return "write"


@pytest.mark.slow
def test_random_guest_writes_during_stream(tmp_path: Path) -> None:
    base, mid, top = three_layers(tmp_path)
    model = bytearray(to_raw(top, tmp_path / "orig.raw").read_bytes())
    rng = random.Random(1234)
    during = 0
    with serving(tmp_path, f"id=d0,file={top}") as srv, qmp_session(srv.qmp_path) as q:
        q.ok("block-stream", device="d0", speed=6 * MiB)
        fd = os.open(srv.path("d0"), os.O_RDWR)
        try:
            ops = 0
            while ops < 500 or q.jobs():
                random_io(fd, model, rng, discard=True)
                ops += 1
                if ops % 10 == 0:
                    os.fsync(fd)
                if q.jobs():
                    during += 1
                    time.sleep(0.004)
                if ops > 5000:
                    raise AssertionError("the stream did not end")
            os.fsync(fd)
            ev = q.wait_event("BLOCK_JOB_COMPLETED")
            assert "error" not in ev["data"] and ev["data"]["offset"] == ev["data"]["len"]
            assert during >= 150, during
            view = b"".join(os.pread(fd, 4 * MiB, o) for o in range(0, len(model), 4 * MiB))
            assert view == model
        finally:
            os.close(fd)
        assert srv.stop() == 0, srv.stderr
    assert "backing-filename" not in qemu_info(top, "-U")
    check_clean(top)
    assert to_raw(top, tmp_path / "after.raw").read_bytes() == model


@pytest.mark.slow
def test_kill_9_mid_stream(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "32M")
    qemu_io(base, "write -P 0x5a 0 24M")
    top = create(tmp_path / "top.qcow2", "32M", "base.qcow2")
    model = bytearray(to_raw(top, tmp_path / "orig.raw").read_bytes())
    rng = random.Random(99)
    with serving(tmp_path, f"id=d0,file={top}") as srv, qmp_session(srv.qmp_path) as q:
        q.ok("block-stream", device="d0", speed=2 * MiB)
        fd = os.open(srv.path("d0"), os.O_RDWR)
        try:
            # at most ~100 small writes: guest writes allocate (COW) clusters too, so
            # many more would leave the job nothing to do before the kill
            t_end = time.monotonic() + 1.5
            for _ in range(100):
                if time.monotonic() > t_end:
                    break
                time.sleep(0.01)
                n = rng.randint(1, 20000)
                off = rng.randrange(0, len(model) - n)
                data = rng.randbytes(n)
                os.pwrite(fd, data, off)
                os.fsync(fd)  # acknowledged: must survive the kill
                model[off:off + n] = data
        finally:
            os.close(fd)
        job = q.job("d0")
        assert job is not None and 0 < job["offset"] < job["len"], (q.events, srv.stderr)
        srv.kill()
    out = run("qemu-img", "check", top, check=False)
    assert out.returncode in (0, 3), out.stdout  # leaks at most, never corruption
    assert qemu_info(top, "-U")["backing-filename"] == "base.qcow2"
    assert to_raw(top, tmp_path / "crashed.raw").read_bytes() == model
    with serving(tmp_path, f"id=d0,file={top}", mount=tmp_path / "mnt2",
                 qmp_path=tmp_path / "qmp2.sock", name="serve2") as srv, \
            qmp_session(srv.qmp_path) as q:
        q.ok("block-stream", device="d0")
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        assert "error" not in ev["data"] and ev["data"]["offset"] == ev["data"]["len"]
        assert srv.path("d0").read_bytes() == model
        assert srv.stop() == 0, srv.stderr
    assert "backing-filename" not in qemu_info(top, "-U")
    out = run("qemu-img", "check", top, check=False)
    assert out.returncode in (0, 3) and "ERROR" not in out.stdout, out.stdout
    assert to_raw(top, tmp_path / "final.raw").read_bytes() == model


def file_digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.iterdir()) if p.is_file()}


@pytest.mark.slow
@pytest.mark.root
def test_ext4_on_loop_during_stream(tmp_path: Path) -> None:
    content = tmp_path / "content"
    content.mkdir()
    rng = random.Random(7)
    for i in range(24):
        (content / f"orig{i}.bin").write_bytes(rng.randbytes(rng.randint(10_000, 400_000)))
    base = tmp_path / "base.raw"
    run("mkfs.ext4", "-q", "-F", "-d", content, base, "64M")
    top = create(tmp_path / "top.qcow2", "64M", "base.raw", backing_fmt="raw")
    expected = file_digests(content)
    fsmnt = tmp_path / "fs"
    fsmnt.mkdir()
    loop = ""
    with serving(tmp_path, f"id=d0,file={top}") as srv, qmp_session(srv.qmp_path) as q:
        try:
            loop = run("losetup", "-f", "--show", srv.path("d0")).stdout.strip()
            run("mount", "-t", "ext4", loop, fsmnt)
            q.ok("block-stream", device="d0", speed=2 * MiB)
            i = during = 0
            while q.jobs() or i < 8:
                during += bool(q.jobs())
                data = rng.randbytes(rng.randint(1000, 300_000))
                with open(fsmnt / f"new{i}.bin", "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                expected[f"new{i}.bin"] = hashlib.sha256(data).hexdigest()
                name = f"orig{rng.randrange(24)}.bin"
                assert hashlib.sha256((fsmnt / name).read_bytes()).hexdigest() == expected[name]
                if i % 5 == 0:
                    Path("/proc/sys/vm/drop_caches").write_text("3")  # read from the device
                i += 1
                time.sleep(0.05)
                assert i < 2000
            ev = q.wait_event("BLOCK_JOB_COMPLETED")
            assert "error" not in ev["data"]
            assert during >= 5, during
            assert file_digests(fsmnt) == expected
            run("umount", fsmnt)
            out = run("e2fsck", "-fn", loop, check=False)
            assert out.returncode == 0, out.stdout + out.stderr
        finally:
            force_unmount(fsmnt)
            if loop:
                subprocess.run(["losetup", "-d", loop], check=False)
        assert srv.stop() == 0, srv.stderr
    assert "backing-filename" not in qemu_info(top, "-U")
    check_clean(top)
    raw = to_raw(top, tmp_path / "final.raw")
    out = run("e2fsck", "-fn", raw, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        run("mount", "-o", "loop,ro", raw, fsmnt)
        assert file_digests(fsmnt) == expected
    finally:
        force_unmount(fsmnt)
