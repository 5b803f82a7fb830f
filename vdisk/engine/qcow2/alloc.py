"""Cluster allocation from a reserve, and deferred frees (QEMU: qcow2-refcount.c).

New clusters come from a reserve: a run whose refcounts were set to 1 and written (not
yet synced; the batch doubles up to ~8 MiB), so most allocations touch no metadata. An
L2 entry naming a reserved cluster is written back only after a barrier, which syncs
those refcounts first. Clusters that lose their last reference (COW of shared or
compressed clusters, discards, a copied L2 table) are only queued; applying the queue
writes the dirty L2 tables back, syncs (the entries that dropped them are on disk
first), then lowers their refcounts. A crash leaks the unused reserve and the queue at
worst; close() returns the reserve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from vdisk.engine.qcow2.fileio import ImageFile
from vdisk.engine.qcow2.layout import COMPRESSED, OFFSET_MASK, compressed_clusters
from vdisk.engine.qcow2.refcount import Refcounts

MAX_PENDING_FREES = 4096  # queued frees applied at once (a write-back and a sync)


class ClusterRun(NamedTuple):
    """A run of host clusters, by cluster index."""

    start: int
    clusters: int


class Allocator:
    """The reserve and the free queue of one writable image.

    guard(first, count) refuses clusters that hold metadata; write_back() writes the
    dirty L2 tables; on_freed() runs after queued frees were applied.
    """

    def __init__(self, f: ImageFile, rc: Refcounts, cluster_bits: int,
                 guard: Callable[[int, int], None], write_back: Callable[[], None],
                 on_freed: Callable[[], None]) -> None:
        self.f = f
        self.rc = rc
        self.cluster_bits = cluster_bits
        self.reserve = ClusterRun(0, 0)  # refcount 1 written, not referenced yet
        self.pending: list[ClusterRun] = []
        self._batch = 8
        self._max_batch = max(16, (8 << 20) >> cluster_bits)
        self._guard = guard
        self._write_back = write_back
        self._on_freed = on_freed

    def alloc(self, want: int) -> ClusterRun:
        """1..want contiguous clusters whose refcount 1 is written (not yet synced)."""
        start, count = self.reserve
        if not count:  # refcounts written now, synced before any L2 entry naming them
            start, count = self.rc.alloc(max(want, self._batch))
            self._batch = min(self._batch * 2, self._max_batch)
        k = min(want, count)
        self.reserve = ClusterRun(start + k, count - k)
        self._guard(start, k)
        return ClusterRun(start, k)

    def unalloc(self, start: int, count: int) -> None:
        """Give back clusters from alloc() that were never referenced (a write failed)."""
        rs, rn = self.reserve
        if start + count == rs or not rn:
            self.reserve = ClusterRun(start, count + rn)
        else:
            self.rc.free(start, count)

    def return_reserve(self) -> None:
        start, count = self.reserve
        if count:
            self.reserve = ClusterRun(0, 0)
            self.rc.free(start, count)  # never referenced: no ordering needed

    def queue_free(self, start: int, count: int) -> None:
        self.pending.append(ClusterRun(start, count))
        if len(self.pending) >= MAX_PENDING_FREES:
            self.apply_frees()

    def free_entry(self, e: int) -> None:
        """Queue the refcount drop for whatever an (old) L2 entry pointed at."""
        if e & COMPRESSED:
            self.queue_free(*compressed_clusters(e, self.cluster_bits))
        elif e & OFFSET_MASK:
            self.queue_free((e & OFFSET_MASK) >> self.cluster_bits, 1)

    def apply_frees(self) -> None:
        if not self.pending:
            return
        self._write_back()
        self.f.sync()  # the L2 entries that dropped these clusters are on disk first
        pending, self.pending = self.pending, []
        for start, count in pending:
            self.rc.free(start, count)
        self._on_freed()

    # -- what a call will need, for callers that must not block ---------------------------
    def fits(self, clusters: int) -> bool:
        """True if allocating this many clusters takes them all from the reserve (no
        refcount update, no new refcount block, no table growth)."""
        return clusters <= self.reserve.clusters

    def frees_fit(self, frees: int) -> bool:
        """True if queueing this many more frees does not apply the queue."""
        return len(self.pending) + frees < MAX_PENDING_FREES
