"""QEMU-compatible image locking (block/file-posix.c's protocol).

One-byte open-file-description (OFD) read locks: byte 100+i means "I hold
permission i", byte 200+i means "I do not share permission i". Before taking a
lock, test whether another open file description holds the opposite byte.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from vdisk.errors import LockError

PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
_ALL_PERMS = (0, 1, 2, 3)
HOLD_BASE = 100
UNSHARE_BASE = 200

# struct flock on Linux x86_64/aarch64: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (+ padding).
_FLOCK = "hhqqi4x"


def _flock(ltype: int, start: int) -> bytes:
    return struct.pack(_FLOCK, ltype, os.SEEK_SET, start, 1, 0)


def _conflicts(fd: int, byte: int) -> bool:
    """True if another open file description holds a lock on `byte`."""
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    ltype: int = struct.unpack(_FLOCK, res)[0]
    return ltype != fcntl.F_UNLCK


def _set(fd: int, byte: int, ltype: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(ltype, byte))


def perms_for(*, writable: bool, metadata: bool = True) -> tuple[set[int], set[int]]:
    """(held, unshared) permissions as QEMU takes them for an image file.

    A format with metadata (qcow2) never shares write or resize of its file; a
    writer also needs write and resize itself.
    """
    held = {PERM_CONSISTENT_READ}
    if writable:
        held |= {PERM_WRITE, PERM_RESIZE} if metadata else {PERM_WRITE}
    unshared = {PERM_WRITE, PERM_RESIZE}
    return held, unshared


def lock_image(fd: int, path: str, held: set[int], unshared: set[int]) -> None:
    """Take QEMU's locks for (held, unshared) on fd, or raise LockError naming the holder's use."""
    for i in sorted(held):
        if _conflicts(fd, UNSHARE_BASE + i):
            raise LockError(
                path,
                f"image is in use by another process (QEMU or vdisk), which does not share "
                f"the '{PERM_NAMES[i]}' permission; stop it first",
            )
    for i in sorted(unshared):
        if _conflicts(fd, HOLD_BASE + i):
            raise LockError(
                path,
                f"image is in use by another process (QEMU or vdisk) that holds the "
                f"'{PERM_NAMES[i]}' permission; stop it first",
            )
    try:
        for i in sorted(held):
            _set(fd, HOLD_BASE + i, fcntl.F_RDLCK)
        for i in sorted(unshared):
            _set(fd, UNSHARE_BASE + i, fcntl.F_RDLCK)
    except OSError as e:
        unlock_image(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise LockError(path, "image is locked by another process") from None
        raise LockError(path, f"cannot lock image: {os.strerror(e.errno or 0)}") from None


def unlock_image(fd: int) -> None:
    """Release every lock byte vdisk may hold on fd."""
    for base in (HOLD_BASE, UNSHARE_BASE):
        for i in _ALL_PERMS:
            try:
                _set(fd, base + i, fcntl.F_UNLCK)
            except OSError:
                pass
