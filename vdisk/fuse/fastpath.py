"""The compiled FUSE fast path: plain reads and in-place writes served without Python.

Measured first (docs/PERFORMANCE.md, issue 14): a 4 KiB request through pyfuse3 and trio
costs 38-41 us of CPU in a bare passthrough, before vdisk does anything, which is the
floor any Python file system here has. So reading /dev/fuse moves into C
(fastpath.c, built as vdisk.fuse._fastpath): FAST_THREADS reader threads take every
request; a READ or WRITE whose clusters the block layer has published (a cluster table
per drive, vdisk/block/cluster_table.py) is served there with pread/pwrite, never
entering the interpreter nor the event loop; every other request is handed to pyfuse3
unchanged, through an eventfd that pyfuse3 takes for the session fd (its
fuse_session_fd, fuse_session_receive_buf, fuse_session_exit and fuse_session_destroy
calls are redirected through its PLT, as hook.py does for fuse_session_new).

Without the compiled library, or with VDISK_FAST_PATH=0, vdisk runs as before, in pure
Python.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import os
from typing import ClassVar

from vdisk.engine.image import Location
from vdisk.fuse import hook

log = logging.getLogger("vdisk.fuse")

FAST_THREADS = 2  # reader threads: one per core here
MAX_FILES = 16  # file slots per drive (fastpath.c)
_VALID, _WRITE, _ZERO, _SLOT_SHIFT = 1, 2, 4, 3
_INIT_SLOT = 0  # of struct fuse_lowlevel_ops
_PTR = ctypes.sizeof(ctypes.c_void_p)
_STAT_NAMES = ("rd_bytes", "wr_bytes", "rd_operations", "wr_operations",
               "rd_total_time_ns", "wr_total_time_ns", "wr_highest_offset", "last_ns")


class _Stats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in _STAT_NAMES]


def _library_path() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_fastpath" + suffix)
        if os.path.exists(path):
            return path
    return None


class _Lib:
    lib: ClassVar[ctypes.CDLL | None] = None
    installed: ClassVar[bool] = False
    init_fn: ClassVar[int] = 0  # the vdfp_init address


def _load() -> ctypes.CDLL | None:
    path = _library_path()
    if path is None:
        return None
    lib = ctypes.CDLL(path)  # calls release the GIL: a fence may wait for the disk
    u64, i = ctypes.c_uint64, ctypes.c_int
    for name, args, res in (
        ("vdfp_drive_add", [u64, u64, ctypes.c_uint], i),
        ("vdfp_drive_file", [i, i, i], i),
        ("vdfp_set", [i, u64, u64], None),
        ("vdfp_clear", [i, u64, u64], None),
        ("vdfp_fence", [i], None),
        ("vdfp_try_fence", [i], i),
        ("vdfp_reset", [i], None),
        ("vdfp_entry", [i, u64], u64),
        ("vdfp_stats", [i], ctypes.POINTER(_Stats)),
        ("vdfp_drives_clear", [], i),
        ("vdfp_setup", [ctypes.c_void_p] * 5 + [i], None),
    ):
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res
    return lib


def _address(lib: ctypes.CDLL, name: str) -> int:
    addr = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    if addr is None:
        raise OSError(f"no {name}")
    return addr


def _filter_ops(table: ctypes.Array[ctypes.c_char]) -> None:
    """Wrap pyfuse3's init op: requests must be read, not spliced (fastpath.c)."""
    lib = _Lib.lib
    if lib is None or not _Lib.installed:
        return
    cell = ctypes.c_void_p.from_buffer(table, _INIT_SLOT * _PTR)
    real_init = cell.value
    if real_init is None:
        return
    libfuse = ctypes.CDLL("libfuse3.so.3")
    lib.vdfp_setup(
        _address(libfuse, "fuse_session_receive_buf"), _address(libfuse, "fuse_session_exit"),
        _address(libfuse, "fuse_session_destroy"), real_init,
        _address(libfuse, "fuse_session_fd"), FAST_THREADS,
    )
    cell.value = _Lib.init_fn


