"""The job state machine with a fake device: status sequences, the verb table, and the
windows where vdisk awaits and QEMU does not (the flush and the header rewrite of a
finalizing job). The sequences themselves are compared with qemu-storage-daemon in
tests/integration/test_job_model.py."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests.unit.test_jobs_unit import FakeDevice, MiB
from vdisk.block.job import TRANSITIONS, VERBS, JobStatus, Verb
from vdisk.block.stream import StreamJob
from vdisk.errors import JobError


class HeldDevice(FakeDevice):
    """flush / set_backing wait for `release` once `hold` names them."""

    def __init__(self, *a: Any, hold: str = "", **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.hold = hold
        self.reached = trio.Event()
        self.release = trio.Event()

    async def _maybe_hold(self, what: str) -> None:
        if self.hold == what:
            self.reached.set()
            await self.release.wait()

    async def flush(self) -> None:
        await self._maybe_hold("flush")
        await super().flush()

    async def set_backing(self, new_backing: Any, *, name: Any = None) -> None:
        await self._maybe_hold("set_backing")
        await super().set_backing(new_backing, name=name)


def job_on(dev: FakeDevice, log: list[Any], **kw: Any) -> StreamJob:
    def emit(name: str, data: dict[str, Any]) -> None:
        log.append(data["status"] if name == "JOB_STATUS_CHANGE" else name)

    return StreamJob("j", dev, emit=emit, status_fn=dev.status, **kw)


def test_tables_are_qemus_shape() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    assert TRANSITIONS[JobStatus.NULL] == frozenset()
    assert all(VERBS[v] for v in Verb)
    assert JobStatus.PENDING in VERBS[Verb.CANCEL] and JobStatus.PENDING in VERBS[Verb.FINALIZE]
    assert JobStatus.CONCLUDED not in VERBS[Verb.CANCEL]


async def test_cancel_while_flushing_in_pending_aborts_and_keeps_backing() -> None:
    dev = HeldDevice(4 * MiB, held={0, 1}, hold="flush")
    log: list[Any] = []
    job = job_on(dev, log, auto_finalize=False)
    async with trio.open_nursery() as n:
        n.start_soon(job.run)
        await trio.sleep(0.1)
        assert job.status == "pending" and log[-1] == "BLOCK_JOB_PENDING"
        job.finalize()
        await dev.reached.wait()
        job.cancel()  # accepted in pending: the job must abort, not complete
        dev.release.set()
    assert log == ["created", "running", "waiting", "pending", "BLOCK_JOB_PENDING",
                   "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    assert dev.new_backing == "unchanged"


async def test_cancel_while_the_header_is_rewritten_is_refused() -> None:
    dev = HeldDevice(4 * MiB, held={0}, hold="set_backing")
    log: list[Any] = []
    job = job_on(dev, log, auto_dismiss=False)
    async with trio.open_nursery() as n:
        n.start_soon(job.run)
        await dev.reached.wait()
        assert job.status == "pending"
        with pytest.raises(JobError, match="is completing and cannot be cancelled"):
            job.cancel()
        assert not job.request_stop()
        dev.release.set()
    assert log[-2:] == ["BLOCK_JOB_COMPLETED", "concluded"] and dev.new_backing is None
    assert job.info()["status"] == "concluded" and "error" not in job.info()
    job.dismiss()
    assert log[-1] == "null"


async def test_verbs_refused_with_qemus_words() -> None:
    dev = FakeDevice(4 * MiB, held={0})
    log: list[Any] = []
    job = job_on(dev, log, auto_finalize=False, auto_dismiss=False)
    with pytest.raises(JobError) as ei:
        job.finalize()
    assert str(ei.value) == "Job 'j' in state 'created' cannot accept command verb 'finalize'"
    async with trio.open_nursery() as n:
        n.start_soon(job.run)
        await trio.sleep(0.1)
        for verb in (job.pause, lambda: job.set_speed(0), job.dismiss):
            with pytest.raises(JobError, match="in state 'pending' cannot accept"):
                verb()
        with pytest.raises(JobError, match="Can't resume a job that was not paused"):
            job.resume()
        job.cancel()
    assert job.info()["error"] == job.job_info()["error"] == "Operation canceled"
    assert dev.new_backing == "unchanged"


def test_negative_speed_creates_then_drops_the_job() -> None:
    log: list[Any] = []
    with pytest.raises(JobError, match="non-negative"):
        job_on(FakeDevice(MiB, held=set()), log, speed=-1)
    assert log == ["created", "null"]
