"""Job control over QMP against a real `vdisk serve`: speed, cancel, pause/resume, errors,
query-block-jobs, events to every client, several drives, daemon stop, `vdisk jobs`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers.chains import MiB, create, sha
from tests.helpers.commands import check_clean, qemu_info, qemu_io, run, to_raw, vdisk
from tests.helpers.daemon import serving
from tests.helpers.polling import wait_until
from tests.helpers.qmp import pipelined, qmp_session

JOB_KEYS = {"type", "device", "len", "offset", "speed", "busy", "paused", "ready", "status",
            "io-status", "auto-finalize", "auto-dismiss"}


def chain(d: Path, name: str = "", data_mib: int = 16, size_mib: int = 32) -> Path:
    """base (data_mib MiB of data at 0) <- top (empty): everything to copy."""
    base = create(d / f"base{name}.qcow2", f"{size_mib}M")
    qemu_io(base, f"write -P 0x5a 0 {data_mib}M")
    return create(d / f"top{name}.qcow2", f"{size_mib}M", f"base{name}.qcow2")


def spec(top: Path, drive_id: str = "d0", extra: str = "") -> str:
    return f"id={drive_id},file={top},copy-on-read=off{extra}"


@pytest.mark.slow
def test_speed_limit_and_set_speed(tmp_path: Path) -> None:
    a = chain(tmp_path, "a", data_mib=8)
    b = chain(tmp_path, "b", data_mib=16)
    with serving(tmp_path, spec(a, "a"), spec(b, "b")) as srv, qmp_session(srv.qmp_path) as q:
        t0 = time.monotonic()
        assert q.ok("block-stream", device="a", speed=4 * MiB) == {}
        job = q.job("a")
        assert job is not None and job["speed"] == 4 * MiB
        ev = q.wait_event("BLOCK_JOB_COMPLETED", device="a")
        elapsed = time.monotonic() - t0
        assert "error" not in ev["data"] and ev["data"]["speed"] == 4 * MiB
        assert 1.2 <= elapsed < 10, elapsed  # 8 MiB at 4 MiB/s: about 2 s

        assert q.ok("block-stream", device="b", speed=MiB) == {}
        assert q.ok("block_job_set_speed", device="b", value=512 * 1024) == {}  # 32 s to go
        time.sleep(0.8)
        job = q.job("b")
        assert job is not None and job["speed"] == 512 * 1024 and job["offset"] < 16 * MiB
        t0 = time.monotonic()
        assert q.ok("block-job-set-speed", device="b", speed=0) == {}
        ev = q.wait_event("BLOCK_JOB_COMPLETED", device="b")
        assert time.monotonic() - t0 < 5
        assert ev["data"]["speed"] == 0 and ev["data"]["offset"] == ev["data"]["len"]
        assert srv.stop() == 0, srv.stderr
    for top in (a, b):
        assert "backing-filename" not in qemu_info(top, "-U")
        check_clean(top)


@pytest.mark.slow
def test_cancel_then_stream_again(tmp_path: Path) -> None:
    top = chain(tmp_path)
    want = sha(to_raw(top, tmp_path / "orig.raw"))
    with serving(tmp_path, spec(top)) as srv, qmp_session(srv.qmp_path) as q:
        q.ok("block-stream", device="d0", speed=2 * MiB)
        wait_until(lambda: (q.job("d0") or {}).get("offset", 0) >= MiB)
        t0 = time.monotonic()
        assert q.ok("block_job_cancel", device="d0") == {}
        assert time.monotonic() - t0 < 1  # returns at once
        ev = q.wait_event("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED")
        assert ev["event"] == "BLOCK_JOB_CANCELLED"
        assert set(ev["data"]) == {"type", "device", "len", "offset", "speed"}
        assert 0 < ev["data"]["offset"] < ev["data"]["len"]
        assert q.jobs() == []
        assert q.ok("query-block")[0]["inserted"].get("backing_file") is not None
        assert sha(srv.path("d0")) == want
        # the second stream completes (skipping what the first copied)
        q.ok("block-stream", device="d0")
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        assert "error" not in ev["data"] and ev["data"]["offset"] == ev["data"]["len"]
        assert sha(srv.path("d0")) == want
        assert srv.stop() == 0, srv.stderr
    assert "backing-filename" not in qemu_info(top, "-U")
    check_clean(top)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, tmp_path / "orig.raw")


@pytest.mark.slow
def test_pause_resume_and_query_fields(tmp_path: Path) -> None:
    top = chain(tmp_path)
    with serving(tmp_path, spec(top)) as srv, qmp_session(srv.qmp_path) as q:
        q.ok("block-stream", device="d0", speed=4 * MiB)
        jobs = q.jobs()
        assert len(jobs) == 1 and set(jobs[0]) == JOB_KEYS
        j = jobs[0]
        assert (j["type"], j["device"], j["len"], j["ready"], j["io-status"]) == (
            "stream", "d0", 32 * MiB, False, "ok")
        assert j["status"] in ("created", "running") and j["paused"] is False
        wait_until(lambda: (q.job("d0") or {}).get("offset", 0) > 0)
        assert q.ok("block-job-pause", device="d0") == {}
        assert q.err("block-job-pause", device="d0")[0] == "GenericError"
        wait_until(lambda: (q.job("d0") or {}).get("status") == "paused")
        j = q.job("d0")
        assert j is not None and j["paused"] is True and j["busy"] is False
        frozen = j["offset"]
        assert 0 < frozen < 32 * MiB
        time.sleep(0.6)
        assert q.job("d0")["offset"] == frozen  # type: ignore[index]
        assert q.ok("block-job-resume", device="d0") == {}
        assert q.err("block-job-resume", device="d0")[0] == "GenericError"  # not paused
        wait_until(lambda: (q.job("d0") or {}).get("offset", 0) > frozen)
        j = q.job("d0")
        assert j is not None and j["paused"] is False and j["status"] == "running"
        # cancel a paused job
        q.ok("block-job-pause", device="d0")
        wait_until(lambda: (q.job("d0") or {}).get("status") == "paused")
        assert q.ok("block-job-cancel", device="d0", force=True) == {}
        ev = q.wait_event("BLOCK_JOB_CANCELLED")
        assert ev["data"]["offset"] < ev["data"]["len"]
        assert q.jobs() == []
        assert srv.stop() == 0, srv.stderr
    assert qemu_info(top, "-U")["backing-filename"] == "base.qcow2"
    check_clean(top)


def test_error_classes_and_commands(tmp_path: Path) -> None:
    top = chain(tmp_path, data_mib=4)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\1" * MiB)
    ro = chain(tmp_path, "ro", data_mib=1, size_mib=4)
    drives = [spec(top), f"id=r0,file={raw},format=raw", spec(ro, "ro", ",read-only=on")]
    with serving(tmp_path, *drives) as srv, qmp_session(srv.qmp_path) as q:
        names = {c["name"] for c in q.ok("query-commands")}
        assert {"block_stream", "block-stream", "block_job_set_speed", "block-job-set-speed",
                "block_job_cancel", "block-job-cancel", "block-job-pause", "block-job-resume",
                "query-block-jobs"} <= names
        assert q.jobs() == []
        assert q.err("block_stream", device="nope")[0] == "DeviceNotFound"
        # the modern names answer as QEMU 7.2 does (test_qmp_errors.py compares with qsd)
        assert q.err("block-stream", device="nope") == (
            "GenericError", "Cannot find device='nope' nor node-name='nope'")
        assert q.err("block_stream", device="r0")[0] == "NotSupported"
        assert q.err("block_stream", device="ro")[0] == "NotSupported"
        assert q.err("block_stream", device="d0", base="other.qcow2")[0] == "BaseNotFound"
        assert q.err("block-stream", device="d0", base=str(top)) == (
            "GenericError", f"Can't find '{top}' in the backing chain")
        assert q.err("block-stream", device="d0", speed=-1) == (
            "GenericError", "Parameter 'speed' expects a non-negative value")
        assert q.err("block-stream", device="d0", **{"on-error": "bogus"})[0] == "GenericError"
        assert q.err("block_stream", device="d0", speed=5)[0] == "GenericError"  # no such arg
        assert q.err("block-stream", device="d0", **{"job-id": "1 bad"}) == (
            "GenericError", "Invalid job ID '1 bad'")
        for cmd, args in [("block_job_set_speed", {"value": 1}),
                          ("block-job-set-speed", {"speed": 1}),
                          ("block_job_cancel", {}), ("block-job-cancel", {}),
                          ("block-job-pause", {}), ("block-job-resume", {})]:
            assert q.err(cmd, device="d0", **args)[0] == "DeviceNotActive", cmd
        assert q.jobs() == []  # nothing was started by a refused command
        q.ok("block-stream", device="d0", speed=MiB)
        assert q.err("block_stream", device="d0")[0] == "DeviceInUse"
        assert q.err("block-stream", device="d0", **{"job-id": "other"}) == (
            "GenericError", "Node 'd0' is busy: block device is in use by block job: stream")
        assert q.err("block-job-set-speed", device="d0", speed=-1) == (
            "GenericError", "Parameter 'speed' expects a non-negative value")
        assert q.err("block_job_set_speed", device="d0", value=-5)[0] == "GenericError"
        assert q.job("d0")["speed"] == MiB  # type: ignore[index]
        q.ok("block_job_cancel", device="d0")
        q.wait_event("BLOCK_JOB_CANCELLED")
        # a cancel while a cancel is in progress (sent back to back, answered before the
        # job reaches its next chunk boundary)
        classes = []
        for _ in range(5):
            q.ok("block-stream", device="d0", speed=MiB)
            cancel = {"execute": "block_job_cancel", "arguments": {"device": "d0"}}
            first, second = pipelined(srv.qmp_path, cancel, cancel)
            assert first == {"return": {}}
            classes.append(second["error"]["class"])
            q.wait_event("BLOCK_JOB_CANCELLED")
            if classes[-1] == "DeviceInUse":
                break
        assert "DeviceInUse" in classes and set(classes) <= {"DeviceInUse", "DeviceNotActive"}
        assert srv.stop() == 0, srv.stderr


@pytest.mark.slow
def test_events_to_every_client_and_parallel_drives(tmp_path: Path) -> None:
    a = chain(tmp_path, "a", data_mib=4, size_mib=8)
    b = chain(tmp_path, "b", data_mib=4, size_mib=8)
    with serving(tmp_path, spec(a, "a"), spec(b, "b")) as srv, \
            qmp_session(srv.qmp_path) as q1, qmp_session(srv.qmp_path) as q2:
        q1.ok("block-stream", device="a", speed=4 * MiB)
        q1.ok("block-stream", device="b", speed=4 * MiB, **{"job-id": "jobb"})
        jobs = {j["device"]: j for j in q2.jobs()}
        assert set(jobs) == {"a", "jobb"}  # both run at once
        q1.close()  # the jobs belong to the daemon, not the connection
        for dev in ("a", "jobb"):
            ev = q2.wait_event("BLOCK_JOB_COMPLETED", device=dev)
            assert "error" not in ev["data"]
        with qmp_session(srv.qmp_path) as q3:
            assert q3.jobs() == []
        assert srv.stop() == 0, srv.stderr
    for top in (a, b):
        assert "backing-filename" not in qemu_info(top, "-U")
        check_clean(top)


def test_daemon_stop_cancels_jobs(tmp_path: Path) -> None:
    top = chain(tmp_path)
    with serving(tmp_path, spec(top)) as srv, qmp_session(srv.qmp_path) as q:
        q.ok("block-stream", device="d0", speed=2 * MiB)
        wait_until(lambda: (q.job("d0") or {}).get("offset", 0) > 0)
        srv.proc.send_signal(15)
        ev = q.wait_event("BLOCK_JOB_CANCELLED", timeout=20)
        assert ev["data"]["offset"] < ev["data"]["len"]
        assert srv.wait() == 0, srv.stderr
    assert qemu_info(top, "-U")["backing-filename"] == "base.qcow2"
    check_clean(top)



@pytest.mark.slow
def test_cli_jobs(tmp_path: Path) -> None:
    top = chain(tmp_path, data_mib=8)
    with serving(tmp_path, spec(top)) as srv, qmp_session(srv.qmp_path) as q:
        out = vdisk("jobs", srv.qmp_path, check=False)
        assert out.returncode == 0 and "no active block jobs" in out.stdout
        q.ok("block-stream", device="d0", speed=2 * MiB)
        out = vdisk("jobs", srv.qmp_path, check=False)
        assert out.returncode == 0 and out.stdout.startswith("d0: stream "), out.stdout
        out = vdisk("jobs", srv.qmp_path, "--watch", check=False)
        assert out.returncode == 0, out.stderr
        assert "%" in out.stdout and "\x1b" not in out.stdout
        assert "d0: completed" in out.stdout
        assert q.jobs() == []
    out = vdisk("jobs", tmp_path / "nope.sock", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "nope.sock" in out.stderr
