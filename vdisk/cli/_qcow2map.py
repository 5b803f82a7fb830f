"""Host offsets of a qcow2 file's clusters, for `vdisk map` (read-only, its own fd).

qemu-img map reports, and only merges runs whose host offsets are contiguous, the
host offset of normal and preallocated-zero clusters; compressed and plain zero or
unallocated clusters have none. The format driver answers what each range holds; this
reader only answers where it lives in the file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
_COMPRESSED = 1 << 62
_EXTENDED_L2 = 1 << 4


class HostMapper:
    """Reads L1/L2 tables of one qcow2 file to find host offsets of guest ranges."""

    def __init__(self, path: str, pread: Callable[[int, int], bytes] | None = None) -> None:
        """pread(length, offset) reads the file instead (a remote image's source)."""
        self._fd = -1 if pread is not None else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._pread = pread or (lambda n, off: os.pread(self._fd, n, off))
        head = self._pread(104, 0)
        version, = struct.unpack_from(">I", head, 4)
        self.cluster_bits, = struct.unpack_from(">I", head, 20)
        self.cluster_size = 1 << self.cluster_bits
        l1_size, self._l1_offset = struct.unpack_from(">IQ", head, 36)
        incompat = struct.unpack_from(">Q", head, 72)[0] if version >= 3 else 0
        self.extended = bool(incompat & _EXTENDED_L2)
        self._entry = 16 if self.extended else 8
        self._l2_entries = self.cluster_size // self._entry
        raw_l1 = self._pread(8 * l1_size, self._l1_offset)
        self._l1 = list(struct.unpack_from(f">{len(raw_l1) // 8}Q", raw_l1))
        self._l2: dict[int, bytes] = {}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _cluster_host(self, cluster: int) -> int | None:
        """Host offset of a guest cluster, or None (unallocated, plain zero, compressed)."""
        l1_index, l2_index = divmod(cluster, self._l2_entries)
        if l1_index >= len(self._l1):
            return None
        l2_off = self._l1[l1_index] & _OFFSET_MASK
        if not l2_off:
            return None
        table = self._l2.get(l2_off)
        if table is None:
            table = self._pread(self.cluster_size, l2_off)
            if len(self._l2) > 64:
                self._l2.clear()
            self._l2[l2_off] = table
        pos = l2_index * self._entry
        if pos + 8 > len(table):
            return None
        entry, = struct.unpack_from(">Q", table, pos)
        if entry & _COMPRESSED:
            return None
        return (entry & _OFFSET_MASK) or None

    def host_run(self, offset: int, length: int) -> tuple[int, int | None]:
        """(n, host): the first n bytes at offset share validity and contiguous offsets."""
        cs = self.cluster_size
        cluster = offset // cs
        first = self._cluster_host(cluster)
        host = None if first is None else first + offset % cs
        end = offset + length
        pos = (cluster + 1) * cs
        while pos < end:
            nxt = self._cluster_host(pos // cs)
            if (first is None) != (nxt is None):
                break
            if first is not None and nxt != first + (pos - cluster * cs):
                break
            pos += cs
        return min(pos, end) - offset, host
