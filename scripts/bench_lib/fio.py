"""fio runs (psync, O_DIRECT on both sides) and the figures taken from its JSON output."""

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


def run_fio(file: Path, job: Job, *, runtime: float, ramp: float, size: int | None = None,
            log: Path | None = None) -> dict[str, Any]:
    """Run one fio job against file; its figures (bw in B/s, iops, latencies in ns)."""
    cmd = ["fio", f"--name={job.name}", f"--filename={file}", "--ioengine=psync",
           "--direct=1", "--fallocate=none", "--invalidate=1", f"--rw={job.rw}",
           f"--bs={job.bs}", f"--numjobs={job.numjobs}", "--group_reporting",
           "--output-format=json", "--percentile_list=50:99"]
    if size is not None:
        cmd.append(f"--size={size}")
    if job.timed:
        cmd += ["--time_based", f"--runtime={int(runtime * 1000)}ms",
                f"--ramp_time={int(ramp * 1000)}ms"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{res.stdout}\n{res.stderr}\n")
    if res.returncode != 0:
        raise RuntimeError(f"fio {job.name} on {file} failed: {res.stderr.strip()[-1000:]}")
    text = res.stdout[res.stdout.index("{"):]  # fio may print notes before the JSON
    data = json.loads(text)
    j = data["jobs"][0]
    if j.get("error"):
        raise RuntimeError(f"fio {job.name} on {file}: error {j['error']}")
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