def install() -> bool:
    """Set the fast path up (before pyfuse3.init, after hook.install); False when it is
    not available here, and vdisk serves every request in Python."""
    if _Lib.installed:
        return True
    if os.environ.get("VDISK_FAST_PATH", "1") == "0":
        log.debug("FUSE fast path off (VDISK_FAST_PATH=0)")
        return False
    if not hook.install():
        return False
    try:
        lib = _load()
        if lib is None:
            log.warning("FUSE fast path unavailable (vdisk/fuse/_fastpath is not built: "
                        "run scripts/setup); serving every request in Python")
            return False
        _Lib.lib = lib
        _Lib.init_fn = _address(lib, "vdfp_init")
        for symbol, ours in (("fuse_session_fd", "vdfp_session_fd"),
                             ("fuse_session_receive_buf", "vdfp_receive"),
                             ("fuse_session_exit", "vdfp_session_exit"),
                             ("fuse_session_destroy", "vdfp_session_destroy")):
            hook.patch_plt(symbol, _address(lib, ours))
    except (OSError, AssertionError, AttributeError, ValueError) as e:
        log.warning("FUSE fast path unavailable: %s", e)
        return False
    hook.add_ops_filter(_filter_ops)
    _Lib.installed = True
    return True


def begin_mount() -> None:
    """Forget the tables of a mount that never ran (before tables for the next one)."""
    if _Lib.lib is not None:
        _Lib.lib.vdfp_drives_clear()


class FastTable:
    """One drive's cluster table in fastpath.c (a vdisk.block.cluster_table.ClusterTable)."""

    def __init__(self, lib: ctypes.CDLL, handle: int, cluster_bits: int) -> None:
        self._lib = lib
        self._h = handle
        self.cluster_bits = cluster_bits
        self._slots: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> file slot

    def known(self, cluster: int) -> bool:
        return bool(self._lib.vdfp_entry(self._h, cluster))

    def _slot(self, fd: int) -> int | None:
        st = os.fstat(fd)  # by identity: a descriptor number may be reused for another file
        key = (st.st_dev, st.st_ino)
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= MAX_FILES:
                return None
            slot = len(self._slots)
            if self._lib.vdfp_drive_file(self._h, slot, fd) < 0:
                return None
            self._slots[key] = slot
        return slot

    def publish(self, cluster: int, loc: Location) -> None:
        if loc.fd < 0:
            entry = _VALID | _ZERO
        else:
            slot = self._slot(loc.fd)
            if slot is None:
                return
            entry = loc.host | slot << _SLOT_SHIFT | _VALID | (_WRITE if loc.writable else 0)
        self._lib.vdfp_set(self._h, cluster, entry)

    def forget(self, first: int, count: int) -> None:
        self._lib.vdfp_clear(self._h, first, count)

    def fence(self) -> None:
        self._lib.vdfp_fence(self._h)

    def try_fence(self) -> bool:
        return bool(self._lib.vdfp_try_fence(self._h))

    def reset(self) -> None:
        self._lib.vdfp_reset(self._h)
        self._slots.clear()

    def counters(self) -> dict[str, int]:
        stats = self._lib.vdfp_stats(self._h)  # NULL once the mount is gone
        if not stats:
            return {}
        s = stats.contents
        return {name: int(getattr(s, name)) for name in _STAT_NAMES}


def table_for(inode: int, size: int, cluster_size: int) -> FastTable | None:
    """A new cluster table for the drive file `inode`, or None without the fast path (or
    for a cluster size it does not take: under 4 KiB)."""
    lib = _Lib.lib
    if lib is None or not _Lib.installed or cluster_size < 4096:
        return None
    bits = cluster_size.bit_length() - 1
    h = lib.vdfp_drive_add(inode, size, bits)
    if h < 0:
        log.warning("inode %d: no fast path (%s)", inode, os.strerror(-h))
        return None
    return FastTable(lib, h, bits)
