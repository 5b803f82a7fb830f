"""Giving start-up memory back to the system once the daemon serves.

Start-up (argument parsing, opening chains, the first QMP and FUSE set-up) leaves freed
blocks in glibc's heap that it keeps for reuse; an idle daemon does not need them.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os

log = logging.getLogger(__name__)


def release_unused() -> int:
    """Collect cyclic garbage and return the free parts of the C heap to the kernel
    (glibc's malloc_trim); the bytes of RSS that gave back, or 0 where there is no glibc."""
    gc.collect()
    before = _rss()
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own libc (no ldconfig run)
    except (OSError, AttributeError):
        return 0
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    freed = max(0, before - _rss())
    log.debug("returned %d KiB of unused heap to the system", freed >> 10)
    return freed


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
