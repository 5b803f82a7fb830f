"""Where a drive's clusters lie, published for a request path that serves plain reads and
in-place writes without the block layer (the compiled FUSE fast path,
vdisk/fuse/fastpath.py). The block device keeps the table true:

- after one of its own requests, it publishes the clusters the request touched, from
  Image.fast_location, while the engine is idle (so the answer is current);
- before any call that may change where a cluster lies, it withdraws the clusters of
  the range (forget); before one that may free or reuse a cluster (zeroes, discard),
  and before chain changes, bitmap changes, close, or after any engine error, it also
  waits for requests still using an entry (fence, reset).

A reader serving from the table therefore reads what the engine would, and writes in
place only where the engine itself would write in place with nothing else to do.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from vdisk.engine.image import Image, Location

log = logging.getLogger("vdisk.device")

PUBLISH_MAX = 32  # clusters published after one request at most (a 1 MiB read: 16)


class ClusterTable(Protocol):
    """One drive's table, kept by the serving side (vdisk/fuse/fastpath.py)."""

    cluster_bits: int

    def known(self, cluster: int) -> bool:
        """True if the cluster has an entry."""

    def publish(self, cluster: int, loc: Location) -> None:
        """The whole cluster lies at loc (at loc.host for its first byte)."""

    def forget(self, first: int, count: int) -> None:
        """Withdraw the entries of clusters [first, first+count)."""

    def fence(self) -> None:
        """Return once no request uses an entry withdrawn before the call."""

    def try_fence(self) -> bool:
        """fence() if no request uses the table now (True), else False without waiting."""

    def reset(self) -> None:
        """Withdraw every entry and fence (the files the table named are let go)."""

    def counters(self) -> dict[str, int]:
        """The requests served from the table, by IOStats' counter names and last_ns."""


class TableKeeper:
    """The block device's side of one drive's ClusterTable."""

    def __init__(self, table: ClusterTable, size: int, *, copy_on_read: bool,
                 read_only: bool) -> None:
        self.table = table
        self.size = size
        self.bits = table.cluster_bits
        self.copy_on_read = copy_on_read  # then only the top's own clusters are published
        self.read_only = read_only

    def publish(self, top: Image, offset: int, length: int) -> None:
        """After a request on [offset, offset+length) ended, with the engine idle."""
        if length <= 0:
            return
        bits, table = self.bits, self.table
        first, last = offset >> bits, (offset + length - 1) >> bits
        if last - first >= PUBLISH_MAX:
            return
        try:
            for c in range(first, last + 1):
                if table.known(c):
                    continue
                start = c << bits
                loc = top.fast_location(start, min(1 << bits, self.size - start))
                if loc is None or (loc.depth and self.copy_on_read):
                    continue  # copy-on-read must see reads of the backing chain
                if loc.fd >= 0 and loc.host & 0xFFF:
                    continue  # the table holds 4 KiB aligned host offsets
                if loc.writable and self.read_only:
                    loc = loc._replace(writable=False)
                table.publish(c, loc)
        except Exception as e:  # noqa: BLE001 - e.g. corruption found: serve nothing
            log.debug("cluster table: %s", e)
            table.reset()

    def forget(self, offset: int, length: int) -> None:
        """Before a call that may change where [offset, offset+length) lies."""
        if length > 0:
            first = offset >> self.bits
            self.table.forget(first, ((offset + length - 1) >> self.bits) - first + 1)

    async def forget_fenced(self, offset: int, length: int) -> None:
        """forget, then wait for requests still using the withdrawn entries: before a
        call that may free or reuse clusters. A request in the table may be waiting for
        the disk, so that wait runs in a worker thread, not on the event loop."""
        self.forget(offset, length)
        if not self.table.try_fence():
            await trio.to_thread.run_sync(self.table.fence)

    def reset(self) -> None:
        """Withdraw everything and let the files go; waits for requests in the table on
        the calling thread (only the synchronous error paths call this)."""
        self.table.reset()

    async def reset_fenced(self) -> None:
        """reset, with the wait for requests in the table in a worker thread."""
        await self.forget_fenced(0, self.size)
        self.table.reset()  # nothing uses the table now: this does not wait


class NoTable:
    """The TableKeeper of a drive with no table: every call does nothing."""

    def publish(self, top: Image, offset: int, length: int) -> None:
        pass

    def forget(self, offset: int, length: int) -> None:
        pass

    async def forget_fenced(self, offset: int, length: int) -> None:
        pass

    def reset(self) -> None:
        pass

    async def reset_fenced(self) -> None:
        pass
