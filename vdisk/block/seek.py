"""lseek's SEEK_DATA / SEEK_HOLE over a block device's guest view."""

from __future__ import annotations

import errno
import os
from functools import partial
from typing import TYPE_CHECKING

import trio

from vdisk.engine.chain import chain_status
from vdisk.engine.image import Status
from vdisk.errors import oserror

if TYPE_CHECKING:
    from vdisk.block.device import BlockDevice


async def seek_in(dev: BlockDevice, offset: int, whence: int) -> int:
    """The offset SEEK_DATA / SEEK_HOLE gives. A hole is a range known to read as zeroes
    (zero clusters, or nothing in the chain holds it); the end is a hole."""
    if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
        raise oserror(errno.EINVAL, f"whence {whence}")
    if offset < 0 or offset >= dev.size:
        raise oserror(errno.ENXIO, "offset past the end")
    want_data = whence == os.SEEK_DATA
    off = offset
    steps = 0
    while off < dev.size:
        n = dev.size - off
        if dev.remote is not None:
            run, _, status = await dev.remote.status(dev.top, off, n, None)
        else:
            run, _, status = await dev.engine_call(partial(dev.chain_blocks, "status", off, n),
                                                   chain_status, dev.top, off, n)
        if (status is Status.DATA) == want_data:
            return off
        off += run
        steps += 1
        if steps % 64 == 0:
            await trio.lowlevel.checkpoint()  # a very fragmented image: let others run
    if want_data:
        raise oserror(errno.ENXIO, "no data after the offset")
    return dev.size
