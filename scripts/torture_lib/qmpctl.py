"""The random stream controller of a cycle, over a QMP session (tests.helpers.qmp)."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.qmp import QMP

logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())
logging.getLogger("qemu.qmp").propagate = False

# Errors a racing control sequence may legitimately get (the job ended meanwhile, it is
# already paused or being cancelled, ...). Anything else is a bug.
EXPECTED_ERRORS = {"DeviceNotActive", "DeviceInUse", "GenericError"}


@dataclass
class StreamStats:
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    commands: int = 0


class StreamControl:
    """Starts, throttles, pauses, resumes and cancels streams on drive d0 at random."""

    def __init__(self, qmp: QMP, rng: random.Random, chain: list[Path], stats: StreamStats
                 ) -> None:
        self.qmp = qmp
        self.rng = rng
        self.chain = list(chain)  # the live chain, top first
        self.stats = stats
        self.job_base: Path | None = None
        self.job_running = False
        self.paused = False
        self.failures: list[str] = []

    def _cmd(self, name: str, **args: Any) -> dict[str, Any]:
        self.stats.commands += 1
        r = self.qmp.cmd(name, **args)
        if "error" in r and r["error"].get("class") not in EXPECTED_ERRORS:
            self.failures.append(f"QMP {name} {args}: unexpected error {r['error']}")
        return r

    def _speed(self) -> int:
        return self.rng.choice([0, 0, 256 << 10, 1 << 20, 4 << 20, 16 << 20])

    def start(self, *, base: Path | None = None, speed: int | None = None) -> bool:
        """Start a stream (random base and speed unless given); True if it started."""
        if len(self.chain) < 2:
            return False
        if base is None and speed is None and len(self.chain) > 2 and self.rng.random() < 0.4:
            base = self.rng.choice(self.chain[2:])  # keep a base: a partial stream
        speed = self._speed() if speed is None else speed
        if base is None and speed == 0 and self.rng.random() < 0.3:
            r = self._cmd("block_stream", device="d0")  # the QEMU 1.1 spelling
        else:
            args: dict[str, Any] = {"device": "d0"}
            if speed:
                args["speed"] = speed
            if base is not None:
                args["base"] = str(base)
            r = self._cmd("block-stream", **args)
        if "return" in r:
            self.stats.started += 1
            self.job_running, self.job_base, self.paused = True, base, False
            return True
        return False

    def handle_events(self) -> None:
        for ev in list(self.qmp.events):
            name = ev["event"]
            if name == "BLOCK_JOB_COMPLETED":
                self.qmp.events.remove(ev)
                if "error" in ev["data"]:
                    self.failures.append(f"stream failed: {ev['data']}")
                else:
                    self.stats.completed += 1
                    self._switched()
                self.job_running = False
            elif name == "BLOCK_JOB_CANCELLED":
                self.qmp.events.remove(ev)
                self.stats.cancelled += 1
                self.job_running = False
            else:
                self.qmp.events.remove(ev)

    def _switched(self) -> None:
        base = self.job_base
        if base is None:
            self.chain = self.chain[:1]
        else:
            self.chain = self.chain[:1] + self.chain[self.chain.index(base):]

    def step(self) -> None:
        """One random control action."""
        self.qmp.poll_events()
        self.handle_events()
        r = self.rng.random()
        if not self.job_running:
            if r < 0.6:
                self.start()
            elif r < 0.7:
                self._cmd("query-block-jobs")
            return
        if r < 0.3:
            if self.rng.random() < 0.5:
                self._cmd("block-job-set-speed", device="d0", speed=self._speed())
            else:
                self._cmd("block_job_set_speed", device="d0", value=self._speed())
        elif r < 0.5:
            if self.paused:
                self._cmd("block-job-resume", device="d0")
            else:
                self._cmd("block-job-pause", device="d0")
            self.paused = not self.paused
        elif r < 0.62:
            name = self.rng.choice(["block-job-cancel", "block_job_cancel"])
            self._cmd(name, device="d0")
        else:
            jobs = self._cmd("query-block-jobs").get("return", [])
            if jobs:
                self.paused = bool(jobs[0].get("paused"))

    def run_to_end(self, timeout: float, *, whole: bool = False) -> bool:
        """Cancel any job, then stream at full speed to completion: to a random base, or
        (whole) the whole chain into the top."""
        self.qmp.poll_events()
        self.handle_events()
        if self.job_running:
            self._cmd("block-job-cancel", device="d0")
            ev = self.qmp.next_event("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED", timeout=60)
            if ev is None:
                self.failures.append("a cancelled job sent no final event within 60 s")
                return False
            self.qmp.events.insert(0, ev)
            self.handle_events()
        base = None
        if not whole and len(self.chain) > 2 and self.rng.random() < 0.5:
            base = self.rng.choice(self.chain[2:])
        if not self.start(base=base, speed=0):
            self.failures.append("block-stream to the end did not start")
            return False
        if self.rng.random() < 0.5:  # a pause/resume on the way
            time.sleep(self.rng.uniform(0, 0.3))
            self._cmd("block-job-pause", device="d0")
            time.sleep(self.rng.uniform(0, 0.3))
            self._cmd("block-job-resume", device="d0")
        ev = self.qmp.next_event("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", timeout=timeout)
        if ev is None:
            self.failures.append(f"the stream did not complete within {timeout:.0f} s")
            return False
        self.qmp.events.insert(0, ev)
        self.handle_events()
        if ev["event"] != "BLOCK_JOB_COMPLETED":
            self.failures.append(f"the stream to the end was cancelled: {ev}")
            return False
        return "error" not in ev["data"]
