"""L1/L2 entry encodings (standard and extended L2) and compressed descriptors."""

from __future__ import annotations

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9..55: host offset of a cluster
COPIED = 1 << 63  # refcount is exactly 1: may be written in place
COMPRESSED = 1 << 62
ZERO = 1  # standard L2 entry, v3: reads as zeroes
L1_RESERVED = 0x7F00_0000_0000_01FF
SUBCLUSTERS = 32
ALL_ALLOC = 0xFFFF_FFFF  # extended L2 bitmap: every subcluster allocated
ALL_ZERO = 0xFFFF_FFFF << 32  # extended L2 bitmap: every subcluster reads as zeroes

# Kinds of mapped runs, as used by the image and check code.
UNALLOC = 0
ZEROES = 1
DATA = 2
COMP = 3


def compressed_range(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, byte count to read) of a compressed cluster's data."""
    x = 62 - (cluster_bits - 8)
    off = entry & ((1 << x) - 1)
    nsect = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return off, nsect * 512 - (off & 511)


def compressed_clusters(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(first host cluster index, count) touched by a compressed cluster (refcounted each)."""
    off, size = compressed_range(entry, cluster_bits)
    first = off >> cluster_bits
    last = (off + size - 1) >> cluster_bits
    return first, last - first + 1


def compressed_entry(host: int, size: int, cluster_bits: int) -> int:
    """Encode a compressed descriptor for `size` bytes stored at host offset `host`."""
    x = 62 - (cluster_bits - 8)
    nsect = (((host + size + 511) >> 9) - (host >> 9)) or 1
    return COMPRESSED | ((nsect - 1) << x) | host
