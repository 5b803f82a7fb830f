"""Unit tests of the rate limiter and the stream job state machine, with fakes."""

from __future__ import annotations

import errno
from typing import Any

import pytest
import trio

from control.errors import QMPError
from control.jobs import JobManager, qmp_error
from vdisk.block.ratelimit import RateLimiter
from vdisk.block.stream import StreamJob, find_base
from vdisk.engine.image import Status
from vdisk.errors import JobError

MiB = 1 << 20
CL = 64 * 1024


# ---------------------------------------------------------------- rate limiter


def simulate(limiter: RateLimiter, total: int, step: int) -> tuple[float, list[tuple[float, int]]]:
    """Dispatch total bytes in steps obeying delay(); returns (end time, dispatch log)."""
    now, sent, log = 0.0, 0, []
    while sent < total:
        now += limiter.delay(now)
        n = min(step, total - sent)
        limiter.charge(n, now)
        log.append((now, n))
        sent += n
    return now, log


def test_ratelimit_unlimited_never_waits() -> None:
    lim = RateLimiter(0)
    end, _ = simulate(lim, 100 * MiB, MiB)
    assert end == 0.0


@pytest.mark.parametrize("speed,step", [(4 * MiB, 256 * 1024), (1 * MiB, 64 * 1024), (MiB, 512 * 1024)])
def test_ratelimit_average_rate(speed: int, step: int) -> None:
    lim = RateLimiter(speed)
    total = 8 * MiB
    end, log = simulate(lim, total, step)
    # The last step is dispatched at `end`; everything before it took its time.
    assert (total - log[-1][1]) / speed * 0.95 <= end <= total / speed


def test_ratelimit_bursts_bounded_to_a_slice() -> None:
    speed, step = 4 * MiB, 128 * 1024
    lim = RateLimiter(speed)
    _, log = simulate(lim, 16 * MiB, step)
    quota = speed * 0.1
    for t0, _ in log:  # bytes dispatched in any 100 ms window
        window = sum(n for t, n in log if t0 <= t < t0 + 0.1)
        assert window <= quota + step


def test_ratelimit_set_speed_resets() -> None:
    lim = RateLimiter(MiB)
    lim.charge(10 * MiB, 0.0)
    assert lim.delay(0.0) > 5
    lim.set_speed(0)
    assert lim.delay(0.0) == 0
    with pytest.raises(ValueError):
        lim.set_speed(-1)


# ---------------------------------------------------------------- fakes


class FakeImage:
    format_name = "qcow2"
    cluster_size = CL

    def __init__(self, path: str, backing: FakeImage | None = None, name: str | None = None):
        self.path = path
        self.backing = backing
        self.backing_name = name
        self.virtual_size = 0


