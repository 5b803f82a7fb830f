"""Block streaming end to end: a real `vdisk serve`, driven over QMP with qemu.qmp,
checked with qemu-img (info, check, map, compare) as the independent oracle."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers.chains import GiB, MiB, create, depth_of, sha, three_layers
from tests.helpers.commands import check_clean, qemu_info, qemu_io, qemu_map, run, to_raw, vdisk
from tests.helpers.daemon import serving
from tests.helpers.qmp import qmp_session


def drive(top: Path, cor: bool = False) -> str:
    return f"id=d0,file={top},copy-on-read={'on' if cor else 'off'}"


@pytest.mark.slow
def test_full_stream_three_layers(tmp_path: Path) -> None:
    base, mid, top = three_layers(tmp_path)
    orig = to_raw(top, tmp_path / "orig.raw")
    want = sha(orig)
    with serving(tmp_path, drive(top)) as srv, qmp_session(srv.qmp_path) as q:
        view = srv.path("d0")
        assert sha(view) == want
        assert q.ok("block-stream", device="d0", speed=12 * MiB) == {}
        jobs = q.jobs()
        assert len(jobs) == 1 and jobs[0]["type"] == "stream" and jobs[0]["device"] == "d0"
        hashes = 0
        while q.jobs():
            assert sha(view) == want  # the view never changes because of the job
            hashes += 1
        ev = q.wait_event("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
        assert ev["event"] == "BLOCK_JOB_COMPLETED"
        assert "seconds" in ev["timestamp"] and "microseconds" in ev["timestamp"]
        data = ev["data"]
        assert "error" not in data and data["len"] == data["offset"] == 64 * MiB
        assert data["type"] == "stream" and data["device"] == "d0"
        assert hashes >= 2
        assert sha(view) == want
        blk = q.ok("query-block")[0]["inserted"]  # the live chain switched
        assert "backing_file" not in blk and blk["backing_file_depth"] == 0
        assert srv.stop() == 0, srv.stderr
    meta = qemu_info(top, "-U")
    assert "backing-filename" not in meta and "full-backing-filename" not in meta
    check_clean(top)
    assert sha(to_raw(top, tmp_path / "after.raw")) == want
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, orig)
    # Streaming copied what the chain held; ranges unallocated everywhere stay unallocated.
    entries = qemu_map(top, "-U")
    assert depth_of(entries, 30 * MiB)[1] is False  # nobody held 30M: still a hole
    assert depth_of(entries, 0)[1] is True and depth_of(entries, 21 * MiB)[1] is True


@pytest.mark.slow
def test_stream_to_base_keeps_base(tmp_path: Path) -> None:
    base, mid, top = three_layers(tmp_path)
    orig = to_raw(top, tmp_path / "orig.raw")
    want = sha(orig)
    before = qemu_map(top, "-U")
    assert depth_of(before, 8 * MiB)[0] == 1 and depth_of(before, 5 * MiB)[0] == 2
    with serving(tmp_path, drive(top)) as srv, qmp_session(srv.qmp_path) as q:
        # base named by its resolved path (the chain stores "base.qcow2")
        assert q.ok("block-stream", device="d0", base=str(base.resolve())) == {}
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        assert "error" not in ev["data"] and ev["data"]["offset"] == ev["data"]["len"]
        assert sha(srv.path("d0")) == want
        blk = q.ok("query-block")[0]["inserted"]  # the live chain switched
        # as qsd 7.2 reports it: the backing node's file name as opened (absolute)
        assert blk["backing_file_depth"] == 1 and blk["backing_file"] == str(base.resolve())
        assert srv.stop() == 0, srv.stderr
    meta = qemu_info(top, "-U")
    assert Path(meta["full-backing-filename"]).resolve() == base.resolve()
    assert meta.get("backing-filename-format") == "qcow2"
    check_clean(top)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, orig)
    after = qemu_map(top, "-U")
    # the intermediate's data and its zero range over base data were copied into the top
    assert depth_of(after, 8 * MiB)[:2] == (0, True)
    assert depth_of(after, 20 * MiB)[:2] == (0, True)
    assert depth_of(after, 1 * MiB + 4096) == (0, False, True)
    assert depth_of(after, 41 * MiB)[0] == 0
    # base's own data was not copied
    for off in (0, 5 * MiB, 15 * MiB, 40 * MiB + 4096, 63 * MiB):
        assert depth_of(after, off)[0] == 1, off
    assert depth_of(after, 30 * MiB)[1] is False


@pytest.mark.slow
def test_stream_backing_file_string(tmp_path: Path) -> None:
    base, mid, top = three_layers(tmp_path)
    orig = to_raw(top, tmp_path / "orig.raw")
    spelled = f"{tmp_path}/./base.qcow2"
    with serving(tmp_path, drive(top)) as srv, qmp_session(srv.qmp_path) as q:
        assert q.err("block-stream", device="d0", **{"backing-file": spelled}) == (
            "GenericError", "backing file specified, but streaming the entire chain")  # qsd's
        q.ok("block-stream", device="d0", base="base.qcow2", **{"backing-file": spelled})
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        assert "error" not in ev["data"]
        assert srv.stop() == 0, srv.stderr
    meta = qemu_info(top, "-U")
    assert meta["backing-filename"] == spelled and meta["backing-filename-format"] == "qcow2"
    check_clean(top)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, orig)


@pytest.mark.slow
def test_stream_no_op_cases(tmp_path: Path) -> None:
    base, mid, top = three_layers(tmp_path)
    alone = create(tmp_path / "alone.qcow2", 8 * MiB)
    qemu_io(alone, "write -P 0x44 1M 1M")
    with serving(tmp_path, drive(top), f"id=d1,file={alone}") as srv, \
            qmp_session(srv.qmp_path) as q:
        # base = the top's own backing file (by stored name): nothing to copy, completes at once
        t0 = time.monotonic()
        assert q.ok("block_stream", device="d0", base="mid.qcow2") == {}
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=10)
        assert time.monotonic() - t0 < 5
        assert ev["data"]["offset"] == ev["data"]["len"] and "error" not in ev["data"]
        # no backing file: completes at once
        assert q.ok("block-stream", device="d1") == {}
        ev = q.wait_event("BLOCK_JOB_COMPLETED", device="d1", timeout=10)
        # as in QEMU 7.2 (test_qmp_errors compares): a job with nothing to do reports 0/0
        assert ev["data"]["offset"] == ev["data"]["len"] == 0
        assert q.jobs() == []
        assert srv.stop() == 0, srv.stderr
    assert qemu_info(top, "-U")["backing-filename"] == "mid.qcow2"
    assert qemu_map(top, "-U") == qemu_map(top, "-U")  # readable
    assert depth_of(qemu_map(top, "-U"), 8 * MiB)[0] == 1  # nothing copied
    check_clean(top)
    check_clean(alone)


def test_stream_2tib_sparse_is_fast(tmp_path: Path) -> None:
    size = 2048 * GiB
    base = create(tmp_path / "base.qcow2", size)
    writes = ("write -P 0x51 0 1M", "write -P 0x52 1T 1M", "write -P 0x53 2047G 1M")
    qemu_io(base, *writes)
    top = create(tmp_path / "top.qcow2", size, "base.qcow2")
    qemu_io(top, "write -P 0x54 512K 4K")
    raw = tmp_path / "base.raw"  # a sparse raw bottom image
    with open(raw, "wb") as f:
        f.truncate(size)
    qemu_io(raw, *writes, fmt="raw")
    top2 = create(tmp_path / "top2.qcow2", size, "base.raw", backing_fmt="raw")
    qemu_io(top2, "write -P 0x54 512K 4K")
    with serving(tmp_path, drive(top), f"id=d1,file={top2},copy-on-read=off") as srv, \
            qmp_session(srv.qmp_path) as q:
        t0 = time.monotonic()
        q.ok("block-stream", device="d0")
        q.ok("block-stream", device="d1")
        for dev in ("d0", "d1"):
            ev = q.wait_event("BLOCK_JOB_COMPLETED", device=dev, timeout=60)
            assert "error" not in ev["data"] and ev["data"]["offset"] == size
        elapsed = time.monotonic() - t0
        assert elapsed < 30, elapsed
        assert srv.stop() == 0, srv.stderr
    for img in (top, top2):
        assert "backing-filename" not in qemu_info(img, "-U")
        check_clean(img)
        qemu_io(img, "read -P 0x51 0 512K", "read -P 0x54 512K 4K", "read -P 0x52 1T 1M",
                "read -P 0x53 2047G 1M", "read -P 0 2046G 1M")
        assert Path(img).stat().st_size < 64 * MiB  # the holes stayed holes


@pytest.mark.slow
def test_cli_stream_offline(tmp_path: Path) -> None:
    base, mid, top = three_layers(tmp_path)
    orig = to_raw(top, tmp_path / "orig.raw")
    out = vdisk("stream", top, "--base", "nope.qcow2", check=False)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "nope.qcow2" in out.stderr
    assert "Traceback" not in out.stderr
    out = vdisk("stream", top, "--speed", "-5", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    out = vdisk("stream", top, "--base", "base.qcow2", "--speed", "64M", check=False)
    assert out.returncode == 0, out.stderr
    assert "%" in out.stdout and "\x1b" not in out.stdout  # plain progress lines, not a TTY
    assert qemu_info(top, "-U")["backing-filename"] == "base.qcow2"
    check_clean(top)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, orig)
    out = vdisk("stream", top, check=False)
    assert out.returncode == 0, out.stderr
    assert "backing-filename" not in qemu_info(top, "-U")
    check_clean(top)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, orig)
    raw = tmp_path / "plain.raw"
    raw.write_bytes(b"\0" * MiB)
    out = vdisk("stream", raw, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr and str(raw) in out.stderr


@pytest.mark.slow
def test_stream_shorter_backing_file(tmp_path: Path) -> None:
    """An intermediate shorter than the top: past its end the view reads zeroes, which
    must be kept when the top is re-pointed at a longer base holding data there."""
    base = create(tmp_path / "base.qcow2", "32M")
    qemu_io(base, "write -P 0x61 0 32M")
    mid = create(tmp_path / "mid.qcow2", "16M", "base.qcow2")
    qemu_io(mid, "write -P 0x62 4M 1M")
    top = create(tmp_path / "top.qcow2", "32M", "mid.qcow2")
    qemu_io(top, "write -P 0x63 20M 64K")
    orig = to_raw(top, tmp_path / "orig.raw")
    with serving(tmp_path, drive(top)) as srv, qmp_session(srv.qmp_path) as q:
        q.ok("block-stream", device="d0", base="base.qcow2")
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
        assert "error" not in ev["data"] and ev["data"]["offset"] == 32 * MiB
        assert srv.stop() == 0, srv.stderr
    assert qemu_info(top, "-U")["backing-filename"] == "base.qcow2"
    check_clean(top)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, orig)
    qemu_io(top, "read -P 0 16M 4M", "read -P 0x63 20M 64K", "read -P 0x62 4M 1M")
