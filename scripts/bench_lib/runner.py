"""The measurements: each runs on both sides, each side on a fresh copy of the chain."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_lib.chain import TOP_FRACTION, Chain, copy_chain, sparse_chain
from bench_lib.fio import Job, run_fio
from bench_lib.profile import sampled
from bench_lib.remote import run_remote
from bench_lib.sides import SIDES, Side
from tests.helpers.commands import qemu_img, run
from tests.helpers.qmp import QMP

FINAL = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")

MiB = 1 << 20
TIB = 1 << 40

MAIN_JOBS = [  # order matters (writes allocate in the top) and is the same on both sides
    Job("seq_read_1m", "read", "1M"),
    Job("randread_4k_j1", "randread", "4k"),
    Job("randread_4k_j4", "randread", "4k", numjobs=4),
    Job("randwrite_4k_j1", "randwrite", "4k"),
    Job("randwrite_4k_j4", "randwrite", "4k", numjobs=4),
    Job("seq_write_1m", "write", "1M"),
]
PROFILED = {"randread_4k_j4", "randwrite_4k_j4"}


@dataclass
class Settings:
    work: Path
    runtime: float
    ramp: float
    sparse_size: int = 2 * TIB
    profile: Path | None = None
    log: Path | None = None


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

    def main_io(self, name: str) -> None:
        """Throughput, IOPS and latency (copy-on-read off), and the idle RSS."""
        r = self.results[name]
        chain = self.fresh(name, "io")
        with SIDES[name](chain, chain.dir) as side:
            mem = side.memory()
            r["rss_idle_mib"] = mem["VmRSS"] / MiB
            for job in MAIN_JOBS:
                self.say(f"{name}: fio {job.name}")
                prof = self.s.profile if job.name in PROFILED and name == "vdisk" else None
                with sampled(side.pid, prof, job.name):
                    out = self.fio(side, job)
                d = out["read"] if "read" in job.rw else out["write"]
                if job.bs == "1M":
                    r[f"{job.name}_mbps"] = d["bw"] / MiB
                else:
                    r[f"{job.name}_iops"] = d["iops"]
                if job.name == "randread_4k_j1":
                    r["randread_4k_p50_us"] = d["p50_ns"] / 1000
                    r["randread_4k_p99_us"] = d["p99_ns"] / 1000

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
        steps = (self.main_io, self.cor_read, self.stream, self.stream_latency, self.sparse)
        for step in steps if local else ():
            for name in SIDES:
                step(name)
                self.drop_copies()
        if local:
            ref["qemu_img_rebase_s"] = self.rebase()
            self.drop_copies()
        if remote:
            for name, figs in run_remote(self.s.work / "remote", self.say, self.s.log,
                                         remote_size).items():
                self.results[name].update(figs)
            self.drop_copies()
        return ref

    def drop_copies(self) -> None:
        """Remove the chain copies of finished steps (their servers are stopped)."""
        for d in self.s.work.iterdir():
            keep = d == self.chain.dir or d == self.s.profile or d.name.startswith("vdisk-")
            if d.is_dir() and not keep:
                shutil.rmtree(d, ignore_errors=True)
