"""The parent's model of one cycle: what each worker did, and what the image may hold.

Each worker's log says which ops it issued (in order), which returned, and up to which op
an fsync returned. A sector touched in the cycle may hold any of its versions from the
durable one on (the last version made by an op covered by a returned fsync, or, after a
clean stop, by any returned op): an unflushed write may be old or new, but each sector
must be exactly one of its versions, never a mix. Untouched sectors hold the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torture_lib.worker import SECTOR, gen_data


@dataclass
class WorkerLog:
    index: int
    ops: list[tuple[int, str, int, int, int]] = field(default_factory=list)  # seq kind off len dseed
    acked: int = 0
    fsynced: int = 0
    read_mismatches: list[str] = field(default_factory=list)
    error: tuple[int, int | None, float, str] | None = None  # seq errno t text
    stats: dict[str, Any] = field(default_factory=dict)
    garbage: list[str] = field(default_factory=list)

    def feed(self, msg: list[Any]) -> None:
        kind = msg[0]
        if kind == "W":
            self.ops.append((msg[1], "W", msg[2], msg[3], msg[4]))
        elif kind == "Z":
            self.ops.append((msg[1], "Z", msg[2], msg[3], 0))
        elif kind == "A":
            self.acked = max(self.acked, msg[1])
        elif kind == "F":
            self.fsynced = max(self.fsynced, msg[1])
        elif kind == "M":
            self.read_mismatches.append(msg[3])
        elif kind == "E":
            self.error = (msg[1], msg[2], msg[3], msg[4])
        elif kind == "S":
            self.stats = msg[1]
        else:
            self.garbage.append(repr(msg))

    def bytes_acked(self) -> int:
        return sum(length for seq, kind, _, length, _ in self.ops if kind == "W" and seq <= self.acked)


@dataclass
class Mismatch:
    offset: int
    worker: int | None
    text: str


def sector_versions(ref: bytes, logs: list[WorkerLog]) -> dict[int, list[tuple[int, int, bytes]]]:
    """sector -> [(worker, seq, content)], oldest first; seq 0 is the reference."""
    versions: dict[int, list[tuple[int, int, bytes]]] = {}
    for log in logs:
        for seq, kind, off, length, dseed in log.ops:
            data = gen_data(dseed, length) if kind == "W" else bytes(length)
            end = off + length
            for s in range(off // SECTOR, (end - 1) // SECTOR + 1):
                vs = versions.get(s)
                if vs is None:
                    vs = versions[s] = [(log.index, 0, ref[s * SECTOR : (s + 1) * SECTOR])]
                cur = bytearray(vs[-1][2])
                lo = max(off, s * SECTOR)
                hi = min(end, (s + 1) * SECTOR)
                cur[lo - s * SECTOR : hi - s * SECTOR] = data[lo - off : hi - off]
                vs.append((log.index, seq, bytes(cur)))
    return versions


def check_view(ref: bytes, view: bytes, logs: list[WorkerLog], *, clean: bool,
               limit: int = 20) -> tuple[list[Mismatch], int]:
    """Mismatches of view against the model (at most limit), and bytes verified."""
    out: list[Mismatch] = []
    if len(view) != len(ref):
        return [Mismatch(0, None, f"view is {len(view)} bytes, expected {len(ref)}")], 0
    durable = {log.index: (log.acked if clean else log.fsynced) for log in logs}
    versions = sector_versions(ref, logs)
    touched = sorted(versions)
    # untouched sectors: compare in runs between touched ones
    prev = 0
    for s in [*touched, len(ref) // SECTOR]:
        a, b = prev * SECTOR, s * SECTOR
        if view[a:b] != ref[a:b]:
            for t in range(prev, s):
                lo, hi = t * SECTOR, (t + 1) * SECTOR
                if view[lo:hi] != ref[lo:hi] and len(out) < limit:
                    at = lo + next(i for i in range(SECTOR) if view[lo + i] != ref[lo + i])
                    out.append(Mismatch(lo, None, f"sector at {lo} changed but no worker wrote it "
                                                  f"(first at {at}: got {view[at:at + 8].hex()}, "
                                                  f"want {ref[at:at + 8].hex()})"))
        prev = s + 1
    for s in touched:
        vs = versions[s]
        worker = vs[0][0]
        floor = max(i for i, (_, seq, _) in enumerate(vs) if seq <= durable[worker])
        got = view[s * SECTOR : (s + 1) * SECTOR]
        allowed = {v for _, _, v in vs[floor:]}
        if got in allowed:
            continue
        if len(out) >= limit:
            continue
        older = [seq for _, seq, v in vs[:floor] if v == got]
        if older:
            why = (f"a durable write was lost: holds the version of op {older[-1]}, "
                   f"durable is op {vs[floor][1]} (fsync/ack mark {durable[worker]})")
        else:
            why = f"matches none of its {len(vs)} versions (torn or garbage)"
        out.append(Mismatch(s * SECTOR, worker, f"sector at {s * SECTOR} (worker {worker}): {why}; "
                                                f"got {got[:16].hex()}"))
    return out, len(ref)
