"""The raw format: the file is the guest disk, byte for byte.

A raw image has no backing file and no metadata. Its virtual size is the file size
rounded up to 512 bytes, as QEMU reports it; it never grows. Holes in the file
(SEEK_HOLE) read as zeroes and are reported as Status.ZERO.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from typing import Any

from vdisk.engine import blocking
from vdisk.engine.dirty_bitmap import BitmapSet
from vdisk.engine.image import Extent, Image, Location, Status
from vdisk.engine.locking import lock_image, perms_for, unlock_image
from vdisk.engine.probe import PROBE_SIZE, detect_format
from vdisk.errors import ImageError, ReadOnlyError, UnsupportedImageError

log = logging.getLogger("vdisk")

SECTOR = 512
RAW_CLUSTER_SIZE = 65536
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)  # libc is already loaded
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux fallocate(2) with mode flags; raises OSError."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def fd_size(fd: int) -> int:
    """The size of an open image file or block device (st_size is 0 for a device; its
    end, lseek SEEK_END, is what BLKGETSIZE64 says)."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return os.fstat(fd).st_size


class RawImage(Image):
    """An open raw image file."""

    format_name = "raw"

    def __init__(self, path: str, fd: int, *, read_only: bool, locked: bool) -> None:
        self.path = path
        self.fd = fd
        self.read_only = read_only
        self._locked = locked
        self._closed = False
        self.virtual_size = round_up(fd_size(fd), SECTOR)
        self.cluster_size = RAW_CLUSTER_SIZE
        self.backing = None
        self.backing_name = None
        self.backing_format = None
        self._can_punch = True
        self._can_zero_range = True
        # Set when the format was probed: then, as QEMU does, refuse writes that would
        # make the file probe as another format next time (a guest could turn its disk
        # into an image that names any host file as its backing file).
        self.probed = False
        self._refusal_logged = False
        self.bitmaps = self.bm = BitmapSet(self.virtual_size)  # in memory only
        self.is_device = stat.S_ISBLK(os.fstat(fd).st_mode)

    # -- helpers -----------------------------------------------------------------------

    def _file_size(self) -> int:
        return self.virtual_size if self.is_device else os.fstat(self.fd).st_size

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(errno.EBADF, f"{self.path}: image is closed")

    def _guard_sector0(self, offset: int, data: bytes | memoryview | None, length: int
                       ) -> bytes | None:
        """For a probed image, the first sector as this write (data, or zeroes if None)
        would leave it; EPERM if it would then probe as another format.

        Returns the new head of the first sector to write instead of data's own first
        bytes (checked bytes are the ones written), or None if the write does not touch
        the first sector or the format was given. Like QEMU's raw driver (raw_co_pwritev
        with bs->probed). Zero writes are checked too: zeroing one byte can complete a
        signature (a version field, a NUL after a magic string); QEMU gets the same from
        its 512-byte request alignment for probed images, which turns a partial zero write
        of the first sector into a checked read-modify-write.
        """
        if not self.probed or offset >= PROBE_SIZE or length == 0:
            return None
        n = min(length, PROBE_SIZE - offset)
        sector = bytearray(self.read(0, PROBE_SIZE))
        sector[offset:offset + n] = bytes(n) if data is None else bytes(data[:n])
        fmt = detect_format(bytes(sector))
        if fmt is not None:
            if not self._refusal_logged:
                log.warning(
                    "%s: refused a write that would make the image look like a %s image "
                    "(its format was probed as raw; give format=raw to allow such writes; "
                    "further refusals are not logged)", self.path, fmt)
                self._refusal_logged = True
            raise OSError(
                errno.EPERM, f"{self.path}: refusing to write a {fmt} header into a raw "
                "image whose format was probed; give the format explicitly"
            )
        return bytes(sector[offset:offset + n])

    def _check_write(self, offset: int, length: int) -> None:
        self._check_open()
        if self.read_only:
            raise ReadOnlyError(self.path, "image is open read-only")
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, f"{self.path}: negative offset or length")
        if offset + length > self.virtual_size:
            raise OSError(
                errno.ENOSPC,
                f"{self.path}: write at {offset}+{length} beyond the virtual size "
                f"{self.virtual_size}",
            )

    # -- Image API ---------------------------------------------------------------------

    def layer_status(self, offset: int, length: int) -> Extent:
        self._check_open()
        if offset < 0 or length <= 0 or offset >= self.virtual_size:
            raise OSError(errno.EINVAL, f"{self.path}: bad status range {offset}+{length}")
        length = min(length, self.virtual_size - offset)
        file_size = self._file_size()
        if offset >= file_size:
            return Extent(offset, length, Status.ZERO)
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole up to EOF
                return Extent(offset, length, Status.ZERO)
            return Extent(offset, length, Status.DATA)  # no SEEK_DATA support
        if data > offset:
            return Extent(offset, min(length, data - offset), Status.ZERO)
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = file_size
        return Extent(offset, max(1, min(length, hole - offset)), Status.DATA)

    def read(self, offset: int, length: int) -> bytes:
        """Read the range; bytes past the end of the file (or image) read as zeroes."""
        self._check_open()
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, f"{self.path}: negative offset or length")
        parts: list[bytes] = []
        got = 0
        while got < length:
            chunk = os.pread(self.fd, length - got, offset + got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        if got < length:
            parts.append(bytes(length - got))
        return b"".join(parts)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._check_write(offset, len(view))
        self.bm.mark(offset, len(view))
        head = self._guard_sector0(offset, view, len(view))
        if head is not None:
            self._pwrite_all(offset, memoryview(head))
            offset, view = offset + len(head), view[len(head):]
        self._pwrite_all(offset, view)

    def _pwrite_all(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            n = os.pwrite(self.fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"{self.path}: short write")
            done += n

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._check_write(offset, length)
        if length == 0:
            return
        self.bm.mark(offset, length)
        self._guard_sector0(offset, None, length)
        file_size = self._file_size()
        # Past EOF (inside the 512-byte rounding) the file already reads as zeroes.
        end = min(offset + length, file_size)
        if end <= offset:
            return
        length = end - offset
        if unmap and self._can_punch:
            try:
                fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._can_punch = False
        if self._can_zero_range:
            try:
                fallocate(self.fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._can_zero_range = False
        zeroes = bytes(min(length, _ZERO_CHUNK))
        pos = offset
        while pos < end:
            n = min(end - pos, len(zeroes))
            self.write(pos, zeroes[:n])
            pos += n

    def flush(self) -> None:
        self._check_open()
        if not self.read_only:
            blocking.fdatasync(self.fd)

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        if name is None:
            return
        raise UnsupportedImageError(self.path, "a raw image cannot have a backing file")

    def fileno(self) -> int:
        return self.fd

    def fast_location(self, offset: int, length: int) -> Location | None:
        """Image.fast_location: the file's own bytes (a probed raw image's first sector
        is guarded, so it is never written in place)."""
        if self._closed or offset < 0 or length <= 0 or offset + length > self.virtual_size:
            return None
        if offset + length > self._file_size():
            return None
        writable = (not self.read_only and not self.bm.recording
                    and not (self.probed and offset < PROBE_SIZE))
        return Location(self.fd, offset, writable, 0)

    def may_block(self, op: str, offset: int, length: int) -> bool:
        """A raw file syncs only on flush and close: only a large transfer blocks."""
        return op != "status" and length > blocking.INLINE_COPY

    def info(self) -> dict[str, Any]:
        st = os.fstat(self.fd)
        return {
            "virtual-size": self.virtual_size,
            "filename": self.path,
            "format": "raw",
            "actual-size": st.st_blocks * 512,
            "dirty-flag": False,
        }

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only:
                blocking.fdatasync(self.fd)
        finally:
            self._closed = True
            if self._locked:
                unlock_image(self.fd)
            os.close(self.fd)

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"RawImage({self.path!r}, {mode}, size={self.virtual_size})"


def file_kind(mode: int) -> str | None:
    """None for a regular file or a block device (QEMU's host_device: LVM volumes, loop
    devices), else what it is ('a directory', 'a FIFO', ...)."""
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _open_fd(path: str, flags: int) -> int:
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError(path, "No such file or directory") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory, not an image file") from None
    except OSError as e:
        raise ImageError(path, f"cannot open: {e.strerror}") from None
    kind = file_kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise ImageError(path, f"is {kind}, not a regular file or block device")
    os.set_blocking(fd, True)
    return fd


def open_raw(path: str, *, read_only: bool, force_share: bool = False) -> RawImage:
    """Open a raw image, taking QEMU's locks (none with force_share, read-only only)."""
    path = os.path.abspath(path)
    if force_share and not read_only:
        raise ImageError(path, "force-share is only allowed for read-only opens")
    fd = _open_fd(path, os.O_RDONLY if read_only else os.O_RDWR)
    try:
        if not force_share:
            held, unshared = perms_for(writable=not read_only, metadata=False)
            lock_image(fd, path, held, unshared)
        return RawImage(path, fd, read_only=read_only, locked=not force_share)
    except BaseException:
        os.close(fd)
        raise


def create_raw(path: str, size: int) -> None:
    """Create (or truncate) a raw image of size bytes, rounded up to 512 like qemu-img."""
    if size < 0:
        raise ImageError(path, "image size must not be negative")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as e:
        raise ImageError(path, f"cannot create: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(path, "not a regular file")
        held, unshared = perms_for(writable=True, metadata=False)
        lock_image(fd, path, held, unshared)
        try:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, round_up(size, SECTOR))
            blocking.fsync(fd)
        except OSError as e:
            raise ImageError(path, f"cannot make the image {size} bytes: {e.strerror}") from None
        finally:
            unlock_image(fd)
    finally:
        os.close(fd)
