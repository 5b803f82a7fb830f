"""What `qemu-img info` adds for a qcow2 image beyond its header: the snapshot list
(JSON "snapshots", QAPI SnapshotInfo; human "Snapshot list:" as block/qapi.c
bdrv_snapshot_dump prints it) and the bitmaps under format-specific (Qcow2BitmapInfo).
"""

from __future__ import annotations

import time
from typing import Any

from vdisk.cli._common import size_to_str
from vdisk.engine.image import Image
from vdisk.engine.qcow2 import NO_ICOUNT, Qcow2Image, Snapshot, list_bitmaps, list_snapshots

_NS = 1_000_000_000
_FLAG_NAMES = ((1, "in-use"), (2, "auto"))  # BME_FLAG_IN_USE, BME_FLAG_AUTO, in QEMU's order


def _int64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _c_int(v: int) -> int:
    v &= 0xFFFF_FFFF
    return v - (1 << 32) if v >> 31 else v


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def snapshot_info(sn: Snapshot) -> dict[str, Any]:
    """One SnapshotInfo, members in schema order (icount only when recorded)."""
    d: dict[str, Any] = {
        "id": _text(sn.id), "name": _text(sn.name), "vm-state-size": _int64(sn.vm_state_size),
        "date-sec": sn.date_sec, "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec // _NS, "vm-clock-nsec": sn.vm_clock_nsec % _NS,
    }
    if sn.icount != NO_ICOUNT:
        d["icount"] = _int64(sn.icount)
    return d


def snapshots_of(img: Image) -> list[Snapshot]:
    """The internal snapshots of an open image (a raw image has none)."""
    return list_snapshots(img) if isinstance(img, Qcow2Image) else []


def add_extras(img: Image, info: dict[str, Any]) -> None:
    """Adds "snapshots" and the qcow2 "bitmaps" to info."""
    if not isinstance(img, Qcow2Image):
        return
    snaps = list_snapshots(img)
    if snaps:
        info["snapshots"] = [snapshot_info(sn) for sn in snaps]
    bitmaps = list_bitmaps(img)
    spec = info.get("format-specific")
    if bitmaps and isinstance(spec, dict) and isinstance(spec.get("data"), dict) \
            and spec["data"].get("compat") == "1.1":
        spec["data"]["bitmaps"] = [
            {"name": name, "granularity": 1 << gbits,
             "flags": [n for bit, n in _FLAG_NAMES if flags & bit]}
            for name, flags, gbits in bitmaps
        ]


def _row(sn: Snapshot) -> bytes:
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.date_sec))
    nsec = sn.vm_clock_nsec
    secs = nsec // _NS
    clock = (f"{_c_int(secs // 3600):02d}:{_c_int(secs // 60 % 60):02d}:"
             f"{_c_int(secs % 60):02d}.{_c_int(nsec // 1_000_000 % 1000):03d}")
    icount = str(_int64(sn.icount)) if sn.icount != NO_ICOUNT else ""
    return b"%-9s %-16s %8s%20s%13s%11s" % (
        sn.id, sn.name, size_to_str(sn.vm_state_size).encode(), date.encode(),
        clock.encode(), icount.encode())


def snapshot_table(snaps: list[Snapshot]) -> list[str]:
    """The "Snapshot list:" lines (widths in bytes, as C's printf counts them)."""
    head = b"%-10s%-17s%8s%20s%13s%11s" % (b"ID", b"TAG", b"VM SIZE", b"DATE", b"VM CLOCK",
                                             b"ICOUNT")
    return ["Snapshot list:"] + [r.decode("utf-8", "surrogateescape")
                                 for r in [head, *map(_row, snaps)]]
