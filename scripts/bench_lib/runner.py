"""The measurements: each runs on both sides, each side on a fresh copy of the chain."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_lib.chain import TOP_FRACTION, Chain, copy_chain, sparse_chain
from bench_lib.fio import Job, run_fio
from bench_lib.floor import floor_step
from bench_lib.guest import GuestImage, prepare, run_guest
from bench_lib.paths import PATHS, AccessPath, drop_cache, figure_key, loop_device
from bench_lib.profile import sampled
from bench_lib.remote import run_remote
from bench_lib.sides import SIDES, Side
from tests.helpers.commands import qemu_img, run
from tests.helpers.qmp import QMP

FINAL = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")

MiB = 1 << 20
TIB = 1 << 40

PROFILED = {"randread_4k_j4", "randwrite_4k_j4"}


@dataclass
class Settings:
    work: Path
    runtime: float
    ramp: float
    sparse_size: int = 2 * TIB
    profile: Path | None = None
    log: Path | None = None
    paths: tuple[AccessPath, ...] = tuple(PATHS.values())
    guest_cache: Path | None = None  # where the VM guest's kernel and initramfs are kept


def warm(chain: Chain) -> None:
    """Read both images once so that every side starts with them in the host page cache."""
    for p in (chain.base, chain.top):
        with open(p, "rb") as f:
            while f.read(8 * MiB):
                pass


class StreamFailed(RuntimeError):
    pass


def start_stream(side: Side, client: QMP, speed: int = 0) -> None:
    args: dict[str, Any] = {"device": side.device, "job-id": "job0"}
    if side.name == "vdisk":
        args.pop("job-id")
    if speed:
        args["speed"] = speed
    client.ok("block-stream", **args)


def wait_stream(client: QMP, timeout: float) -> dict[str, Any]:
    """Wait for the job's final event; its data."""
    ev = client.next_event(*FINAL, timeout=timeout)
    if ev is None:
        raise StreamFailed("stream did not finish in time")
    data: dict[str, Any] = ev.get("data", {})
    if ev["event"] == "BLOCK_JOB_CANCELLED" or data.get("error"):
        raise StreamFailed(f"stream ended with {ev['event']} {data}")
    return data


def wait_final(client: QMP, timeout: float) -> None:
    """Wait for any final job event (after a cancel)."""
    client.next_event(*FINAL, timeout=timeout)