class FakeDevice:
    """A top whose 'lower' layers hold data in given cluster indexes."""

    def __init__(self, size: int, held: set[int], top_has: set[int] | None = None) -> None:
        self.base = FakeImage("/base")
        self.mid = FakeImage("/mid", self.base, "base.qcow2")
        self.top = FakeImage("/top", self.mid, "mid.qcow2")
        self.size = size
        self.read_only = False
        self.held = set(held)
        self.top_has = set(top_has or ())
        self.fail: dict[int, OSError] = {}
        self.calls: list[tuple[str, Any]] = []
        self.new_backing: Any = "unchanged"

    io_busy = False
    stream_step = 0

    async def block_status(self, offset: int, length: int, *, base: Any = None
                           ) -> tuple[int, int | None, Status]:
        return await self.status(offset, length)

    async def copy_up_step(self, offset: int, length: int, *, base: Any = None,
                           zeroes: bool = True) -> int:
        return await self.copy_up(offset, length, base=base)

    async def status(self, offset: int, length: int) -> tuple[int, int | None, Status]:
        c = offset // CL
        kind = 0 if c in self.top_has else (1 if c in self.held else None)
        n = CL - offset % CL
        while offset + n < self.size and n < length:
            c2 = (offset + n) // CL
            k2 = 0 if c2 in self.top_has else (1 if c2 in self.held else None)
            if k2 != kind:
                break
            n += CL
        return min(n, length), kind, Status.DATA if kind is not None else Status.UNALLOCATED

    async def copy_up(self, offset: int, length: int, *, base: Any = None) -> int:
        await trio.sleep(0)
        for c in range(offset // CL, (offset + length + CL - 1) // CL):
            if c in self.fail:
                raise self.fail.pop(c)
        copied = 0
        for c in range(offset // CL, (offset + length + CL - 1) // CL):
            if c in self.held and c not in self.top_has:
                self.top_has.add(c)
                copied += CL
        self.calls.append(("copy", (offset, length)))
        return copied

    async def flush(self) -> None:
        self.calls.append(("flush", None))

    async def set_backing(self, new_backing: Any, *, name: Any = None) -> None:
        self.calls.append(("set_backing", new_backing))
        self.new_backing = new_backing


def block_events(events: list) -> Any:
    """An emit that keeps the block job events in `events` (JOB_STATUS_CHANGE left out:
    tests/unit/test_job_states.py checks those)."""
    return lambda n, d: None if n == "JOB_STATUS_CHANGE" else events.append((n, d))


def make_job(dev: FakeDevice, events: list, **kw: Any) -> StreamJob:
    return StreamJob("drive0", dev, emit=block_events(events), status_fn=dev.status, **kw)


# ---------------------------------------------------------------- job


async def test_stream_copies_held_ranges_then_flushes_then_switches() -> None:
    dev = FakeDevice(64 * MiB, held={0, 5, 6, 700, 1023}, top_has={5})
    events: list = []
    job = make_job(dev, events)
    await job.run()
    assert dev.top_has == {0, 5, 6, 700, 1023}
    kinds = [c[0] for c in dev.calls]
    assert kinds[-2:] == ["flush", "set_backing"] and dev.new_backing is None
    assert events == [
        ("BLOCK_JOB_COMPLETED",
         {"type": "stream", "device": "drive0", "len": 64 * MiB, "offset": 64 * MiB, "speed": 0})
    ]
    assert job.copied == 4 * CL


async def test_stream_throttled_takes_time(autojump_clock: trio.abc.Clock) -> None:
    dev = FakeDevice(16 * MiB, held=set(range(128)))  # 8 MiB to copy
    events: list = []
    job = make_job(dev, events, speed=4 * MiB)
    t0 = trio.current_time()
    await job.run()
    assert 1.5 <= trio.current_time() - t0 <= 2.5
    assert events[-1][0] == "BLOCK_JOB_COMPLETED"


async def test_set_speed_wakes_sleeping_job(autojump_clock: trio.abc.Clock) -> None:
    dev = FakeDevice(16 * MiB, held=set(range(128)))
    events: list = []
    job = make_job(dev, events, speed=64 * 1024)  # would take 128 s
    async with trio.open_nursery() as n:
        n.start_soon(job.run)
        await trio.sleep(3)
        assert 0 < job.offset < 16 * MiB
        job.set_speed(0)
        t0 = trio.current_time()
        await job.done.wait()
        assert trio.current_time() - t0 < 1
    assert events[-1][1]["offset"] == 16 * MiB


async def test_pause_freezes_offset_and_cancel_keeps_backing(autojump_clock: trio.abc.Clock) -> None:
    dev = FakeDevice(16 * MiB, held=set(range(256)))
    events: list = []
    job = make_job(dev, events, speed=MiB)
    async with trio.open_nursery() as n:
        n.start_soon(job.run)
        await trio.sleep(2)
        job.pause()
        await trio.sleep(0.5)
        assert job.status == "paused" and job.info()["paused"] and not job.busy
        frozen = job.offset
        await trio.sleep(5)
        assert job.offset == frozen
        job.resume()
        await trio.sleep(1)
        assert job.offset > frozen and job.status == "running"
        job.cancel()
        job.cancel()  # as in QEMU, accepted again until the job aborts
        await job.done.wait()
    with pytest.raises(JobError) as ji:
        job.cancel()
    assert str(ji.value) == "Job 'drive0' in state 'null' cannot accept command verb 'cancel'"
    assert qmp_error(ji.value).cls == "GenericError"
    assert events == [("BLOCK_JOB_CANCELLED", job._event_data())]
    assert events[0][1]["offset"] < 16 * MiB
    assert dev.new_backing == "unchanged"


async def test_error_report() -> None:
    dev = FakeDevice(8 * MiB, held=set(range(128)))
    dev.fail[40] = OSError(errno.EIO, "boom")
    events: list = []
    await make_job(dev, events).run()
    assert events[0] == ("BLOCK_JOB_ERROR", {"device": "drive0", "operation": "read", "action": "report"})
    name, data = events[1]
    assert name == "BLOCK_JOB_COMPLETED" and data["error"] == "Input/output error"
    assert data["offset"] < data["len"]
    assert dev.new_backing == "unchanged"


async def test_error_ignore_carries_on() -> None:
    dev = FakeDevice(8 * MiB, held=set(range(128)))
    dev.fail[40] = OSError(errno.EIO, "boom")
    events: list = []
    await make_job(dev, events, on_error="ignore").run()
    assert events[0][1]["action"] == "ignore"
    assert events[1][0] == "BLOCK_JOB_COMPLETED" and "error" in events[1][1]
    assert 127 in dev.top_has and dev.new_backing == "unchanged"


async def test_error_stop_pauses_then_resume_retries(autojump_clock: trio.abc.Clock) -> None:
    dev = FakeDevice(8 * MiB, held=set(range(128)))
    dev.fail[40] = OSError(errno.ENOSPC, "full")
    events: list = []
    job = make_job(dev, events, on_error="stop")
    async with trio.open_nursery() as n:
        n.start_soon(job.run)
        await trio.sleep(1)
        assert job.status == "paused" and job.io_status == "nospace"
        assert events == [("BLOCK_JOB_ERROR", {"device": "drive0", "operation": "write", "action": "stop"})]
        at = job.offset
        assert at <= 40 * CL
        job.resume()
        await job.done.wait()
    assert events[-1][0] == "BLOCK_JOB_COMPLETED" and "error" not in events[-1][1]
    assert dev.top_has == set(range(128)) and dev.new_backing is None


async def test_manager_errors_and_base() -> None:
    events: list = []
    async with trio.open_nursery() as n:
        mgr = JobManager(lambda a, b: events.append((a, b)), lambda fn: n.start_soon(fn))
        dev = FakeDevice(8 * MiB, held=set())
        with pytest.raises(QMPError) as ei:
            mgr.start_stream("d0", dev, base="nope", seed=True)
        assert ei.value.cls == "BaseNotFound"
        with pytest.raises(QMPError) as ei:
            mgr.start_stream("d0", dev, base="nope")
        assert ei.value == QMPError("GenericError", "Can't find 'nope' in the backing chain")
        with pytest.raises(QMPError) as ei:
            mgr.find("d0")
        assert ei.value.cls == "DeviceNotActive"
        assert find_base(dev.top, "base.qcow2") is dev.base
        assert find_base(dev.top, "mid.qcow2") is dev.mid
        dev.read_only = True
        with pytest.raises(QMPError) as ei:
            mgr.start_stream("d0", dev, seed=True)
        assert ei.value.cls == "NotSupported"
        with pytest.raises(QMPError) as ei:
            mgr.start_stream("d0", dev)
        assert ei.value == QMPError("GenericError", "Block node is read-only")
        dev.read_only = False
        dev.top.format_name = "raw"
        with pytest.raises(QMPError) as ei:
            mgr.start_stream("d0", dev, seed=True)
        assert ei.value.cls == "NotSupported"
        assert mgr.jobs() == [] and events == []
        with pytest.raises(JobError) as ji:
            StreamJob("x", dev, speed=-1)
        assert qmp_error(ji.value).cls == "GenericError"


async def test_zero_runs_copied_only_when_a_base_stays() -> None:
    dev = FakeDevice(4 * MiB, held=set())
    seen: list = []

    async def status(offset: int, length: int) -> tuple[int, int | None, Status]:
        return min(length, MiB), 1, Status.ZERO

    async def copy_up(offset: int, length: int, *, base: Any = None) -> int:
        seen.append((offset, length))
        return length

    dev.copy_up = copy_up  # type: ignore[method-assign]
    events: list = []
    await StreamJob("j", dev, emit=block_events(events), status_fn=status).run()
    assert seen == [] and [n for n, _ in events] == ["BLOCK_JOB_COMPLETED"]
    assert dev.new_backing is None
    await StreamJob("j", dev, base=dev.base, status_fn=status).run()
    assert sum(n for _, n in seen) == 4 * MiB and dev.new_backing is dev.base


@pytest.mark.parametrize("seed", range(12))
async def test_random_control_sequences(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """Random pause/resume/set-speed/cancel: one final event, offset never goes back and
    stays put while paused, and the outcome matches the event."""
    import random

    rng = random.Random(seed)
    held = {rng.randrange(256) for _ in range(120)}
    dev = FakeDevice(16 * MiB, held=held)
    events: list = []
    job = make_job(dev, events, speed=rng.choice([0, MiB, 4 * MiB]))
    async with trio.open_nursery() as n:
        n.start_soon(job.run)
        last = 0
        while not job.done.is_set():
            await trio.sleep(rng.uniform(0, 0.5))
            assert job.offset >= last
            last = job.offset
            if job.status == "paused":
                await trio.sleep(0.2)
                assert job.offset == last
            op = rng.choice(["pause", "resume", "speed", "speed", "cancel", "none", "none"])
            try:
                if op == "pause":
                    job.pause()
                elif op == "resume":
                    job.resume()
                elif op == "speed":
                    job.set_speed(rng.choice([0, 512 * 1024, 2 * MiB]))
                elif op == "cancel" and rng.random() < 0.3:
                    job.cancel()
            except JobError as e:
                assert qmp_error(e).cls == "GenericError"
            if job.paused and rng.random() < 0.5:
                job.resume()
    finals = [e for e in events if e[0] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")]
    assert len(finals) == 1 and events[-1] is finals[0]
    name, data = finals[0]
    if name == "BLOCK_JOB_COMPLETED":
        assert data["offset"] == data["len"] and dev.top_has >= held and dev.new_backing is None
    else:
        assert job.cancel_requested and dev.new_backing == "unchanged"
