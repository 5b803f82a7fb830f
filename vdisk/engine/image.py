"""The interface every format driver implements, and the block-status vocabulary.

Drivers are synchronous and not thread-safe: callers serialize calls on one chain
(the block device does). Offsets and lengths are bytes in the guest (virtual) view.
Runtime I/O failures raise OSError with an errno (EIO, ENOSPC, ...); problems found
at open raise vdisk.errors.ImageError subclasses.
"""

from __future__ import annotations

import abc
import enum
import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from vdisk.engine.remote import RemoteSource

from vdisk.engine.dirty_bitmap import BitmapSet


class Status(enum.Enum):
    """What one layer says about a range, looking at that layer alone."""

    DATA = "data"  # this layer holds the bytes
    ZERO = "zero"  # this layer says the range reads as zeroes (v3 zero cluster)
    UNALLOCATED = "unallocated"  # this layer defers to its backing file


@dataclass(frozen=True)
class Extent:
    """A run of bytes with one status in one layer."""

    offset: int
    length: int
    status: Status


class Location(NamedTuple):
    """Where a range of the guest view lies, for a reader that serves it on its own
    (fast_location): fd's bytes at host, or zeroes when fd is -1."""

    fd: int
    host: int
    writable: bool  # a write of the range may go to fd at host with nothing else to do
    depth: int  # the layer that holds it: 0 for the image asked, 1 for its backing, ...


ZERO_LOCATION = Location(-1, 0, False, 0)


class Image(abc.ABC):
    """One open image file (one layer of a chain)."""

    format_name: str = ""  # "qcow2" or "raw"

    path: str  # as opened (absolute)
    read_only: bool
    virtual_size: int
    cluster_size: int  # allocation granularity; raw reports 65536
    backing: Image | None  # the opened backing image, attached by the chain opener
    backing_name: str | None  # the backing file name as stored in the header
    backing_format: str | None  # from the backing-format extension, or None
    # True when the chain opener probed this image's format (no format given, no backing
    # format in the overlay); a probed raw image guards its first sector (vdisk/raw.py).
    probed: bool = False
    # True for an image read from a remote source (vdisk.engine.remote): read-only, no
    # file descriptor, any read of it may wait on the network, and remote_location() says
    # where its data lies.
    remote: bool = False
    bitmaps: BitmapSet | None = None  # dirty bitmaps (QMP block-dirty-bitmap-*), if any

    @abc.abstractmethod
    def layer_status(self, offset: int, length: int) -> Extent:
        """Status of the run starting at offset, in this layer alone, at most length bytes."""

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """The guest view of the range: this layer, falling back to self.backing, else zeroes.

        Bytes past the end of a shorter backing image read as zeroes.
        """

    def read_into(self, offset: int, buf: memoryview) -> None:
        """read() into buf (len(buf) bytes at offset); drivers may avoid the copy."""
        buf[:] = self.read(offset, len(buf))

    def data_location(self, offset: int, length: int) -> tuple[int, int, int] | None:
        """(fd, host offset, bytes) when a prefix of the range is plain data in this file,
        for copying it in the kernel; None when it is not (the default)."""
        return None

    def fast_location(self, offset: int, length: int) -> Location | None:
        """Where all of [offset, offset+length) (inside one cluster) reads from, decided
        from what is in memory: this file, a backing file, or zeroes; None when a read
        needs the driver (compressed, partly allocated, not cached, remote...), the
        default. Valid until the next call that changes the image or its chain."""
        return None

    def remote_location(self, offset: int, length: int) -> tuple[RemoteSource, int, int] | None:
        """(source, host offset, bytes) when a prefix of the range is plain data in this
        image's network source, for the caller to fetch itself, outside any lock on the
        image (sources are thread-safe); None when it is not (the default)."""
        return None

    def write_from(self, offset: int, fd: int, src: int, length: int, *,
                   direct: bool = False) -> int:
        """Write length bytes that fd holds at src (a copy-up): in the kernel where the
        driver can, or with direct without filling this file's page cache (qcow2: through
        its O_DIRECT fd, so it may wait for the device, like write_copy: call it in a
        worker thread); the bytes written (a prefix), 0 when it cannot (the default)."""
        return 0

    def may_block(self, op: str, offset: int, length: int) -> bool:
        """True if the call op ("read", "write", "copy", "zeroes" or "status") on the range may
        sleep on a disk sync or the network, or move more than blocking.INLINE_COPY bytes:
        the block layer then runs it in a worker thread. Decided from what is in memory,
        without I/O. This default, for drivers that cannot tell, says True."""
        return True

    @abc.abstractmethod
    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write data; partial clusters are completed from the backing chain (COW)."""

    def write_copy(self, offset: int, data: bytes | memoryview) -> None:
        """write() of data copied up from the backing chain (a copy-up or a stream step).
        A driver may bypass the page cache for it (qcow2: O_DIRECT, where data is
        page-aligned memory), so it may wait for the device: may_block("copy", ...) is
        True and the call belongs in a worker thread. This default is write()."""
        self.write(offset, data)

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make the range read as zeroes (zero clusters where aligned and supported)."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every write acknowledged so far durable (data, then metadata, fdatasync)."""

    @abc.abstractmethod
    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the header to name a new backing file (None drops it); durable on return.

        Does not reopen anything: the caller attaches the new backing image.
        """

    def fileno(self) -> int:
        """The descriptor of the open image file (for fstat, never for I/O)."""
        raise OSError(errno.EBADF, f"{self.path}: no file descriptor")

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Keys as `qemu-img info --output=json` gives them for this one file."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush if writable, release locks, close the file. Idempotent."""

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