class Bench:
    def __init__(self, chain: Chain, settings: Settings) -> None:
        self.chain = chain
        self.s = settings
        self.results: dict[str, dict[str, Any]] = {name: {} for name in SIDES}
        self.notes: list[str] = []
        self.guest: GuestImage | None = None
        self.timings: dict[str, float] = {}  # seconds each step took, both sides

    def fresh(self, side_name: str, what: str) -> Chain:
        copy = copy_chain(self.chain, self.s.work / f"{what}-{side_name}")
        warm(copy)
        return copy

    def fio(self, side: Side, job: Job, **kw: Any) -> dict[str, Any]:
        kw.setdefault("runtime", self.s.runtime)
        kw.setdefault("ramp", self.s.ramp)
        return run_fio(side.file, job, log=self.s.log, **kw)

    def say(self, text: str) -> None:
        print(f"bench: {text}", flush=True)

    # -- measurements -------------------------------------------------------------

    def path_io(self, name: str, path: AccessPath) -> None:
        """The jobs of one access path on a fresh copy; first, the idle RSS."""
        r = self.results[name]
        chain = self.fresh(name, f"io-{path.name}")
        with SIDES[name](chain, chain.dir) as side:
            if "rss_idle_mib" not in r:
                r["rss_idle_mib"] = side.memory()["VmRSS"] / MiB
            if path.guest:
                self.guest_io(side, path)
                return
            with ExitStack() as stack:
                target = side.file
                if path.loop is not None:
                    target = stack.enter_context(loop_device(side.file, path.loop == "direct"))
                for job in path.jobs:
                    self.say(f"{name}: {path.name}: fio {job.name}")
                    drop_cache(side.file)
                    profiled = job.name in PROFILED and name == "vdisk" and not path.prefix
                    with sampled(side.pid, self.s.profile if profiled else None, job.name):
                        out = run_fio(target, job, runtime=self.s.runtime, ramp=self.s.ramp,
                                      direct=path.fio_direct, end_fsync=path.end_fsync,
                                      log=self.s.log)
                    self.record(r, path, job, out)

    def record(self, r: dict[str, Any], path: AccessPath, job: Job, out: dict[str, Any]) -> None:
        d = out["read"] if "read" in job.rw else out["write"]
        r[figure_key(path, job)] = d["bw"] / MiB if job.bs == "1M" else d["iops"]
        if not path.prefix and job.name == "randread_4k_j1":
            r["randread_4k_p50_us"] = d["p50_ns"] / 1000
            r["randread_4k_p99_us"] = d["p99_ns"] / 1000

    def guest_io(self, side: Side, path: AccessPath) -> None:
        """The guest jobs inside a TCG VM whose virtio disk is the served file."""
        if self.guest is None:
            self.guest = prepare(self.s.guest_cache or self.s.work / "guest-cache", self.say)
            self.notes.append(f"guest: qemu-system-x86_64 -accel tcg, -drive ...,cache=none,"
                              f"aio={self.guest.aio}, kernel {self.guest.kernel.name}")
        self.say(f"{side.name}: {path.name}: booting a TCG guest, fio "
                 f"{', '.join(j.name for j in path.jobs)} on its virtio disk")
        t0 = time.monotonic()
        outs = run_guest(self.guest, side.file, path.jobs, runtime=self.s.runtime,
                         ramp=self.s.ramp, work=side.work / "guest", log=self.s.log)
        self.results[side.name]["guest_run_s"] = time.monotonic() - t0
        for job in path.jobs:
            self.record(self.results[side.name], path, job, outs[job.name])

    def cor_read(self, name: str) -> None:
        """First touch of backing data with copy-on-read on: one sequential 1 MiB pass."""
        chain = self.fresh(name, "cor")
        with SIDES[name](chain, chain.dir, copy_on_read=True) as side:
            self.say(f"{name}: copy-on-read first-touch read")
            out = self.fio(side, Job("cor_first_read_1m", "read", "1M", timed=False))
            self.results[name]["cor_first_read_mbps"] = out["read"]["bw"] / MiB
        self.check_same_view(chain, "copy-on-read")

    def stream(self, name: str) -> None:
        """Unthrottled stream of the whole chain; RSS after it; result checked."""
        r = self.results[name]
        chain = self.fresh(name, "stream")
        with SIDES[name](chain, chain.dir, streamable=True) as side:
            client = side.qmp()
            try:
                self.say(f"{name}: stream (unthrottled)")
                prof = self.s.profile if name == "vdisk" else None
                with sampled(side.pid, prof, "stream"):
                    t0 = time.monotonic()
                    start_stream(side, client)
                    wait_stream(client, timeout=600 + self.chain.size / MiB)
                    r["stream_s"] = time.monotonic() - t0
            finally:
                client.close()
            time.sleep(0.5)
            mem = side.memory()
            r["rss_after_stream_mib"] = mem["VmRSS"] / MiB
            r["hwm_after_stream_mib"] = mem["VmHWM"] / MiB
        info = qemu_img("info", "--output=json", chain.top)
        if '"backing-filename"' in info:
            raise StreamFailed(f"{name}: the top still has a backing file after the stream")
        self.check_same_view(chain, "stream")

    def check_same_view(self, chain: Chain, what: str) -> None:
        res = run("qemu-img", "compare", "-q", chain.top, self.chain.expected, check=False,
                  timeout=None)
        if res.returncode != 0:
            raise RuntimeError(f"{chain.dir}: guest view changed after {what}: {res.stderr}")

    def stream_latency(self, name: str) -> None:
        """4 KiB random read p99, idle and then while a throttled stream runs."""
        r = self.results[name]
        chain = self.fresh(name, "lat")
        job = Job("randread_4k_lat", "randread", "4k")
        with SIDES[name](chain, chain.dir, streamable=True) as side:
            self.say(f"{name}: read latency, idle then during a stream")
            idle = self.fio(side, job)["read"]
            client = side.qmp()
            try:
                # throttled so that the copy (the part the top lacks) takes ~4 fio runs
                lacking = self.chain.size * (1 - TOP_FRACTION)
                speed = max(int(lacking / (4 * (self.s.runtime + self.s.ramp))), 1 << 16)
                start_stream(side, client, speed)
                busy = self.fio(side, job)["read"]
                jobs = client.ok("query-block-jobs")
                running = bool(jobs)
                if running:
                    r["stream_progress_during_fio"] = jobs[0]["offset"] / max(jobs[0]["len"], 1)
                    client.ok("block-job-cancel", device="job0" if side.name == "qsd" else "d0")
                    wait_final(client, 60)
            finally:
                client.close()
        r["idle_p99_us"] = idle["p99_ns"] / 1000
        r["stream_p99_us"] = busy["p99_ns"] / 1000
        r["stream_p99_over_idle"] = busy["p99_ns"] / max(idle["p99_ns"], 1)
        r["stream_running_throughout"] = running
        if not running:
            self.notes.append(f"{name}: the throttled stream ended before the fio run did")

    def sparse(self, name: str) -> None:
        """RSS serving a 2 TiB sparse chain after random 4 KiB reads and writes all over it."""
        r = self.results[name]
        chain = sparse_chain(self.s.work / f"sparse-{name}", self.s.sparse_size)
        with SIDES[name](chain, chain.dir) as side:
            self.say(f"{name}: {self.s.sparse_size / TIB:g} TiB sparse disk")
            self.fio(side, Job("sparse_randrw_4k", "randrw", "4k"))
            time.sleep(0.5)
            mem = side.memory()
            r["rss_sparse_mib"] = mem["VmRSS"] / MiB
            r["hwm_sparse_mib"] = mem["VmHWM"] / MiB

    def rebase(self) -> float:
        """qemu-img rebase -b '' (a real offline flatten) of a fresh copy: seconds."""
        chain = self.fresh("qemu-img", "rebase")
        self.say("qemu-img rebase -b ''")
        t0 = time.monotonic()
        qemu_img("rebase", "-b", "", chain.top, timeout=None)
        took = time.monotonic() - t0
        self.check_same_view(chain, "rebase")
        return took

    def run_all(self, remote: bool = True, remote_size: int = 256 * MiB, local: bool = True
                ) -> dict[str, Any]:
        ref: dict[str, Any] = {}
        for path in self.s.paths if local else ():
            with self.timed(path.name):
                for name in SIDES:
                    self.path_io(name, path)
                    self.drop_copies()
        steps = (self.cor_read, self.stream, self.stream_latency, self.sparse)
        for step in steps if local else ():
            with self.timed(step.__name__):
                for name in SIDES:
                    step(name)
                    self.drop_copies()
        if local:
            ref["qemu_img_rebase_s"] = self.rebase()
            self.drop_copies()
            with self.timed("floor"):
                ref["request_floor"] = floor_step(self)
            self.drop_copies()
        if remote:
            with self.timed("remote"):
                for name, figs in run_remote(self.s.work / "remote", self.say, self.s.log,
                                             remote_size).items():
                    self.results[name].update(figs)
                self.drop_copies()
        return ref

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        self.timings[step] = round(time.monotonic() - t0, 1)

    def drop_copies(self) -> None:
        """Remove the chain copies of finished steps (their servers are stopped)."""
        for d in self.s.work.iterdir():
            keep = (d in (self.chain.dir, self.s.profile, self.s.guest_cache)
                    or d.name.startswith("vdisk-") or d.name == "guest-cache")
            if d.is_dir() and not keep:
                shutil.rmtree(d, ignore_errors=True)
