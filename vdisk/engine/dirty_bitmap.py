"""Dirty bitmaps in memory: which granules of a disk were written (QEMU's BdrvDirtyBitmap).

A `DirtyBitmap` keeps one bit per granule in a bytearray, least significant bit first
(granule i is bit i % 8 of byte i // 8), which is also the qcow2 on-disk layout, so
storing it is a plain copy. Marking a write is a few slice operations, whatever its
length: cheap enough for the write path. A `BitmapSet` holds the bitmaps of one image
and checks the QMP operations on them with QEMU's messages; qcow2 adds persistence
(vdisk/engine/qcow2/bitmaps.py).
"""

from __future__ import annotations

from typing import Any

MIN_GRANULARITY = 512
MAX_NAME = 1023  # BDRV_BITMAP_MAX_NAME_SIZE


class BitmapError(Exception):
    """A bitmap operation refused; the message is QEMU's."""


class DirtyBitmap:
    """One bitmap over a disk of `size` bytes."""

    def __init__(self, name: str, size: int, granularity_bits: int, *, enabled: bool = True,
                 persistent: bool = False) -> None:
        self.name = name
        self.size = size
        self.granularity_bits = granularity_bits
        self.enabled = enabled
        self.persistent = persistent
        self.inconsistent = False  # found in use at open: its data is unknown
        self.readonly = False  # loaded from an image opened read-only
        self.nbits = -(-size >> granularity_bits) if size else 0
        self.bits = bytearray(-(-self.nbits // 8))

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def recording(self) -> bool:
        return self.enabled and not self.inconsistent

    def mark(self, offset: int, length: int) -> None:
        """Set the bits of every granule that [offset, offset+length) touches."""
        if length <= 0:
            return
        gb = self.granularity_bits
        first = offset >> gb
        last = min((offset + length - 1) >> gb, self.nbits - 1)
        if last < first:
            return
        bits = self.bits
        b0, b1 = first >> 3, last >> 3
        lo = (0xFF << (first & 7)) & 0xFF
        hi = 0xFF >> (7 - (last & 7))
        if b0 == b1:
            bits[b0] |= lo & hi
            return
        bits[b0] |= lo
        if b1 > b0 + 1:
            bits[b0 + 1:b1] = b"\xff" * (b1 - b0 - 1)
        bits[b1] |= hi

    def is_dirty(self, granule: int) -> bool:
        return bool(self.bits[granule >> 3] >> (granule & 7) & 1)

    def dirty_ranges(self) -> list[tuple[int, int]]:
        """The dirty byte ranges as (offset, length), merged, clamped to the disk size."""
        out: list[tuple[int, int]] = []
        start = -1
        gb = self.granularity_bits
        for i in range(self.nbits + 1):
            dirty = i < self.nbits and self.is_dirty(i)
            if dirty and start < 0:
                start = i
            elif not dirty and start >= 0:
                a, b = start << gb, min(i << gb, self.size)
                out.append((a, b - a))
                start = -1
        return out

    def count(self) -> int:
        """Dirty bytes as QEMU counts them: dirty granules times the granularity."""
        return int.from_bytes(self.bits, "little").bit_count() << self.granularity_bits

    def clear(self) -> None:
        self.bits[:] = bytes(len(self.bits))

    def load(self, data: bytes | bytearray, at: int = 0) -> None:
        """Put serialized bitmap bytes at byte `at` (tail bits past the disk dropped)."""
        n = min(len(data), len(self.bits) - at)
        self.bits[at:at + n] = data[:n]
        tail = self.nbits & 7
        if tail and at + n == len(self.bits):
            self.bits[-1] &= (1 << tail) - 1

    def info(self) -> dict[str, Any]:
        """QEMU's BlockDirtyInfo."""
        out: dict[str, Any] = {"name": self.name, "recording": self.recording,
                               "persistent": self.persistent, "busy": False,
                               "granularity": self.granularity, "count": self.count()}
        if self.inconsistent:
            out["inconsistent"] = True
        return out


def default_granularity(cluster_size: int | None) -> int:
    """QEMU's bdrv_get_default_bitmap_granularity: the cluster size within 4..64 KiB;
    64 KiB when the format has no clusters."""
    if not cluster_size:
        return 65536
    return min(65536, max(4096, cluster_size))


class BitmapSet:
    """The bitmaps of one image, newest first (QEMU lists them so). Formats that cannot
    store bitmaps keep only this: bitmaps that live as long as the image is open."""

    def __init__(self, size: int, cluster_size: int | None = None) -> None:
        self.size = size
        self.cluster_size = cluster_size
        self.bitmaps: list[DirtyBitmap] = []
        self._recording: list[DirtyBitmap] = []

    def __len__(self) -> int:
        return len(self.bitmaps)

    def mark(self, offset: int, length: int) -> None:
        """A write (data, zeroes, discard, copy-up) to [offset, offset+length)."""
        for bm in self._recording:
            bm.mark(offset, length)

    @property
    def recording(self) -> bool:
        """True while some bitmap records writes (mark() does something)."""
        return bool(self._recording)

    def _changed(self) -> None:
        self._recording = [bm for bm in self.bitmaps if bm.recording and not bm.readonly]

    def find(self, name: str) -> DirtyBitmap:
        for bm in self.bitmaps:
            if bm.name == name:
                return bm
        raise BitmapError(f"Dirty bitmap '{name}' not found")

    def info(self) -> list[dict[str, Any]]:
        return [bm.info() for bm in self.bitmaps]

    # -- QMP operations (block-dirty-bitmap-add/remove/clear) -------------------------------
    def add(self, node: str, name: str, granularity: int | None, *, persistent: bool,
            disabled: bool) -> DirtyBitmap:
        """Checks in QEMU's order: name, granularity, persistence, then uniqueness."""
        if not name:
            raise BitmapError("Bitmap name cannot be empty")
        if granularity is None:
            granularity = default_granularity(self.cluster_size)
        elif granularity < MIN_GRANULARITY or granularity & (granularity - 1):
            raise BitmapError("Granularity must be power of 2 and at least 512")
        gbits = granularity.bit_length() - 1
        if persistent:
            self.check_persistent(node, name, gbits)
        if any(bm.name == name for bm in self.bitmaps):
            raise BitmapError(f"Bitmap already exists: {name}")
        if len(name) > MAX_NAME:
            raise BitmapError(f"Bitmap name too long: {name}")
        bm = DirtyBitmap(name, self.size, gbits, enabled=not disabled, persistent=persistent)
        self.bitmaps.insert(0, bm)
        self._changed()
        return bm

    def check_persistent(self, node: str, name: str, granularity_bits: int) -> None:
        """Raise unless a new persistent bitmap can be stored in this image."""
        raise BitmapError(f"Can't store persistent bitmaps to {node}: Operation not supported")

    @staticmethod
    def check_usable(bm: DirtyBitmap, *, inconsistent_ok: bool = False) -> None:
        """QEMU's bdrv_dirty_bitmap_check (no vdisk operation keeps a bitmap busy)."""
        if bm.readonly:
            raise BitmapError(f"Bitmap '{bm.name}' is readonly and cannot be modified")
        if bm.inconsistent and not inconsistent_ok:
            raise BitmapError(f"Bitmap '{bm.name}' is inconsistent and cannot be used")

    def remove(self, name: str) -> None:
        bm = self.find(name)
        self.check_usable(bm, inconsistent_ok=True)
        self.bitmaps.remove(bm)
        self._changed()

    def clear(self, name: str) -> None:
        bm = self.find(name)
        self.check_usable(bm)
        bm.clear()
