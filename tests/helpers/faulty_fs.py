"""File systems that fail, for the degradation and stream-fault tests.

faulty_file(): a fault-injecting FUSE file that serves SRC read-only as MOUNT/disk, failing
reads that touch [BAD_START, BAD_END) with EIO, unless the file SRC.ok exists. It runs
this module as its own process:

    python tests/helpers/faulty_fs.py SRC MOUNT BAD_START BAD_END

until unmounted (fusermount3 -u MOUNT) or killed. direct_io keeps the kernel from
caching, so every read reaches this process.

small_tmpfs(): a tmpfs of a few MiB (needs root), to run out of space.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyfuse3
import trio

from vdisk.service.mounts import force_unmount, is_mounted

INO = pyfuse3.ROOT_INODE + 1
NAME = b"disk"


class FaultyFile(pyfuse3.Operations):
    def __init__(self, src: str, bad: tuple[int, int]) -> None:
        super().__init__()
        self.src = src
        self.fd = os.open(src, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.bad = bad

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o755, 2, 0
        elif inode == INO:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o644, 1, self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_blksize = 4096
        return a

    async def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        if parent != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(INO)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, await self.getattr(INO), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != INO:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=INO, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        lo, hi = self.bad
        if off < hi and lo < off + size and not os.path.exists(self.src + ".ok"):
            raise pyfuse3.FUSEError(errno.EIO)
        return os.pread(self.fd, size, off)


@contextmanager
def served_file(tmp_path: Path, script: str, args: list[str], name: str) -> Iterator[Path]:
    """Run `python SCRIPT SRC MOUNT ARGS...` (a FUSE file server of these helpers) with
    MOUNT = tmp_path/name; yields MOUNT/disk once it is there; unmounts and ends it after."""
    from tests.helpers.polling import wait_until  # here: as a script, tests/ is not importable

    mnt = tmp_path / name
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, script, args[0], str(mnt), *args[1:]],
                            stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: is_mounted(mnt) and (mnt / "disk").exists(), timeout=20)
        yield mnt / "disk"
    finally:
        force_unmount(mnt)
        proc.terminate()
        proc.wait(timeout=20)


def run_fs(ops: pyfuse3.Operations, mount: str, options: set[str]) -> None:
    """Serve ops at mount until unmounted (the main of a file server script)."""
    pyfuse3.init(ops, mount, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


@contextmanager
def faulty_file(tmp_path: Path, src: Path, bad: tuple[int, int]) -> Iterator[Path]:
    """A FUSE file with src's bytes whose reads fail with EIO in bad (see above)."""
    with served_file(tmp_path, __file__, [str(src), str(bad[0]), str(bad[1])], "faulty") as f:
        yield f


@contextmanager
def small_tmpfs(path: Path, size: str = "8M") -> Iterator[Path]:
    """A tmpfs of size mounted at path (created) for the block; unmounted after."""
    from tests.helpers.commands import run  # (see faulty_file)

    path.mkdir()
    run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    try:
        yield path
    finally:
        force_unmount(path)


def main() -> None:
    src, mount, lo, hi = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    run_fs(FaultyFile(src, (lo, hi)), mount, {"fsname=eiofuse", "ro"})


if __name__ == "__main__":
    main()
