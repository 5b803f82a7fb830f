"""The internal snapshot table of a qcow2 image, read-only (docs/interop/qcow2.rst
"Snapshots"; QEMU's qcow2-snapshot.c qcow2_read_snapshots and qcow2_snapshot_list).

Each entry: L1 offset and size, id and name lengths, date (seconds, nanoseconds), guest
clock (ns), a 32-bit VM state size, the extra data size, the extra data (a 64-bit VM
state size from 8 bytes on, the disk size from 16, the icount from 24), the id, the name,
padding to 8 bytes. As QEMU lists them, the id keeps at most 127 bytes and the name 255
(both end at a NUL byte), and an icount of all ones (or none stored) means none.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vdisk.engine.qcow2.fileio import ImageFile
from vdisk.engine.qcow2.image import Qcow2Image
from vdisk.errors import CorruptImageError

_ENTRY = struct.Struct(">QIHHIIQII")
MAX_SNAPSHOTS = 65536
MAX_EXTRA = 1024
MAX_TABLE_SIZE = 64 * 1024 * 1024  # QCOW_MAX_SNAPSHOTS_SIZE
_ID_MAX, _NAME_MAX = 127, 255  # QEMUSnapshotInfo's id_str[128], name[256]
NO_ICOUNT = (1 << 64) - 1


@dataclass(frozen=True)
class Snapshot:
    """One snapshot as QEMU lists it (sizes and counters as the file holds them)."""

    id: bytes
    name: bytes
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int  # NO_ICOUNT when not recorded


def _c_string(raw: bytes, limit: int) -> bytes:
    return raw.split(b"\0", 1)[0][:limit]


def read_snapshots(f: ImageFile, path: str, count: int, offset: int) -> list[Snapshot]:
    """The snapshot table at offset; refuses what QEMU's open refuses."""
    def bad(reason: str) -> CorruptImageError:
        return CorruptImageError(path, f"could not read the snapshot table: {reason}")

    if count > MAX_SNAPSHOTS:
        raise bad("too many snapshots")
    out: list[Snapshot] = []
    pos = offset
    for _ in range(count):
        head = f.pread(_ENTRY.size, pos)
        if len(head) < _ENTRY.size:
            raise bad("the table runs past the end of the file")
        (_, _, id_len, name_len, date_sec, date_nsec, clock, vm_state,
         extra_len) = _ENTRY.unpack(head)
        if extra_len > MAX_EXTRA:
            raise bad("too much extra metadata in a snapshot table entry")
        tail_len = extra_len + id_len + name_len
        tail = f.pread(tail_len, pos + _ENTRY.size)
        if len(tail) < tail_len:
            raise bad("the table runs past the end of the file")
        extra = tail[:extra_len]
        if extra_len >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        icount = struct.unpack_from(">Q", extra, 16)[0] if extra_len >= 24 else NO_ICOUNT
        ident = tail[extra_len:extra_len + id_len]
        name = tail[extra_len + id_len:]
        pos += (_ENTRY.size + tail_len + 7) & ~7
        if pos - offset > MAX_TABLE_SIZE:
            raise bad("the snapshot table is too big")
        out.append(Snapshot(_c_string(ident, _ID_MAX), _c_string(name, _NAME_MAX),
                            vm_state, date_sec, date_nsec, clock, icount))
    return out


def list_snapshots(img: Qcow2Image) -> list[Snapshot]:
    """The snapshots of an open qcow2 image, in table order (none in a raw image)."""
    h = img.hdr
    return read_snapshots(img.f, img.path, h.nb_snapshots, h.snapshots_offset)


def list_bitmaps(img: Qcow2Image) -> list[tuple[str, int, int]]:
    """(name, flags, granularity bits) of each bitmap directory entry, in directory order,
    as the open read them (none when the bitmaps extension is absent or not trusted)."""
    return [(e.name, e.flags, e.granularity_bits) for e in img.bm.entries]
