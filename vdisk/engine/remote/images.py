"""Format drivers on a remote source: raw (RemoteRawImage) and qcow2 (the qcow2 driver
reading its file through the source). Remote images are read-only, have no file
descriptor (so no copy_file_range from them), and say `remote = True`: any read of
them may wait on the network.
"""

from __future__ import annotations

import errno
import urllib.parse
from typing import Any

from vdisk.engine import qcow2
from vdisk.engine.image import Extent, Image, Status
from vdisk.engine.probe import PROBE_SIZE, damaged_qcow2, detect_format, named_format
from vdisk.engine.remote import RemoteSource, open_source
from vdisk.engine.remote.url import SourceSpec
from vdisk.errors import ImageError, ReadOnlyError, UnsupportedImageError

SECTOR = 512
RAW_CLUSTER_SIZE = 65536


class RemoteRawImage(Image):
    """A raw image on a remote source: the source's bytes are the guest disk."""

    format_name = "raw"
    remote = True

    def __init__(self, source: RemoteSource) -> None:
        self.source = source
        self.path = source.url
        self.read_only = True
        self.virtual_size = -(-source.size // SECTOR) * SECTOR  # as QEMU: 512-rounded
        self.cluster_size = RAW_CLUSTER_SIZE
        self.backing = None
        self.backing_name = None
        self.backing_format = None
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(errno.EBADF, f"{self.path}: image is closed")

    def layer_status(self, offset: int, length: int) -> Extent:
        self._check_open()
        if offset < 0 or length <= 0 or offset >= self.virtual_size:
            raise OSError(errno.EINVAL, f"{self.path}: bad status range {offset}+{length}")
        length = min(length, self.virtual_size - offset)
        if offset >= self.source.size:  # the 512-byte rounding past the end
            return Extent(offset, length, Status.ZERO)
        found = self.source.block_status(offset, min(length, self.source.size - offset))
        if found is None:
            return Extent(offset, length, Status.DATA)
        run, zero = found
        return Extent(offset, max(1, min(run, length)), Status.ZERO if zero else Status.DATA)

    def read(self, offset: int, length: int) -> bytes:
        self._check_open()
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, f"{self.path}: negative offset or length")
        return self.source.pread(length, offset)

    def read_into(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.read(offset, len(buf))

    def may_block(self, op: str, offset: int, length: int) -> bool:
        return True  # every call may wait on the network (block status too)

    def remote_location(self, offset: int, length: int) -> tuple[RemoteSource, int, int] | None:
        if offset < 0 or length <= 0 or offset >= self.source.size:
            return None
        return self.source, offset, min(length, self.source.size - offset)

    def _refuse(self) -> ReadOnlyError:
        return ReadOnlyError(self.path, "a remote image is read-only")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raise self._refuse()

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        raise self._refuse()

    def flush(self) -> None:
        self._check_open()

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        if name is not None:
            raise UnsupportedImageError(self.path, "a raw image cannot have a backing file")

    def info(self) -> dict[str, Any]:
        return {"virtual-size": self.virtual_size, "filename": self.path, "format": "raw",
                "dirty-flag": False}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.source.close()

    def __repr__(self) -> str:
        return f"RemoteRawImage({self.path!r}, size={self.virtual_size})"


def probe_remote(source: RemoteSource, hint: str) -> str:
    """The probed format of a remote image: 'qcow2' or 'raw'; refuses what probing refuses
    for a local file (another format, a damaged qcow2, a name like another format's)."""
    head = source.pread(PROBE_SIZE, 0)
    fmt = detect_format(head)
    if fmt == "qcow2":
        return fmt
    if fmt is not None:
        raise UnsupportedImageError(source.url, f"probed as a {fmt} image, a format vdisk "
                                                f"does not serve (qcow2 and raw only); {hint}")
    remains = damaged_qcow2(head)
    if remains:
        raise ImageError(source.url, f"not a qcow2 image (bad magic), though the rest of a "
                                     f"qcow2 header is there ({remains}); {hint}")
    named = named_format(urllib.parse.urlsplit(source.url).path)
    if named:
        raise ImageError(source.url, f"not a {named} image, though named like one; {hint}")
    return "raw"


def open_remote(spec: SourceSpec, fmt: str | None, hint: str) -> Image:
    """Connect to spec and open the image there as fmt (spec.format first, else probed).

    ImageError(redacted url, reason) for every failure; the source is closed again."""
    source = open_source(spec)
    try:
        fmt = spec.format or fmt or probe_remote(source, hint)
        if fmt == "raw":
            return RemoteRawImage(source)
        if fmt != "qcow2":
            raise UnsupportedImageError(source.url, f"unsupported image format '{fmt}'")
        if not qcow2.is_qcow2(source.pread(PROBE_SIZE, 0)):
            raise ImageError(source.url, "not a qcow2 image (no qcow2 magic); is it raw?")
        return qcow2.open_qcow2_source(source.url, source)
    except OSError as e:
        source.close()
        raise ImageError(spec.display, f"cannot read the image: {e.strerror or e}") from None
    except BaseException:
        source.close()
        raise
