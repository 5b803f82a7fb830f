"""The QMP socket's security: where it may live, how it is bound, and who may use it.

The socket is made 0600 from creation on, in a directory only its owner (us or root)
can write, else serving is refused; a stale socket file nobody listens on is replaced.
Peers are checked with SO_PEERCRED: only our uid and root are served.
"""

from __future__ import annotations

import os
import socket as stdsocket
import stat
import struct

import trio

from vdisk.errors import VdiskError


def remove_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse a live socket or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise VdiskError(f"{path}: exists and is not a socket")
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError as e:
        raise VdiskError(f"{path}: cannot check the existing socket: {e.strerror or e}") from e
    finally:
        probe.close()
    raise VdiskError(f"{path}: another server is listening on this socket")


def check_socket_dir(path: str) -> None:
    """Refuse a socket directory that another user could write to (or that they own).

    Another user able to create names there could race the socket's name (clients would
    talk to their server) or swap the socket for a symlink between bind and chmod. /tmp
    itself is refused too: the sticky bit protects existing names, not free ones.
    """
    parent = os.path.dirname(path) or "."
    try:
        st = os.stat(parent)
    except OSError as e:
        raise VdiskError(f"{path}: directory {parent}: {e.strerror or e}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise VdiskError(f"{path}: {parent} is not a directory")
    if st.st_uid not in (os.getuid(), 0):
        raise VdiskError(
            f"{path}: directory {parent} belongs to uid {st.st_uid}; use a directory of your own"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise VdiskError(
            f"{path}: directory {parent} is writable by other users "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); use a private directory"
        )


async def bind_socket(path: str, backlog: int = 128) -> trio.socket.SocketType:
    """A listening UNIX socket at `path`, mode 0600 from creation on, in a private dir."""
    if len(os.fsencode(path)) >= 108:
        raise VdiskError(f"{path}: socket path too long (at most 107 bytes)")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise VdiskError(f"{path}: directory {parent} does not exist")
    check_socket_dir(path)
    remove_stale_socket(path)
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise VdiskError(f"{path}: cannot listen: {e.strerror or e}") from e
    except BaseException:
        sock.close()
        raise
    return sock


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a UNIX socket."""
    raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_allowed(uid: int) -> bool:
    """Only our own uid and root may use the control socket."""
    return uid == os.getuid() or uid == 0


def remove_if_ours(path: str, identity: tuple[int, int]) -> None:
    """Unlink path if it is still the socket we bound (device, inode), not a newer one."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except OSError:
        pass
