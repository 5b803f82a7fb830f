"""create_qcow2: write a new, empty qcow2 image laid out the way qemu-img does."""

from __future__ import annotations

import os
import struct
from array import array

from vdisk.engine import blocking
from vdisk.engine.locking import lock_image, perms_for, unlock_image
from vdisk.engine.qcow2.header import (
    COMPAT_LAZY_REFCOUNTS,
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    MAX_BACKING_NAME,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    V2_LEN,
    Header,
    feature_table_ext,
    serialize_header,
)
from vdisk.engine.qcow2.prealloc import Layout, preallocate
from vdisk.engine.qcow2.refcount import set_entry
from vdisk.errors import ImageError


def _write_layout(fd: int, layout: Layout, mode: str) -> None:
    off, length = layout.data
    if length and mode == "falloc":
        os.posix_fallocate(fd, off, length)
    elif length:  # full: zeroes written
        chunk = bytes(min(length, 1 << 20))
        for pos in range(off, off + length, len(chunk)):
            os.pwrite(fd, chunk[:min(len(chunk), off + length - pos)], pos)
    for at, data in layout.pieces:
        os.pwrite(fd, data, at)
    os.ftruncate(fd, max(layout.length, os.fstat(fd).st_size))


def create_qcow2(path: str, size: int, *, cluster_size: int = 65536,
                 backing_name: str | None = None, backing_format: str | None = None,
                 compat: str = "1.1", refcount_bits: int = 16,
                 extended_l2: bool = False, lazy_refcounts: bool = False,
                 compression_type: str = "zlib", preallocation: str = "off") -> None:
    """Create (or overwrite) path as an empty qcow2 image of `size` bytes, byte for byte
    as qemu-img 7.2 makes it (preallocation: off, metadata, falloc or full)."""
    if compat not in ("1.1", "0.10"):
        raise ImageError(path, f"unknown qcow2 compat level {compat!r} (use 1.1 or 0.10)")
    version = 3 if compat == "1.1" else 2
    cb = cluster_size.bit_length() - 1
    if cluster_size != 1 << cb or not 9 <= cb <= 21:
        raise ImageError(path, "cluster size must be a power of two between 512 B and 2 MiB")
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise ImageError(path, "refcount bits must be a power of two between 1 and 64")
    if version == 2 and (refcount_bits != 16 or extended_l2):
        raise ImageError(path, "compat 0.10 images support only 16-bit refcounts and "
                               "no extended L2 entries")
    if version == 2 and (lazy_refcounts or compression_type != "zlib"):
        raise ImageError(path, "lazy refcounts and compression types other than zlib "
                               "need compat 1.1")
    if compression_type not in ("zlib", "zstd"):
        raise ImageError(path, f"unknown compression type {compression_type!r} (zlib, zstd)")
    if preallocation not in ("off", "metadata", "falloc", "full"):
        raise ImageError(path, f"unknown preallocation mode {preallocation!r}")
    if extended_l2 and cb < 14:
        raise ImageError(path, "extended L2 entries need clusters of at least 16 KiB")
    if size < 0 or size % 512:
        raise ImageError(path, "image size must be a non-negative multiple of 512 bytes")
    if backing_name is not None and len(backing_name.encode()) > MAX_BACKING_NAME:
        raise ImageError(path, "backing file name is too long")
    l2_entries = cluster_size // (16 if extended_l2 else 8)
    l1_size = -(-size // (l2_entries * cluster_size))
    if l1_size * 8 > MAX_L1_BYTES:
        raise ImageError(path, "image is too large for this cluster size (L1 table > 32 MiB)")
    l1_clusters = -(-l1_size * 8 // cluster_size)
    per_block = cluster_size * 8 // refcount_bits
    rb = rt = 1
    while True:
        total = 1 + rt + rb + l1_clusters
        rb2 = -(-total // per_block)
        rt2 = -(-rb2 * 8 // cluster_size)
        if (rb2, rt2) == (rb, rt):
            break
        rb, rt = rb2, rt2
    if rt * cluster_size > MAX_REFTABLE_BYTES:
        raise ImageError(path, "image is too large for this cluster size")
    h = Header(
        version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cb,
        size=size, crypt_method=0, l1_size=l1_size,
        l1_table_offset=(1 + rt + rb) * cluster_size if l1_size else 0, refcount_table_offset=cluster_size,
        refcount_table_clusters=rt, nb_snapshots=0, snapshots_offset=0,
        incompatible=(INCOMPAT_EXTL2 if extended_l2 else 0)
        | (INCOMPAT_COMPRESSION if compression_type == "zstd" else 0),
        compatible=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
        compression_type=1 if compression_type == "zstd" else 0,
        refcount_order=refcount_bits.bit_length() - 1,
        header_length=112 if version == 3 else V2_LEN,
        backing_name=backing_name, backing_format=backing_format,
    )
    h.raw = bytes(h.header_length)
    if version == 3 and cluster_size > 4096:  # qemu-img leaves it out of small clusters
        h.extensions.append(feature_table_ext())
    head = serialize_header(h)
    if len(head) > cluster_size and version == 3:  # the feature table is optional
        h.extensions = []
        head = serialize_header(h)
    if len(head) > cluster_size:
        raise ImageError(path, "header and backing file name do not fit in the first cluster")
    table = array("Q", [(1 + rt + k) * cluster_size for k in range(rb)])
    table.byteswap()
    blocks = bytearray(rb * cluster_size)  # refcount blocks in a row: one bit string
    for c in range(total):
        set_entry(blocks, c, refcount_bits, 1)
    # qemu-img writes the L1 table with its exact length: the file ends there
    image = bytearray((1 + rt + rb) * cluster_size + l1_size * 8)
    image[:len(head)] = head
    image[cluster_size:cluster_size + len(table) * 8] = table.tobytes()
    image[(1 + rt) * cluster_size:(1 + rt + rb) * cluster_size] = blocks
    layout = None
    if preallocation != "off":
        layout = preallocate(preallocation, size=size, cs=cluster_size, bits=refcount_bits,
                             v3=version == 3, ew=2 if extended_l2 else 1, rt=rt, rb=rb,
                             l1_off=h.l1_table_offset, l1_clusters=l1_clusters)
        if layout.reftable_offset != cluster_size:
            image[48:60] = struct.pack(">QI", layout.reftable_offset, layout.reftable_clusters)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ImageError(path, f"cannot create: {e.strerror}") from None
    try:
        lock_image(fd, path, *perms_for(writable=True, metadata=True))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, image, 0)
            if layout is not None:
                _write_layout(fd, layout, preallocation)
            blocking.fdatasync(fd)
        finally:
            unlock_image(fd)
    except OSError as e:
        raise ImageError(path, f"cannot write: {e.strerror}") from None
    finally:
        os.close(fd)
