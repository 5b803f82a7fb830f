"""The FUSE file system: a root directory with one raw file per drive, named by its id."""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import NoReturn, TypeVar

import pyfuse3
import trio

from vdisk.block.device import BlockDevice
from vdisk.errors import ReadOnlyError, VdiskError

log = logging.getLogger("vdisk.fuse")

T = TypeVar("T")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

TIMEOUT = 3600.0  # attributes never change behind the kernel's back


async def _reraise(e: BaseException) -> NoReturn:
    raise e


async def _call(what: str, fn: Callable[[], Awaitable[T]]) -> T:
    """Run an engine request, turning every failure into a FUSEError."""
    try:
        return await fn()
    except pyfuse3.FUSEError:
        raise
    except OSError as e:
        log.debug("%s: %s", what, e)
        raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
    except ReadOnlyError as e:  # e.g. an image marked corrupt at run time
        log.debug("%s: %s", what, e)
        raise pyfuse3.FUSEError(errno.EROFS) from None
    except VdiskError as e:  # e.g. corruption found at run time: one line, EIO
        log.error("%s: %s", what, e)
        raise pyfuse3.FUSEError(errno.EIO) from None
    except Exception:
        log.exception("%s failed", what)
        raise pyfuse3.FUSEError(errno.EIO) from None


class DriveFS(pyfuse3.Operations):
    """Root directory (inode 1) listing one regular file per drive (inodes 2, 3, ...)."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, devices: Mapping[str, BlockDevice]) -> None:
        super().__init__()
        self._names = list(devices)
        self._by_ino = {pyfuse3.ROOT_INODE + 1 + i: devices[n] for i, n in enumerate(self._names)}
        self._by_name = {n.encode(): pyfuse3.ROOT_INODE + 1 + i for i, n in enumerate(self._names)}
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._time_ns = time.time_ns()
        self.initialized = trio.Event()  # the kernel's INIT request was answered

    def init(self) -> None:
        self.initialized.set()

    def devices(self) -> list[tuple[int, BlockDevice]]:
        """(inode, device) of every drive file."""
        return list(self._by_ino.items())

    def _device(self, inode: int) -> BlockDevice:
        dev = self._by_ino.get(inode)
        if dev is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return dev

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_uid = self._uid
        a.st_gid = self._gid
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._time_ns
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        else:
            dev = self._device(inode)
            a.st_mode = stat.S_IFREG | (0o444 if dev.read_only else 0o600)
            a.st_nlink = 1
            a.st_size = dev.size
            a.st_blocks = -(-dev.size // 512)
        return a

    # -- names ----------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attr(pyfuse3.ROOT_INODE)
        inode = self._by_name.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        current = self._attr(inode)
        if fields.update_size and attr.st_size != current.st_size:
            raise pyfuse3.FUSEError(errno.EPERM)  # a drive never changes size
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return current  # time updates are accepted and ignored

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for i in range(start_id, len(self._names)):
            inode = pyfuse3.ROOT_INODE + 1 + i
            if not pyfuse3.readdir_reply(token, self._names[i].encode(), self._attr(inode), i + 1):
                break

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum(-(-d.size // 4096) for d in self._by_ino.values())
        s.f_bfree = s.f_bavail = 0
        s.f_files = s.f_favail = len(self._names) + 1
        s.f_ffree = 0
        s.f_namemax = 255
        return s

    # The drives are fixed: no names are created, removed or renamed.

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, *args: object) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EPERM)

    # -- data -----------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        dev = self._device(inode)
        if dev.read_only and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        dev = self._device(fh)
        try:  # the common case, without the async layers
            data = dev.read_now(off, size)
        except Exception as e:  # noqa: BLE001 - turned into a FUSEError like _call does
            return await _call(f"{dev.drive_id}: read", partial(_reraise, e))
        if data is not None:
            return data
        return await _call(f"{dev.drive_id}: read", lambda: dev.read(off, size))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        dev = self._device(fh)
        if off + len(buf) > dev.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)  # never grow the drive
        try:  # the common case, without the async layers
            if dev.write_now(off, buf):
                return len(buf)
        except Exception as e:  # noqa: BLE001 - turned into a FUSEError like _call does
            await _call(f"{dev.drive_id}: write", partial(_reraise, e))
        await _call(f"{dev.drive_id}: write", lambda: dev.write(off, buf))
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass  # close() does not imply durability; fsync does

    async def fsync(self, fh: int, datasync: bool) -> None:
        dev = self._device(fh)
        await _call(f"{dev.drive_id}: fsync", dev.flush)

    async def fallocate(self, inode: int, mode: int, off: int, length: int) -> None:
        """PUNCH_HOLE|KEEP_SIZE -> zeroes with unmap; ZERO_RANGE -> zeroes; plain or KEEP_SIZE
        allocation inside the drive is a no-op (the drive is fully provisioned)."""
        dev = self._device(inode)
        if dev.read_only:
            raise OSError(errno.EROFS, "read-only drive")
        if off < 0 or length <= 0:
            raise OSError(errno.EINVAL, "bad range")
        end = off + length
        keep = bool(mode & FALLOC_FL_KEEP_SIZE)
        if end > dev.size and not keep:
            raise OSError(errno.ENOSPC, "fallocate past the end of the drive")
        end = min(end, dev.size)
        kind = mode & ~FALLOC_FL_KEEP_SIZE
        if kind == 0:
            return
        if off >= end:
            return
        if kind == FALLOC_FL_PUNCH_HOLE and keep or kind == FALLOC_FL_ZERO_RANGE:
            unmap = kind == FALLOC_FL_PUNCH_HOLE
            await _call(f"{dev.drive_id}: fallocate",
                        lambda: dev.write_zeroes(off, end - off, unmap=unmap))
        else:
            raise OSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")


    async def lseek(self, inode: int, off: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE (the kernel handles the other whence values itself)."""
        dev = self._device(inode)
        return await _call(f"{dev.drive_id}: lseek", lambda: dev.seek(off, whence))


def mount_options(*, allow_other: bool) -> set[str]:
    """pyfuse3.init options: vdisk's name for stale-mount detection, large requests."""
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=vdisk", "subtype=vdisk"}
    if allow_other:
        opts.add("allow_other")
    return opts
