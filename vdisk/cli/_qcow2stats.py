"""The allocation figures `qemu-img check` prints, read from a qcow2 file (read-only).

total-clusters counts guest clusters; allocated-clusters the active L2 entries with a
host cluster (normal, preallocated zero, compressed); fragmented-clusters those not
following the previous one in the same L2 table (compressed ones always);
image-end-offset is the end of the highest cluster with a non-zero refcount.
"""

from __future__ import annotations

import os
import struct

_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
_COMPRESSED = 1 << 62
_ZERO = 1
_EXTENDED_L2 = 1 << 4


def _read(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    return data + bytes(length - len(data))


def _highest_used(fd: int, cs: int, order: int, rt_off: int, rt_clusters: int) -> int:
    """Index of the highest host cluster with a non-zero refcount, or -1."""
    bits = 1 << order
    per_block = cs * 8 // bits
    table = _read(fd, rt_clusters * cs, rt_off)
    entries = struct.unpack(f">{len(table) // 8}Q", table)
    for i in range(len(entries) - 1, -1, -1):
        rb = entries[i] & _OFFSET_MASK
        if not rb:
            continue
        block = _read(fd, cs, rb)
        last = len(block.rstrip(b"\0")) - 1
        if last < 0:
            continue
        if bits >= 8:
            width = bits // 8
            idx = last // width
        else:
            byte = block[last]
            per_byte = 8 // bits
            mask = (1 << bits) - 1
            sub = max(j for j in range(per_byte) if (byte >> (j * bits)) & mask)
            idx = last * per_byte + sub
        return i * per_block + idx
    return -1


def check_stats(path: str) -> dict[str, int]:
    """total/allocated/fragmented/compressed clusters and image-end-offset, as qemu-img."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = _read(fd, 104, 0)
        version, = struct.unpack_from(">I", head, 4)
        cb, = struct.unpack_from(">I", head, 20)
        size, = struct.unpack_from(">Q", head, 24)
        l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", head, 36)
        incompat = struct.unpack_from(">Q", head, 72)[0] if version >= 3 else 0
        order = struct.unpack_from(">I", head, 96)[0] if version >= 3 else 4
        cs = 1 << cb
        if not 9 <= cb <= 21 or l1_size > (32 << 20) // 8 or rt_clusters * cs > 8 << 20:
            raise ValueError("header out of range")
        ew = 16 if incompat & _EXTENDED_L2 else 8
        allocated = fragmented = compressed = 0
        l1 = struct.unpack(f">{l1_size}Q", _read(fd, 8 * l1_size, l1_off))
        for l1e in l1:
            l2_off = l1e & _OFFSET_MASK
            if not l2_off:
                continue
            table = _read(fd, cs, l2_off)
            next_contig = 0
            for pos in range(0, cs, ew):
                e, = struct.unpack_from(">Q", table, pos)
                if e & _COMPRESSED:
                    allocated += 1
                    compressed += 1
                    fragmented += 1
                    continue
                off = e & _OFFSET_MASK
                if not off:
                    continue
                allocated += 1
                if next_contig and off != next_contig:
                    fragmented += 1
                next_contig = off + cs
        highest = _highest_used(fd, cs, order, rt_off, rt_clusters)
        return {
            "total-clusters": -(-size // cs),
            "allocated-clusters": allocated,
            "fragmented-clusters": fragmented,
            "compressed-clusters": compressed,
            "image-end-offset": (highest + 1) * cs,
        }
    finally:
        os.close(fd)
