"""Positional file I/O for one image file, with exact reads and write barriers."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Sequence
from typing import Protocol

from vdisk.engine import blocking

# Copies from the backing chain (Image.write_copy: stream steps, copy-ups), aligned to
# DIRECT_ALIGN on disk, go through a second fd opened with O_DIRECT (ImageFile.pwritev):
# they skip the page cache. Measured here, a 256 MiB stream over HTTP took
# 1.2-1.45 s buffered, of which 1.0 s was the kernel filling new page-cache pages (guest
# RAM the hypervisor hands out again on first touch), and 0.40-0.52 s direct.
DIRECT_ALIGN = 4096
COPY_BUFFER = 4 << 20  # bytes of the reused aligned buffer of copy_in


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
    With direct=True, bulk writes may go through a second, O_DIRECT fd (close() closes it);
    the barriers stay the same: O_DIRECT data is not durable before an fdatasync either.
    """

    def __init__(self, fd: int, path: str, reader: Reader | None = None,
                 direct: bool = False) -> None:
        self.fd = fd
        self.path = path
        self.reader = reader  # when set, reads go through it and fd is -1
        # (lseek, not st_size: a block device's st_size is 0)
        self.size = reader.size if reader is not None else os.lseek(fd, 0, os.SEEK_END)
        self.unsynced = False
        self.named_data = False
        self.syncs = 0
        # the O_DIRECT fd for bulk writes: -2 not opened yet, -1 none
        self._direct = -2 if direct and reader is None else -1
        self._copy_buf: memoryview | None = None

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

    def pwritev(self, bufs: Sequence[bytes | bytearray | memoryview], offset: int,
                direct: bool = False) -> None:
        """direct: through the O_DIRECT fd where the range is aligned (see DIRECT_ALIGN)."""
        total = sum(len(b) for b in bufs)
        if direct and not (offset | total) & (DIRECT_ALIGN - 1) \
                and self._write_direct(bufs, offset, total):
            return
        done = os.pwritev(self.fd, bufs, offset)
        if done < total:  # rare: finish with plain writes
            joined = b"".join(bytes(b) for b in bufs)
            self.pwrite(memoryview(joined)[done:], offset + done)
        if offset + total > self.size:
            self.size = offset + total

    def _write_direct(self, bufs: Sequence[bytes | bytearray | memoryview], offset: int,
                      total: int) -> bool:
        """Write bufs through the O_DIRECT fd; False if that cannot be done (no such fd,
        or buffers the kernel refuses: not page-aligned in memory), then nothing was
        written. The caller's bufs must be aligned for this to pay (mmap-backed)."""
        if not self.can_direct():
            return False
        try:
            done = blocking.pwritev_direct(self._direct, bufs, offset)
        except OSError as e:
            if e.errno == errno.EINVAL:  # misaligned buffers: written nowhere
                return False
            raise
        if done < total:  # rare (no space for all of it): finish buffered
            joined = b"".join(bytes(b) for b in bufs)
            self.pwrite(memoryview(joined)[done:], offset + done)
        if offset + total > self.size:
            self.size = offset + total
        return True

    def can_direct(self) -> bool:
        """Whether writes can go through an O_DIRECT fd (opened at the first ask)."""
        if self._direct == -2:
            self._direct = _open_direct(self.fd)
        return self._direct >= 0

    def copy_in(self, src_fd: int, src: int, n: int, dst: int, direct: bool = False) -> None:
        """Copy n bytes of src_fd at src to dst with copy_file_range; with direct, read into
        a reused page-aligned buffer and written through the O_DIRECT fd (where there is
        one), so the copy fills no page-cache pages of this file but waits for the device:
        never on the event loop."""
        if not direct or not self.can_direct():
            _copy_file_range_all(src_fd, self.fd, n, src, dst)
            return
        if self._copy_buf is None:
            self._copy_buf = memoryview(mmap.mmap(-1, COPY_BUFFER))
        done = 0
        while done < n:
            view = self._copy_buf[:min(n - done, COPY_BUFFER)]
            got = 0
            while got < len(view):
                k = os.preadv(src_fd, [view[got:]], src + done + got)
                if k <= 0:
                    raise OSError(errno.EIO, f"{self.path}: the copy's source ended early")
                got += k
            self.pwritev([view], dst + done, direct=True)
            done += len(view)

    def close(self) -> None:
        """Close the O_DIRECT fd, if any (the caller closes fd)."""
        if self._direct >= 0:
            os.close(self._direct)
        self._direct = -1

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


def _open_direct(fd: int) -> int:
    """A second fd on fd's file, opened O_DIRECT for writing; -1 where that fails (a
    read-only fd, tmpfs and other file systems without O_DIRECT)."""
    try:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            return -1
        return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return -1


def _copy_file_range_all(src_fd: int, dst_fd: int, n: int, src: int, dst: int) -> None:
    done = 0
    while done < n:
        got = blocking.copy_file_range(src_fd, dst_fd, n - done, src + done, dst + done)
        if got <= 0:
            raise OSError(errno.EIO, "copy_file_range made no progress")
        done += got
