"""Positional file I/O for one image file, with exact reads and write barriers."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Protocol

from vdisk.engine import blocking


class Reader(Protocol):
    """What an image file can be read through instead of an fd: a remote source
    (vdisk.engine.remote). Read-only: the file then has no fd (fd == -1)."""

    size: int

    def pread(self, length: int, offset: int) -> bytes:
        """Exactly length bytes; zeroes past size."""
        ...

    def close(self) -> None: ...


class ImageFile:
    """An fd plus the bookkeeping the write-ordering rules need.

    `unsynced` is set whenever metadata that later writes depend on (refcounts,
    new tables) was written since the last fdatasync; `barrier()` syncs only then.
    `named_data` is set when cached (not yet written) L2 entries name cluster data
    written since the last fdatasync: that data must reach the disk before those
    entries do (`barrier(data=True)`). In-place overwrites never set it.
    """

    def __init__(self, fd: int, path: str, reader: Reader | None = None) -> None:
        self.fd = fd
        self.path = path
        self.reader = reader  # when set, reads go through it and fd is -1
        # (lseek, not st_size: a block device's st_size is 0)
        self.size = reader.size if reader is not None else os.lseek(fd, 0, os.SEEK_END)
        self.unsynced = False
        self.named_data = False
        self.syncs = 0

    def eio(self, what: str) -> OSError:
        return OSError(errno.EIO, f"{self.path}: {what}")

    def pread(self, length: int, offset: int) -> bytes:
        """Exactly length bytes; zeroes past EOF."""
        if self.reader is not None:
            return self.reader.pread(length, offset)
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill buf from offset; bytes past EOF read as zeroes."""
        if self.reader is not None:
            buf[:] = self.reader.pread(len(buf), offset)
            return
        done = 0
        n = len(buf)
        while done < n:
            got = os.preadv(self.fd, [buf[done:]], offset + done)
            if got <= 0:
                buf[done:] = bytes(n - done)
                return
            done += got

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            done += os.pwrite(self.fd, mv[done:], offset + done)
        if offset + len(mv) > self.size:
            self.size = offset + len(mv)

    def pwritev(self, bufs: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
        total = sum(len(b) for b in bufs)
        done = os.pwritev(self.fd, bufs, offset)
        if done < total:  # rare: finish with plain writes
            joined = b"".join(bytes(b) for b in bufs)
            self.pwrite(memoryview(joined)[done:], offset + done)
        if offset + total > self.size:
            self.size = offset + total

    def sync(self) -> None:
        blocking.fdatasync(self.fd)
        self.syncs += 1
        self.unsynced = False
        self.named_data = False

    def barrier(self, data: bool = False) -> None:
        """Order: the metadata written so far (and with data=True, the cluster data that
        dirty L2 entries name) reaches the disk before what is written next."""
        if self.unsynced or (data and self.named_data):
            self.sync()
