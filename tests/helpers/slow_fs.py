"""A file system whose fsync is slow, for the event-loop tests.

slow_sync_file(): serves SRC read-write as MOUNT/disk through FUSE; every fsync and
fdatasync sleeps DELAY seconds before it syncs SRC, as a slow disk or a network file
system would, and is counted in SRC.syncs (one line per sync: its duration); while a file
SRC.slow-reads exists, every read sleeps DELAY seconds too. It runs this module as its own
process:

    python tests/helpers/slow_fs.py SRC MOUNT DELAY

until unmounted or killed. direct_io keeps the kernel from caching: every read and write
reaches this process. POSIX locks are left to the kernel (no lock handlers), so QEMU's
image locks work on the file.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyfuse3
import trio

if __name__ == "__main__":  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.faulty_fs import INO, FaultyFile, run_fs, served_file  # noqa: E402


class SlowSyncFile(FaultyFile):
    def __init__(self, src: str, delay: float) -> None:
        super().__init__(src, (0, 0))
        os.close(self.fd)
        self.fd = os.open(src, os.O_RDWR)
        self.delay = delay
        self.log = src + ".syncs"

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != INO:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return pyfuse3.FileInfo(fh=INO, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if os.path.exists(self.src + ".slow-reads"):
            await trio.sleep(self.delay)
        return os.pread(self.fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        n = os.pwrite(self.fd, buf, off)
        self.size = max(self.size, off + n)
        return n

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            os.ftruncate(self.fd, attr.st_size)
            self.size = attr.st_size
        return await self.getattr(inode)

    async def fsync(self, fh: int, datasync: bool) -> None:
        t0 = time.monotonic()
        await trio.sleep(self.delay)  # the slow disk; other requests go on meanwhile
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, self.fd)
        with open(self.log, "a") as f:
            f.write(f"{time.monotonic() - t0:.3f}\n")

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        return None


def syncs(src: Path) -> list[float]:
    """The durations of the syncs the file system did so far."""
    try:
        return [float(x) for x in Path(str(src) + ".syncs").read_text().split()]
    except FileNotFoundError:
        return []


@contextmanager
def slow_sync_file(tmp_path: Path, src: Path, delay: float, name: str = "slow"
                   ) -> Iterator[Path]:
    """src served as a FUSE file whose syncs take delay seconds more (see above)."""
    with served_file(tmp_path, __file__, [str(src), str(delay)], name) as f:
        yield f


def main() -> None:
    src, mount, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    run_fs(SlowSyncFile(src, delay), mount, {"fsname=slowsync", "default_permissions"})


if __name__ == "__main__":
    main()
