"""open_qcow2: open, lock, validate and refuse unsupported features, without writing."""

from __future__ import annotations

import os
import stat

from vdisk.engine.locking import lock_image, perms_for, unlock_image
from vdisk.engine.qcow2.header import (
    EXT_CRYPTO,
    EXT_DATA_FILE,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    Header,
    parse_header,
)
from vdisk.engine.qcow2.image import Qcow2Image
from vdisk.engine.raw import fd_size
from vdisk.errors import CorruptImageError, ImageError, UnsupportedImageError


def read_header(path: str, fd: int) -> Header:
    """Read and parse the header cluster of an open file (no policy checks)."""
    size = fd_size(fd)
    first = os.pread(fd, 4096, 0)
    cs = 1 << 21
    if len(first) >= 24:
        bits = int.from_bytes(first[20:24], "big")
        if 9 <= bits <= 21:
            cs = 1 << bits
    buf = first if cs <= len(first) else os.pread(fd, cs, 0)
    return parse_header(path, buf, size)


def check_policy(path: str, h: Header, read_only: bool) -> None:
    """Refuse features vdisk does not support (one message naming the file and feature)."""
    if h.crypt_method != 0 or h.ext(EXT_CRYPTO) is not None:
        raise UnsupportedImageError(path, f"encrypted qcow2 images are not supported "
                                          f"(crypt_method {h.crypt_method})")
    if h.incompatible & INCOMPAT_DATA_FILE or h.ext(EXT_DATA_FILE) is not None:
        raise UnsupportedImageError(path, "qcow2 images with an external data file are not "
                                          "supported")
    if h.incompatible & INCOMPAT_CORRUPT and not read_only:
        raise CorruptImageError(path, "image is marked corrupt; open it read-only, or repair "
                                      f"it with 'qemu-img check -r all {path}'")
    if h.incompatible & INCOMPAT_DIRTY and not read_only:
        raise UnsupportedImageError(path, "image has the dirty bit set (lazy refcounts, not "
                                          f"closed cleanly); 'qemu-img check -r all {path}' "
                                          "repairs it")


def _open_fd(path: str, read_only: bool) -> int:
    try:  # O_NONBLOCK: a FIFO must not hang the open
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
                     | os.O_NONBLOCK)
    except IsADirectoryError:
        raise ImageError(path, "is a directory, not an image file") from None
    except OSError as e:
        raise ImageError(path, f"cannot open: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ImageError(path, f"is {what}, not an image file")
    os.set_blocking(fd, True)
    return fd


def open_qcow2(path: str, *, read_only: bool, force_share: bool = False) -> Qcow2Image:
    """Open a qcow2 file; the backing file is not opened (set img.backing afterwards).

    Takes QEMU's locks, unless force_share (read-only only, like qemu-img -U).
    """
    path = os.path.abspath(path)
    if force_share and not read_only:
        raise ImageError(path, "force-share is only allowed for read-only opens")
    fd = _open_fd(path, read_only)
    try:
        if not force_share:
            held, unshared = perms_for(writable=not read_only, metadata=True)
            lock_image(fd, path, held, unshared)
        try:
            h = read_header(path, fd)
            check_policy(path, h, read_only)
            return Qcow2Image(path, fd, h, read_only)
        except BaseException:
            if not force_share:
                unlock_image(fd)
            raise
    except OSError as e:
        os.close(fd)
        raise ImageError(path, f"cannot read image: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
