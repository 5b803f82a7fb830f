"""The job state machine against qemu-storage-daemon 7.2 on the same command sequences.

Each scenario runs on `vdisk serve` and on qsd, each over its own copy of the same chain
(base with 16 MiB of data <- empty top), driven by qemu.qmp. What is recorded on each
side: every answer of the scenario's commands (class and desc of errors, the query
entries in stable states), and every event (JOB_STATUS_CHANGE with its status, the block
job events with their data; a cancelled job's offset only when it is the end). The
records must be equal; then both images must be in the same state: backing file kept or
dropped as the scenario says, no corruption (qemu-img check), the guest view unchanged
(qemu-io read -P).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.chains import MiB, create
from tests.helpers.commands import check_clean, qemu_info, qemu_io
from tests.helpers.daemon import serving
from tests.helpers.polling import wait_until
from tests.helpers.qmp import QMP, qmp_session
from tests.helpers.qsd import Node, qsd_serving

JOB = "j0"
# Engine calls in worker threads: at this tree's base an inline stream copy trips the loop
# guard (copy_file_range / fdatasync on the trio thread, vdisk/block/device.py); the job
# model under test is the same either way.
ENGINE = ("--engine-threads",)


def chain(d: Path) -> Path:
    """base (16 MiB of 0x5a at 0, 32 MiB) <- top; top holds one cluster at 24M (its L2
    table exists, as in any image in use)."""
    d.mkdir()
    base = create(d / "base.qcow2", "32M")
    qemu_io(base, "write -P 0x5a 0 16M")
    top = create(d / "top.qcow2", "32M", "base.qcow2")
    qemu_io(top, "write -P 0x33 24M 64k")
    return top


class Recorder:
    """Runs commands on one side and records their answers; collects its events."""

    def __init__(self, q: QMP) -> None:
        self.q = q
        self.answers: list[tuple[str, dict[str, Any], Any]] = []

    def call(self, name: str, **args: Any) -> None:
        r = self.q.cmd(name, **args)
        self.answers.append((name, args, r.get("return", r.get("error"))))

    def status(self, job: str) -> str | None:
        jobs = self.q.ok("query-jobs")
        return next((j["status"] for j in jobs if j["id"] == job), None)

    def wait(self, job: str, status: str) -> None:
        wait_until(lambda: self.status(job) == status, timeout=30, step=0.02)

    def wait_gone(self, job: str) -> None:
        wait_until(lambda: self.status(job) is None, timeout=30, step=0.02)

    def events(self, quiet: float = 0.5) -> list[tuple[str, Any]]:
        """Every event so far, waiting until none came for `quiet` seconds."""
        out: list[tuple[str, Any]] = []
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            ev = self.q.next_event(*KNOWN, timeout=0.1)
            if ev is not None:
                out.append(normalize(ev))
                last = time.monotonic()
        return out


KNOWN = ("JOB_STATUS_CHANGE", "BLOCK_JOB_PENDING", "BLOCK_JOB_COMPLETED",
         "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR", "BLOCK_JOB_READY")


def normalize(ev: dict[str, Any]) -> tuple[str, Any]:
    data = dict(ev["data"])
    if ev["event"] == "JOB_STATUS_CHANGE":
        return ev["event"], (data["id"], data["status"])
    if ev["event"] == "BLOCK_JOB_CANCELLED" and data["offset"] != data["len"]:
        data.pop("offset")  # where a cancel lands mid-run depends on timing
    return ev["event"], data


Scenario = Callable[[Recorder], None]


def manual_finalize_and_dismiss(r: Recorder) -> None:
    r.call("block-stream", device="d0", speed=MiB,
           **{"job-id": JOB, "auto-finalize": False, "auto-dismiss": False})
    r.wait(JOB, "running")
    r.call("block-job-pause", device=JOB)
    r.wait(JOB, "paused")
    r.call("block-job-pause", device=JOB)
    r.call("job-pause", id=JOB)
    r.call("block-job-cancel", device=JOB)  # paused, no force: refused
    r.call("job-resume", id=JOB)
    r.wait(JOB, "running")
    r.call("block-job-resume", device=JOB)
    for verb in ("finalize", "dismiss", "complete"):
        r.call(f"job-{verb}", id=JOB)
    r.call("block-job-complete", device=JOB)
    r.call("block-job-set-speed", device=JOB, speed=0)
    r.wait(JOB, "pending")
    r.call("query-block-jobs")
    r.call("query-jobs")
    r.call("block-job-set-speed", device=JOB, speed=1)
    r.call("job-pause", id=JOB)
    r.call("job-resume", id=JOB)
    r.call("block-job-dismiss", id=JOB)
    r.call("block-job-finalize", id=JOB)
    r.wait(JOB, "concluded")
    r.call("query-block-jobs")
    r.call("query-jobs")
    r.call("job-cancel", id=JOB)
    r.call("block-job-finalize", id=JOB)
    r.call("block-stream", device="d0", **{"job-id": "j1"})  # the drive is still held
    r.call("block-stream", device="other", **{"job-id": JOB})
    r.call("job-dismiss", id=JOB)
    r.wait_gone(JOB)
    r.call("job-dismiss", id=JOB)
    r.call("query-block-jobs")


def cancel_in_pending(r: Recorder) -> None:
    r.call("block-stream", device="d0",
           **{"job-id": JOB, "auto-finalize": False, "auto-dismiss": False})
    r.wait(JOB, "pending")
    r.call("query-block-jobs")
    r.call("block-job-cancel", device=JOB)
    r.wait(JOB, "concluded")
    r.call("query-block-jobs")
    r.call("query-jobs")
    r.call("block-job-cancel", device=JOB)
    r.call("block-job-dismiss", id=JOB)
    r.wait_gone(JOB)


def job_cancel_in_pending_auto_dismiss(r: Recorder) -> None:
    r.call("block-stream", device="d0", **{"job-id": JOB, "auto-finalize": False})
    r.wait(JOB, "pending")
    r.call("job-cancel", id=JOB)
    r.wait_gone(JOB)


def force_cancel_paused(r: Recorder) -> None:
    r.call("block-stream", device="d0", speed=MiB, **{"job-id": JOB})
    r.wait(JOB, "running")
    r.call("block-job-pause", device=JOB)
    r.wait(JOB, "paused")
    r.call("block-job-cancel", device=JOB, force=True)
    r.wait_gone(JOB)


def job_cancel_running_kept(r: Recorder) -> None:
    r.call("block-stream", device="d0", speed=MiB, **{"job-id": JOB, "auto-dismiss": False})
    r.wait(JOB, "running")
    r.call("job-cancel", id=JOB)
    r.wait(JOB, "concluded")
    r.call("query-jobs")
    r.call("job-dismiss", id=JOB)
    r.wait_gone(JOB)


def auto_complete(r: Recorder) -> None:
    r.call("block-stream", device="d0", **{"job-id": JOB})
    r.wait_gone(JOB)
    r.call("query-block-jobs")


SCENARIOS: dict[str, tuple[Scenario, bool]] = {  # name: (steps, backing file kept)
    "manual_finalize_and_dismiss": (manual_finalize_and_dismiss, False),
    "cancel_in_pending": (cancel_in_pending, True),
    "job_cancel_in_pending_auto_dismiss": (job_cancel_in_pending_auto_dismiss, True),
    "force_cancel_paused": (force_cancel_paused, True),
    "job_cancel_running_kept": (job_cancel_running_kept, True),
    "auto_complete": (auto_complete, False),
}


def play(q: QMP, scenario: Scenario) -> tuple[list[Any], list[Any]]:
    r = Recorder(q)
    scenario(r)
    return r.answers, r.events()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_answers_and_events_as_qsd(tmp_path: Path, name: str) -> None:
    scenario, kept = SCENARIOS[name]
    v_top, q_top = chain(tmp_path / "v"), chain(tmp_path / "q")
    with qsd_serving(tmp_path, Node("d0", q_top)) as sock, qmp_session(sock) as q:
        want_answers, want_events = play(q, scenario)
    with serving(tmp_path, f"id=d0,file={v_top},copy-on-read=off", extra=ENGINE) as srv, \
            qmp_session(srv.qmp_path) as q:
        got_answers, got_events = play(q, scenario)
        assert srv.stop() == 0, srv.stderr
    assert got_answers == want_answers
    assert got_events == want_events
    for top in (q_top, v_top):
        info = qemu_info(top)
        assert info.get("backing-filename") == ("base.qcow2" if kept else None), (top, info)
        check_clean(top)
        # the guest view is what it was: base's data, zeroes, the top's own cluster
        qemu_io(top, "read -P 0x5a 0 16M", "read -P 0 16M 8M", "read -P 0x33 24M 64k",
                "read -P 0 25088k 7M")
