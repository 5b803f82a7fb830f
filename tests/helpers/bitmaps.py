"""Reading a persistent dirty bitmap back with QEMU's own tools: qemu-nbd exports the
image read-only with the bitmap (-B), and qemu-img map over NBD with x-dirty-bitmap
reports the dirty ranges as "data": false."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from tests.helpers.commands import qemu_img

Ranges = list[tuple[int, int]]


def read_bitmap(image: Path, name: str, sock_dir: Path) -> Ranges:
    """The dirty (offset, length) ranges of bitmap `name` in a qcow2 image, merged."""
    sock = sock_dir / f"nbd-{os.getpid()}-{time.monotonic_ns()}.sock"
    proc = subprocess.Popen(
        ["qemu-nbd", "-r", "-f", "qcow2", "-B", name, "-k", str(sock), str(image)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None:
                raise AssertionError(f"qemu-nbd -B {name} failed: {proc.stderr.read()}")
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        out = qemu_img("map", "--output=json", "--image-opts",
                       f"driver=nbd,server.type=unix,server.path={sock},"
                       f"x-dirty-bitmap=qemu:dirty-bitmap:{name}")
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    ranges: Ranges = []
    for e in json.loads(out):
        if e["data"]:
            continue
        if ranges and ranges[-1][0] + ranges[-1][1] == e["start"]:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + e["length"])
        else:
            ranges.append((e["start"], e["length"]))
    return ranges


def expected(writes: Ranges, granularity: int, size: int) -> Ranges:
    """The written ranges at bitmap granularity: whole granules, merged, within size."""
    granules = sorted({g for off, n in writes if n > 0
                       for g in range(off // granularity, (off + n - 1) // granularity + 1)})
    out: Ranges = []
    for g in granules:
        a, b = g * granularity, min((g + 1) * granularity, size)
        if out and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], out[-1][1] + b - a)
        else:
            out.append((a, b - a))
    return out


def bitmap_flags(image: Path) -> dict[str, list[str]]:
    """qemu-img info's view of the image's bitmaps: name -> flags."""
    info = json.loads(qemu_img("info", "-U", "--output=json", image))
    data = info.get("format-specific", {}).get("data", {})
    return {b["name"]: b["flags"] for b in data.get("bitmaps", [])}
