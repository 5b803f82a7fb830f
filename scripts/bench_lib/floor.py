"""The per-request floor (issue 14): 4 KiB random reads and writes, one job, O_DIRECT, on
vdisk, on qsd and on a bare pyfuse3 + trio passthrough of the same guest view
(passthrough_fs.py), with each server's CPU time per request. What vdisk spends above
the passthrough is its own (device, engine); what the passthrough spends above qsd is the
price of pyfuse3 and trio.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_lib.chain import Chain
from bench_lib.fio import Job, run_fio
from tests.helpers import ROOT
from tests.helpers.polling import wait_until
from vdisk.service.mounts import force_unmount, is_mounted

JOBS = (Job("randread_4k_j1", "randread", "4k"), Job("randwrite_4k_j1", "randwrite", "4k"))
SERVERS = ("vdisk", "qsd", "passthrough")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of pid so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks


def measure(pid: int, file: Path, job: Job, runtime: float, ramp: float,
            log: Path | None) -> dict[str, float]:
    """IOPS of job on file, and pid's CPU microseconds per request (its CPU time over the
    whole fio run, ramp included, over the requests done in it: iops * (run + ramp))."""
    c0 = cpu_seconds(pid)
    out = run_fio(file, job, runtime=runtime, ramp=ramp, log=log)
    cpu = cpu_seconds(pid) - c0
    d = out["read"] if "read" in job.rw else out["write"]
    requests = d["iops"] * (out["elapsed_s"] + ramp)
    return {"iops": d["iops"], "cpu_us_per_request": 1e6 * cpu / max(requests, 1.0)}


@contextmanager
def passthrough(raw: Path, mount: Path) -> Iterator[tuple[int, Path]]:
    """passthrough_fs.py serving raw at mount: (pid, served file); stopped and unmounted
    on exit."""
    mount.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).with_name("passthrough_fs.py")
    proc = subprocess.Popen([sys.executable, str(script), str(raw), str(mount)], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    try:
        wait_until(lambda: is_mounted(mount) or proc.poll() is not None, timeout=30)
        if proc.poll() is not None:
            raise RuntimeError(f"the pyfuse3 passthrough exited with {proc.returncode}")
        yield proc.pid, mount / "d0"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # KeyboardInterrupt: pyfuse3.close() unmounts
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        force_unmount(mount)


def table(floor: dict[str, dict[str, dict[str, float]]]) -> str:
    rows = ["| per-request floor, 1 job, O_DIRECT | " + " | ".join(SERVERS) + " |",
            "|---|" + "---:|" * len(SERVERS)]
    for job in JOBS:
        for key, unit in (("iops", "IOPS"), ("cpu_us_per_request", "server CPU us/request")):
            vals = [floor.get(s, {}).get(job.name, {}).get(key) for s in SERVERS]
            rows.append(f"| {job.name} {unit} | " + " | ".join(
                "-" if v is None else f"{v:.1f}" if v < 1000 else f"{v:.0f}" for v in vals) + " |")
    return "\n".join(rows)


def raw_copy(chain: Chain, dst: Path) -> Path:
    """A raw copy of the chain's guest view (the passthrough's file)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(chain.expected, dst)
    return dst


def floor_step(bench: Any) -> dict[str, dict[str, dict[str, float]]]:
    """Every server of SERVERS on a fresh copy: results[server][job] (see measure)."""
    from bench_lib.sides import SIDES

    s = bench.s
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in SERVERS:
        bench.say(f"{name}: per-request floor")
        if name == "passthrough":
            raw = raw_copy(bench.chain, s.work / "floor-passthrough" / "disk.raw")
            with passthrough(raw, s.work / "floor-passthrough" / "mnt") as (pid, file):
                out[name] = {j.name: measure(pid, file, j, s.runtime, s.ramp, s.log)
                             for j in JOBS}
            continue
        chain = bench.fresh(name, "floor")
        with SIDES[name](chain, chain.dir) as side:
            out[name] = {j.name: measure(side.pid, side.file, j, s.runtime, s.ramp, s.log)
                         for j in JOBS}
    return out
