"""A qcow2 image read through a Reader (a remote source) instead of a local file."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from vdisk.engine.qcow2.fileio import Reader
from vdisk.engine.qcow2.header import parse_header
from vdisk.engine.qcow2.image import Qcow2Image
from vdisk.engine.qcow2.open import check_policy

if TYPE_CHECKING:
    from vdisk.engine.remote import RemoteSource


class SourceQcow2Image(Qcow2Image):
    """A read-only qcow2 image whose file is a Reader: no fd, no locks, no
    copy_file_range; its reads may wait on the network (remote = True)."""

    remote = True

    def data_location(self, offset: int, length: int) -> tuple[int, int, int] | None:
        return None  # no fd to copy from in the kernel

    def may_block(self, op: str, offset: int, length: int) -> bool:
        return True  # metadata and data may have to come over the network

    def remote_location(self, offset: int, length: int) -> tuple[RemoteSource, int, int] | None:
        """Where a prefix of the range lies as plain data in the source (the L2 tables
        it needs are read here, over the network if they are not cached)."""
        found = self.plain_run(offset, length)
        if found is None or self.f.reader is None:
            return None
        return cast("RemoteSource", self.f.reader), *found

    def fileno(self) -> int:
        return super(Qcow2Image, self).fileno()  # Image's: EBADF, there is no descriptor

    def _actual_size(self) -> int | None:
        return None  # qemu-img shows no disk size for a remote file either

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.f.reader is not None:
            self.f.reader.close()


def open_qcow2_source(name: str, reader: Reader) -> Qcow2Image:
    """Open the qcow2 image that reader holds (read-only); name is its display name."""
    first = reader.pread(4096, 0)[:reader.size]
    cs = 1 << 21
    if len(first) >= 24:
        bits = int.from_bytes(first[20:24], "big")
        if 9 <= bits <= 21:
            cs = 1 << bits
    buf = first if cs <= len(first) else reader.pread(cs, 0)[:reader.size]
    h = parse_header(name, buf, reader.size)
    check_policy(name, h, True)
    return SourceQcow2Image(name, -1, h, True, reader=reader)
