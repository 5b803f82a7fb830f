"""The engine's calls that may sleep on the disk, and one hook that watches them.

Every fdatasync/fsync the engine makes, and every copy of more than INLINE_COPY bytes,
goes through here. The engine itself is thread-agnostic; the layer above installs a
`check` (vdisk.block.loop_guard) that refuses such a call on its event-loop thread, so
a code path that would stall every drive and the QMP socket fails loudly in the tests
instead of slowly in production.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview

# Bytes an engine call may move on the event-loop thread: one FUSE request (1 MiB).
# Measured here (2 cores): a 1 MiB pread from the page cache takes 41 us inline and 239 us
# through trio.to_thread (the hop alone: 137 us), and pyfuse3 writes the request's reply
# from the loop thread anyway; with 128 KiB, 1 MiB reads and writes through FUSE lost a
# third of their speed (1,850 -> 1,220 MiB/s). Larger copies (stream steps, copy-up
# pieces of up to 16 MiB) and every sync belong in a worker thread.
INLINE_COPY = 1 << 20

Check = Callable[[str], None]
_check: Check | None = None


def set_check(check: Check | None) -> Check | None:
    """Install check(what) to be called before every blocking call; returns the old one."""
    global _check
    old, _check = _check, check
    return old


def about_to_block(what: str) -> None:
    """Tell the hook that a call that may sleep on the disk is about to run."""
    if _check is not None:
        _check(what)


def fdatasync(fd: int) -> None:
    about_to_block("fdatasync")
    os.fdatasync(fd)


def fsync(fd: int) -> None:
    about_to_block("fsync")
    os.fsync(fd)


def pwritev_direct(fd: int, bufs: Sequence[Buffer], offset: int) -> int:
    """os.pwritev on an O_DIRECT fd: it waits for the device."""
    about_to_block("O_DIRECT write")
    return os.pwritev(fd, bufs, offset)


def copy_file_range(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
    """os.copy_file_range; a copy of more than INLINE_COPY bytes counts as blocking."""
    if count > INLINE_COPY:
        about_to_block(f"copy_file_range of {count} bytes")
    return os.copy_file_range(src, dst, count, offset_src, offset_dst)
