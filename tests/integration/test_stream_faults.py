"""I/O errors during a stream, per on-error policy: ENOSPC writing a top on a small tmpfs,
EIO reading a backing file served by a fault-injecting FUSE file (tests/helpers/faulty_fs.py).
Whatever happens, the backing file stays, the image stays consistent, nothing is lost
and the daemon keeps serving."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.helpers.chains import MiB, create, depth_of, sha
from tests.helpers.commands import qemu_info, qemu_io, qemu_map, run, to_raw
from tests.helpers.daemon import serving
from tests.helpers.faulty_fs import faulty_file, small_tmpfs
from tests.helpers.polling import wait_until
from tests.helpers.qmp import qmp_session


def check_consistent(path: Path) -> None:
    """No corruption (leaked clusters after a failed allocation are harmless)."""
    out = run("qemu-img", "check", "-U", path, check=False)
    assert out.returncode in (0, 3), out.stdout + out.stderr
    assert "ERROR" not in out.stdout, out.stdout



@pytest.mark.slow
@pytest.mark.root
def test_enospc_report_then_stop_and_resume(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "32M")
    qemu_io(base, "write -P 0x66 0 24M", "write -P 0x67 30M 1M")
    with small_tmpfs(tmp_path / "small", "6m") as small:
        top = create(small / "top.qcow2", "32M", str(base))
        qemu_io(top, "write -P 0x68 100000 5000")
        orig = to_raw(top, tmp_path / "orig.raw")
        want = sha(orig)
        spec = f"id=d0,file={top},copy-on-read=off"
        with serving(tmp_path, spec) as srv, qmp_session(srv.qmp_path) as q:
            q.ok("block-stream", device="d0")
            ev = q.wait_event("BLOCK_JOB_ERROR")
            assert ev["data"] == {"device": "d0", "operation": "write", "action": "report"}
            ev = q.wait_event("BLOCK_JOB_COMPLETED")
            assert ev["data"]["error"] == os.strerror(28)  # "No space left on device"
            assert ev["data"]["offset"] < ev["data"]["len"]
            assert q.jobs() == []
            assert q.ok("query-block")[0]["inserted"].get("backing_file")
            assert sha(srv.path("d0")) == want  # still serving, view intact
            assert srv.stop() == 0, srv.stderr
        assert Path(qemu_info(top, "-U")["full-backing-filename"]) == base
        check_consistent(top)
        assert sha(to_raw(top, tmp_path / "after1.raw")) == want

        with serving(tmp_path, spec, name="serve2") as srv, qmp_session(srv.qmp_path) as q:
            q.ok("block-stream", device="d0", **{"on-error": "stop"})
            ev = q.wait_event("BLOCK_JOB_ERROR")
            assert ev["data"] == {"device": "d0", "operation": "write", "action": "stop"}
            job = wait_until(lambda: q.job("d0") if (q.job("d0") or {}).get(
                "status") == "paused" else None)
            assert job["io-status"] == "nospace" and job["paused"] is True
            stuck = job["offset"]
            time.sleep(0.3)
            assert q.job("d0")["offset"] == stuck  # type: ignore[index]
            run("mount", "-o", "remount,size=64m", small)
            assert q.ok("block-job-resume", device="d0") == {}
            ev = q.wait_event("BLOCK_JOB_COMPLETED")
            assert "error" not in ev["data"] and ev["data"]["offset"] == ev["data"]["len"]
            assert sha(srv.path("d0")) == want
            assert srv.stop() == 0, srv.stderr
        assert "backing-filename" not in qemu_info(top, "-U")
        check_consistent(top)
        assert sha(to_raw(top, tmp_path / "after2.raw")) == want




@pytest.mark.slow
def test_eio_report_ignore_stop(tmp_path: Path) -> None:
    src = tmp_path / "base.raw"
    src.write_bytes(os.urandom(16 * MiB))
    bad = (6 * MiB + 4096, 6 * MiB + 8192)
    with faulty_file(tmp_path, src, bad) as disk:
        top = create(tmp_path / "top.qcow2", "16M", disk, backing_fmt="raw")
        qemu_io(top, "write -P 0x77 1M 64K")
        want_bytes = bytearray(src.read_bytes())
        want_bytes[MiB:MiB + 65536] = b"\x77" * 65536
        spec = f"id=d0,file={top},copy-on-read=off"
        with serving(tmp_path, spec) as srv, qmp_session(srv.qmp_path) as q:
            q.ok("block-stream", device="d0")
            ev = q.wait_event("BLOCK_JOB_ERROR")
            assert ev["data"] == {"device": "d0", "operation": "read", "action": "report"}
            ev = q.wait_event("BLOCK_JOB_COMPLETED")
            assert ev["data"]["error"] == os.strerror(5)  # "Input/output error"
            assert ev["data"]["offset"] <= bad[0] < ev["data"]["len"]
            # the daemon keeps serving; good ranges read fine, the bad one fails
            with open(srv.path("d0"), "rb", buffering=0) as f:
                assert os.pread(f.fileno(), 65536, 0) == want_bytes[:65536]
                assert os.pread(f.fileno(), 65536, 12 * MiB) == want_bytes[12 * MiB:12 * MiB + 65536]

            q.ok("block-stream", device="d0", **{"on-error": "ignore"})
            ev = q.wait_event("BLOCK_JOB_ERROR")
            assert ev["data"] == {"device": "d0", "operation": "read", "action": "ignore"}
            ev = q.wait_event("BLOCK_JOB_COMPLETED")
            assert ev["data"]["error"] == os.strerror(5)
            assert q.ok("query-block")[0]["inserted"].get("backing_file")
            m = qemu_map(top, "-U")
            assert depth_of(m, 12 * MiB)[0] == 0  # carried on past the bad range
            assert depth_of(m, bad[0])[0] == 1  # the bad range was not copied

            q.ok("block-stream", device="d0", **{"on-error": "stop"})
            ev = q.wait_event("BLOCK_JOB_ERROR")
            assert ev["data"] == {"device": "d0", "operation": "read", "action": "stop"}
            job = wait_until(lambda: q.job("d0") if (q.job("d0") or {}).get(
                "status") == "paused" else None)
            assert job["io-status"] == "failed"
            Path(str(src) + ".ok").touch()  # the fault goes away
            q.ok("block-job-resume", device="d0")
            ev = q.wait_event("BLOCK_JOB_COMPLETED")
            assert "error" not in ev["data"] and ev["data"]["offset"] == ev["data"]["len"]
            assert srv.stop() == 0, srv.stderr
        assert "backing-filename" not in qemu_info(top, "-U")
        out = run("qemu-img", "check", "-U", top, check=False)
        assert out.returncode == 0, out.stdout
        assert to_raw(top, tmp_path / "after.raw").read_bytes() == bytes(want_bytes)
