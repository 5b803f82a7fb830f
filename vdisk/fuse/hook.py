"""Give pyfuse3 FUSE fallocate and lseek (SEEK_DATA/SEEK_HOLE) handlers (pyfuse3 3.x has
neither).

pyfuse3 builds its `struct fuse_lowlevel_ops` privately and hands it to libfuse's
`fuse_session_new`. We redirect pyfuse3's PLT slot for that one function (in its
writable .got.plt) to a ctypes shim that copies the ops table, fills in the
`fallocate` and `lseek` slots with our own C-callable callbacks, and calls the real
function.

A callback runs inside `fuse_session_process_buf`, in the trio thread, inside a
pyfuse3 worker task. It schedules an async handler with `spawn` (a nursery's
start_soon, set by the file system) which replies later (fuse_reply_err /
fuse_reply_lseek), as libfuse's low-level API allows. Without a handler the request
gets ENOSYS and the kernel falls back to its own behaviour (EOPNOTSUPP for fallocate,
"all data" for SEEK_DATA/SEEK_HOLE).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pyfuse3

if TYPE_CHECKING:
    from _ctypes import CFuncPtr

log = logging.getLogger("vdisk.fuse")

# Index of `fallocate` in struct fuse_lowlevel_ops (libfuse 3.x, fuse_lowlevel.h):
# init destroy lookup forget getattr setattr readlink mknod mkdir unlink rmdir symlink
# rename link open read write flush release fsync opendir readdir releasedir fsyncdir
# statfs setxattr getxattr listxattr removexattr access create getlk setlk bmap ioctl
# poll write_buf retrieve_reply forget_multi flock fallocate ...
# ... flock fallocate readdirplus copy_file_range lseek
_FALLOCATE_SLOT = 40
_LSEEK_SLOT = 43
_PTR = ctypes.sizeof(ctypes.c_void_p)

FallocateHandler = Callable[[int, int, int, int], Awaitable[None]]
LseekHandler = Callable[[int, int, int], Awaitable[int]]

_SESSION_NEW = ctypes.CFUNCTYPE(
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p
)
_FALLOCATE = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
    ctypes.c_void_p,
)
_LSEEK = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
)


class _State:
    installed = False
    real_new: Callable[..., int] | None = None
    reply_err: Callable[[int, int], int] | None = None
    reply_lseek: Callable[[int, int], int] | None = None
    handler: FallocateHandler | None = None
    lseek_handler: LseekHandler | None = None
    spawn: Callable[..., object] | None = None
    # ctypes callbacks C holds pointers to: keep them alive
    fallocate_cb: CFuncPtr | None = None
    lseek_cb: CFuncPtr | None = None
    shim: CFuncPtr | None = None
    tables: list[object] = []
    # each is called with the copied ops table before libfuse gets it (fastpath.py)
    ops_filters: list[Callable[[ctypes.Array[ctypes.c_char]], None]] = []


def _got_slot(so_path: str, symbol: str) -> int:
    """File-relative address of the PLT GOT slot for `symbol` in the ELF shared object."""
    with open(so_path, "rb") as f:
        elf = f.read()
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise OSError(errno.ENOEXEC, f"{so_path}: not a 64-bit ELF object")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)
    ]
    shstr = sections[struct.unpack_from("<H", elf, 0x3E)[0]]

    def name_at(table: tuple[int, ...], off: int) -> str:
        start = table[4] + off
        return elf[start : elf.index(b"\0", start)].decode()

    for sec in sections:
        if sec[1] != 4 or name_at(shstr, sec[0]) != ".rela.plt":  # SHT_RELA
            continue
        symtab = sections[sec[6]]
        strtab = sections[symtab[6]]
        for off in range(sec[4], sec[4] + sec[5], 24):
            r_offset, r_info, _ = struct.unpack_from("<QQq", elf, off)
            st_name, = struct.unpack_from("<I", elf, symtab[4] + (r_info >> 32) * 24)
            if name_at(strtab, st_name) == symbol:
                return int(r_offset)
    raise OSError(errno.ENOENT, f"{so_path}: no PLT entry for {symbol}")


def _load_base(so_path: str) -> int:
    real = os.path.realpath(so_path)
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16)
    raise OSError(errno.ENOENT, f"{so_path} is not mapped")


def _on_fallocate(req: int, ino: int, mode: int, off: int, length: int, fi: int) -> None:
    try:
        if _State.handler is None or _State.spawn is None:
            raise LookupError("no fallocate handler")
        _State.spawn(_run, req, ino, mode, off, length)
    except BaseException:  # a C callback must never raise
        log.exception("fallocate: cannot schedule request")
        if _State.reply_err is not None:
            _State.reply_err(req, errno.ENOSYS)


async def _run(req: int, ino: int, mode: int, off: int, length: int) -> None:
    assert _State.handler is not None and _State.reply_err is not None
    code = errno.EINTR  # if cancelled: the kernel must still get a reply
    try:
        await _State.handler(ino, mode, off, length)
        code = 0
    except OSError as e:
        code = e.errno or errno.EIO
    except pyfuse3.FUSEError as e:  # an errno on purpose (already logged if need be)
        code = e.errno or errno.EIO
    except Exception:
        code = errno.EIO
        log.exception("fallocate failed")
    finally:
        _State.reply_err(req, code)


def _on_lseek(req: int, ino: int, off: int, whence: int, fi: int) -> None:
    try:
        if _State.lseek_handler is None or _State.spawn is None:
            raise LookupError("no lseek handler")
        _State.spawn(_run_lseek, req, ino, off, whence)
    except BaseException:  # a C callback must never raise
        log.exception("lseek: cannot schedule request")
        if _State.reply_err is not None:
            _State.reply_err(req, errno.ENOSYS)


async def _run_lseek(req: int, ino: int, off: int, whence: int) -> None:
    assert _State.lseek_handler is not None and _State.reply_err is not None
    assert _State.reply_lseek is not None
    code = errno.EINTR  # if cancelled: the kernel must still get a reply
    result = -1
    try:
        result = await _State.lseek_handler(ino, off, whence)
        code = 0
    except OSError as e:
        code = e.errno or errno.EIO
    except pyfuse3.FUSEError as e:
        code = e.errno or errno.EIO
    except Exception:
        code = errno.EIO
        log.exception("lseek failed")
    finally:
        if code:
            _State.reply_err(req, code)
        else:
            _State.reply_lseek(req, result)


def _session_new(args: int, ops: int, op_size: int, userdata: int) -> int:
    table = ctypes.create_string_buffer(max(op_size, (_LSEEK_SLOT + 1) * _PTR))
    ctypes.memmove(table, ops, op_size)
    for slot, cb in ((_FALLOCATE_SLOT, _State.fallocate_cb), (_LSEEK_SLOT, _State.lseek_cb)):
        if cb is not None and (slot + 1) * _PTR <= op_size:  # libfuse reads op_size bytes
            ptr = ctypes.cast(cb, ctypes.c_void_p).value
            ctypes.c_void_p.from_buffer(table, slot * _PTR).value = ptr
    for fn in _State.ops_filters:
        fn(table)
    _State.tables.append(table)  # libfuse copies the table, but keep it anyway
    assert _State.real_new is not None
    return _State.real_new(args, ctypes.addressof(table), op_size, userdata) or 0


def install() -> bool:
    """Patch pyfuse3 once (before pyfuse3.init); False if that is not possible here."""
    if _State.installed:
        return True
    if hasattr(pyfuse3.Operations, "fallocate"):
        log.warning("pyfuse3 %s has its own fallocate: not patching it", pyfuse3.__version__)
        return False
    try:
        lib = ctypes.CDLL("libfuse3.so.3")
        real = ctypes.cast(lib.fuse_session_new, ctypes.c_void_p).value
        if real is None:
            raise OSError("libfuse3 has no fuse_session_new")
        _State.real_new = _SESSION_NEW(real)
        reply = lib.fuse_reply_err
        reply.argtypes = [ctypes.c_void_p, ctypes.c_int]
        reply.restype = ctypes.c_int
        _State.reply_err = reply
        reply_lseek = lib.fuse_reply_lseek
        reply_lseek.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        reply_lseek.restype = ctypes.c_int
        _State.reply_lseek = reply_lseek
        _State.fallocate_cb = _FALLOCATE(_on_fallocate)
        _State.lseek_cb = _LSEEK(_on_lseek)
        _State.shim = shim = _SESSION_NEW(_session_new)
        target = ctypes.cast(shim, ctypes.c_void_p).value
        assert target is not None
        patch_plt("fuse_session_new", target)
    except (OSError, AssertionError, AttributeError, ValueError, struct.error) as e:
        log.warning("fallocate and SEEK_DATA/SEEK_HOLE support unavailable: %s", e)
        return False
    _State.installed = True
    return True


def add_ops_filter(fn: Callable[[ctypes.Array[ctypes.c_char]], None]) -> None:
    """Let fn change the ops table (a copy of pyfuse3's) before fuse_session_new."""
    if fn not in _State.ops_filters:
        _State.ops_filters.append(fn)


def patch_plt(symbol: str, target: int) -> None:
    """Point pyfuse3's PLT slot for the libfuse function symbol at target (a C function's
    address). Raises OSError (or AssertionError) when the slot cannot be found."""
    so_path = pyfuse3.__file__
    assert so_path is not None
    slot = _load_base(so_path) + _got_slot(so_path, symbol)
    ctypes.c_void_p.from_address(slot).value = target


def set_handler(
    handler: FallocateHandler | None,
    spawn: Callable[..., object] | None,
    lseek: LseekHandler | None = None,
) -> None:
    """Route fallocate requests to handler(ino, mode, offset, length) and lseek requests to
    lseek(ino, offset, whence) -> offset, each run as a task via spawn."""
    _State.handler = handler
    _State.lseek_handler = lseek
    _State.spawn = spawn
