"""fio runs (psync; O_DIRECT or buffered) and the figures taken from its JSON output."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Job:
    name: str
    rw: str  # read, write, randread, randwrite, randrw
    bs: str
    numjobs: int = 1
    timed: bool = True  # time_based for the runtime; else one pass over the file


def fio_args(job: Job, file: Path | str, *, runtime: float, ramp: float, direct: bool = True,
             end_fsync: bool = False, size: int | None = None) -> list[str]:
    """The fio command line of job on file (the host's and the VM guest's)."""
    cmd = ["fio", f"--name={job.name}", f"--filename={file}", "--ioengine=psync",
           f"--direct={int(direct)}", "--fallocate=none", "--invalidate=1", f"--rw={job.rw}",
           f"--bs={job.bs}", f"--numjobs={job.numjobs}", "--group_reporting",
           "--output-format=json", "--percentile_list=50:99"]
    if end_fsync and "write" in job.rw:
        cmd.append("--end_fsync=1")  # the data is at the server when the time stops
    if size is not None:
        cmd.append(f"--size={size}")
    if job.timed:
        cmd += ["--time_based", f"--runtime={int(runtime * 1000)}ms",
                f"--ramp_time={int(ramp * 1000)}ms"]
    return cmd


def run_fio(file: Path, job: Job, *, runtime: float, ramp: float, size: int | None = None,
            direct: bool = True, end_fsync: bool = False, log: Path | None = None
            ) -> dict[str, Any]:
    """Run one fio job against file; its figures (bw in B/s, iops, latencies in ns)."""
    cmd = fio_args(job, file, runtime=runtime, ramp=ramp, direct=direct, end_fsync=end_fsync,
                   size=size)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{res.stdout}\n{res.stderr}\n")
    if res.returncode != 0:
        raise RuntimeError(f"fio {job.name} on {file} failed: {res.stderr.strip()[-1000:]}")
    return parse_fio(res.stdout, f"fio {job.name} on {file}")


def parse_fio(stdout: str, what: str) -> dict[str, Any]:
    """The figures of fio's JSON output (fio may print notes before it)."""
    try:
        data = json.loads(stdout[stdout.index("{"):])
    except ValueError as e:
        raise RuntimeError(f"{what}: no JSON in fio's output ({e}): {stdout[-500:]}") from e
    j = data["jobs"][0]
    if j.get("error"):
        raise RuntimeError(f"{what}: error {j['error']}")
    out: dict[str, Any] = {"elapsed_s": j.get("job_runtime", 0) / 1000.0}
    for kind in ("read", "write"):
        d = j[kind]
        if d["total_ios"] == 0:
            continue
        pct = d["clat_ns"].get("percentile", {})
        out[kind] = {
            "bw": float(d["bw_bytes"]),
            "iops": float(d["iops"]),
            "p50_ns": float(pct.get("50.000000", 0)),
            "p99_ns": float(pct.get("99.000000", 0)),
            "mean_ns": float(d["clat_ns"]["mean"]),
        }
    return out
