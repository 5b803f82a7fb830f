"""A bare pyfuse3 + trio server of one raw file, the floor of any pyfuse3 server: the same
mount options and task counts as vdisk, reads and writes straight to os.pread/os.pwrite.

    python passthrough_fs.py FILE MOUNTDIR     (serves FILE as MOUNTDIR/d0)
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

NAME = b"d0"


class PassthroughFS(pyfuse3.Operations):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o644, 1, self.size
        a.attr_timeout = a.entry_timeout = 3600
        return a

    async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent: int, name: bytes, ctx: object = None
                     ) -> pyfuse3.EntryAttributes:
        if name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(2)

    async def opendir(self, inode: int, ctx: object) -> int:
        return inode

    async def readdir(self, fh: int, start: int, token: pyfuse3.ReaddirToken) -> None:
        if start == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(2), 1)

    async def open(self, inode: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(self.fd, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        os.fdatasync(self.fd)


def main() -> None:
    from vdisk.fuse.fs import mount_options
    from vdisk.service.daemon import FUSE_MAX_TASKS, FUSE_MIN_TASKS

    fs = PassthroughFS(sys.argv[1])
    pyfuse3.init(fs, sys.argv[2], mount_options(allow_other=False))
    try:
        trio.run(pyfuse3.main, FUSE_MIN_TASKS, FUSE_MAX_TASKS)
    except* KeyboardInterrupt:
        pass  # SIGINT: how the bench stops it
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
