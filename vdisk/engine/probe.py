"""Format probing: what the first sector of a file says it is, as QEMU would read it.

QEMU guesses an image's format from its first 512 bytes when no format is given
(block.c, bdrv_probe_all: every driver scores the buffer, raw scores lowest). vdisk
serves only qcow2 and raw, but it must know every format QEMU recognises, for two
reasons:

* a file that QEMU would open as vmdk, qed, luks, ... must not be served as raw;
* when a raw image's format was probed, a write to its first sector that would make
  the file probe as another format is refused (QEMU's raw driver does the same, with
  EPERM): a guest could otherwise turn its disk into, say, a qcow2 or vmdk image that
  names any host file as its backing file or extent, for whoever probes it next.

`detect_format(head)` implements the content probes of QEMU's drivers (our own code,
from their documented signatures); `damaged_qcow2(head)` recognises a qcow2 header
whose magic was overwritten; `named_format(path)` is the format a file name suggests.
"""

from __future__ import annotations

import os
import struct

PROBE_SIZE = 512  # QEMU's BLOCK_PROBE_BUF_SIZE; a shorter file reads as zero-padded
QCOW2_MAGIC = b"QFI\xfb"

_VDI_SIGNATURE = 0xBEDA107F
_CLOOP_MAGIC = (b"#!/bin/sh\n#V2.0 Format\n"
                b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
_PARALLELS_MAGICS = (b"WithoutFreeSpace", b"WithouFreSpacExt")
_VMDK_VERSIONS = tuple(f"version={v}{eol}".encode() for v in "123" for eol in ("\n", "\r\n"))

# File name suffixes of the formats QEMU knows (qemu-img's usual names), lower case.
_SUFFIXES = {
    ".qcow2": "qcow2", ".qcow": "qcow", ".qed": "qed", ".vmdk": "vmdk",
    ".vdi": "vdi", ".vhd": "vpc", ".vpc": "vpc", ".vhdx": "vhdx", ".dmg": "dmg",
}


def read_head(path: str) -> bytes:
    """The first PROBE_SIZE bytes of path, zero-padded (raises OSError)."""
    with open(path, "rb") as f:
        head = f.read(PROBE_SIZE)
    return head.ljust(PROBE_SIZE, b"\0")


def _vmdk_descriptor(head: bytes) -> bool:
    """QEMU's test for a text VMDK descriptor: comment and blank lines, then version=N."""
    p, end = 0, len(head)
    while p < end:
        c = head[p:p + 1]
        if c == b"#":  # a comment line
            nl = head.find(b"\n", p)
            p = end if nl < 0 else nl + 1
            continue
        if c == b" ":  # a blank line: spaces, an optional CR, then LF
            while p < end and head[p:p + 1] == b" ":
                p += 1
            if p < end and head[p:p + 1] == b"\r":
                p += 1
            if p == end or head[p:p + 1] != b"\n":
                return False
            p += 1
            continue
        return any(head.startswith(v, p) for v in _VMDK_VERSIONS)
    return False


def detect_format(head: bytes) -> str | None:
    """The format QEMU's probes find in head (a file's first 512 bytes), or None for raw.

    Unlike QEMU, any qcow2 magic counts as qcow2 (QEMU calls version 1 "qcow" and
    versions below 1 raw): a file starting with the magic is never served as raw.
    """
    if head.startswith(QCOW2_MAGIC):
        version = struct.unpack_from(">I", head, 4)[0] if len(head) >= 8 else 0
        return "qcow" if version == 1 else "qcow2"
    if head[:4] in (b"COWD", b"KDMV") or _vmdk_descriptor(head):
        return "vmdk"
    if len(head) >= 512 and struct.unpack_from("<I", head, 0x40)[0] == _VDI_SIGNATURE:
        return "vdi"
    if head.startswith(b"conectix"):
        return "vpc"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    if len(head) >= 64 and head.startswith(b"QED\0"):
        return "qed"
    if head.startswith(_CLOOP_MAGIC):
        return "cloop"
    if (len(head) >= 512 and head.startswith(b"Bochs Virtual HD Image\0")
            and head[32:40] == b"Redolog\0" and head[48:56] == b"Growing\0"
            and struct.unpack_from("<I", head, 64)[0] in (0x00010000, 0x00020000)):
        return "bochs"
    if (len(head) >= 64 and head[:16] in _PARALLELS_MAGICS
            and struct.unpack_from("<I", head, 16)[0] == 2):
        return "parallels"
    if head.startswith(b"LUKS\xba\xbe") and head[6:8] == b"\0\1":
        return "luks"
    return None


def damaged_qcow2(head: bytes) -> str | None:
    """If head is a qcow2 header but for its magic, a short description of it, else None.

    Every field that qemu-img always sets plausibly must be there: version 2 or 3,
    cluster_bits 9..21, a known encryption method, cluster-aligned L1 and refcount tables,
    at least one refcount table cluster, and for version 3 a sane header length and
    refcount order. Random data or a boot sector does not pass all of these.
    """
    if len(head) < 104 or head.startswith(QCOW2_MAGIC):
        return None
    version, = struct.unpack_from(">I", head, 4)
    cluster_bits, size, crypt = struct.unpack_from(">IQI", head, 20)
    l1_offset, rt_offset, rt_clusters = struct.unpack_from(">QQI", head, 40)
    if version not in (2, 3) or not 9 <= cluster_bits <= 21 or crypt > 2 or size >= 1 << 63:
        return None
    cluster = 1 << cluster_bits
    if l1_offset % cluster or not rt_offset or rt_offset % cluster or not rt_clusters:
        return None
    if version == 3:
        refcount_order, header_length = struct.unpack_from(">II", head, 96)
        if refcount_order > 6 or header_length < 104 or header_length % 8:
            return None
    return f"version {version}, cluster size {cluster}, virtual size {size}"


def named_format(path: str) -> str | None:
    """The format the file name's suffix stands for (.qcow2, .vmdk, ...), or None."""
    return _SUFFIXES.get(os.path.splitext(path)[1].lower())
