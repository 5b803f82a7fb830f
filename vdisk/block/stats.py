"""Per-drive I/O counters: what query-blockstats and the metrics endpoint report.

A BlockDevice owns one IOStats and counts every request it completes for its users
(FUSE): reads, writes, zero writes, discards (zeroes with unmap) and flushes. Internal
traffic (copy-on-read's writes into the top, a stream job's copies) is not counted, as
QEMU counts only the requests of the device's users. A failed request is not counted.

The counting is on the FUSE hot path, so it is cheap: the caller reads the clock
before the request (`now()`) and calls one method after it, which does a few integer
adds on slotted attributes; nothing is allocated per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

now = time.monotonic_ns  # the clock every request is timed with

COUNTERS = (
    "rd_bytes", "wr_bytes", "unmap_bytes",
    "rd_operations", "wr_operations", "flush_operations", "unmap_operations",
    "rd_total_time_ns", "wr_total_time_ns", "flush_total_time_ns", "unmap_total_time_ns",
    "wr_highest_offset",
)


class IOStats:
    """Counters of one drive's completed user requests (QEMU's BlockDeviceStats)."""

    __slots__ = (*COUNTERS, "last_ns", "outside")

    def __init__(self) -> None:
        self.rd_bytes = self.wr_bytes = self.unmap_bytes = 0
        self.rd_operations = self.wr_operations = 0
        self.flush_operations = self.unmap_operations = 0
        self.rd_total_time_ns = self.wr_total_time_ns = 0
        self.flush_total_time_ns = self.unmap_total_time_ns = 0
        self.wr_highest_offset = 0  # the end of the highest write
        self.last_ns = 0  # when the last request ended here (0: none yet)
        # the counters of requests served outside the block layer (the FUSE fast path:
        # vdisk/fuse/fastpath.py), by the names in COUNTERS plus last_ns
        self.outside: Callable[[], dict[str, int]] | None = None

    def read(self, length: int, start_ns: int) -> None:
        """A read of `length` bytes that began at start_ns has ended."""
        end = now()
        self.rd_bytes += length
        self.rd_operations += 1
        self.rd_total_time_ns += end - start_ns
        self.last_ns = end

    def write(self, offset: int, length: int, start_ns: int) -> None:
        """A write (data or zeroes) of [offset, offset+length) has ended."""
        end = now()
        self.wr_bytes += length
        self.wr_operations += 1
        self.wr_total_time_ns += end - start_ns
        if offset + length > self.wr_highest_offset:
            self.wr_highest_offset = offset + length
        self.last_ns = end

    def unmap(self, length: int, start_ns: int) -> None:
        """A discard (zeroes with unmap: FUSE punch-hole) of `length` bytes has ended."""
        end = now()
        self.unmap_bytes += length
        self.unmap_operations += 1
        self.unmap_total_time_ns += end - start_ns
        self.last_ns = end

    def flush(self, start_ns: int) -> None:
        end = now()
        self.flush_operations += 1
        self.flush_total_time_ns += end - start_ns
        self.last_ns = end

    def counters(self) -> dict[str, int]:
        """Every counter by its QMP name, with the requests served outside added."""
        out = {name: getattr(self, name) for name in COUNTERS}
        if self.outside is not None:
            more = self.outside()
            for name in COUNTERS:
                if name == "wr_highest_offset":
                    out[name] = max(out[name], more.get(name, 0))
                else:
                    out[name] += more.get(name, 0)
        return out

    def last_request_ns(self) -> int:
        """When the last user request ended (0: none yet), wherever it was served."""
        if self.outside is None:
            return self.last_ns
        return max(self.last_ns, self.outside().get("last_ns", 0))

    def as_qmp(self) -> dict[str, Any]:
        """QEMU 7.2's BlockDeviceStats. Failed and invalid requests are not accounted
        (account_failed / account_invalid false, their counters 0); no request is
        merged; idle_time_ns is there once a request has ended, as in QEMU."""
        out: dict[str, Any] = self.counters()
        out.update({
            "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0,
            "failed_rd_operations": 0, "failed_wr_operations": 0,
            "failed_flush_operations": 0, "failed_unmap_operations": 0,
            "invalid_rd_operations": 0, "invalid_wr_operations": 0,
            "invalid_flush_operations": 0, "invalid_unmap_operations": 0,
            "account_invalid": False, "account_failed": False,
            "timed_stats": [],
        })
        last = self.last_request_ns()
        if last:
            out["idle_time_ns"] = now() - last
        return out


def empty_qmp() -> dict[str, Any]:
    """BlockDeviceStats of a node that counts nothing (the images below a drive's top,
    protocol nodes): as QEMU reports its nodes' own stats, all zero."""
    return IOStats().as_qmp()
