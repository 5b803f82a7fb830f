"""Could another user open this path? The kernel's permission rules, evaluated for a uid.

A backing file name is chosen by whoever wrote the image. If vdisk (often root) opened it
with its own rights, the image's owner could name a file only root may read, and read it
through the drive. So the chain opener asks, for every backing file, whether the owner of
each image above it could have opened it: `access_problem(path, creds)`.

The check follows the kernel's path walk (search permission on every directory, symbolic
links followed as the kernel follows them, `..` taken physically) and its permission
check (owner, group and other mode bits, POSIX access ACLs with their mask). Not modelled:
capabilities the owner's processes might hold, LSMs (SELinux, AppArmor) and mount
options; they can only narrow what the owner may read, never let vdisk read more.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
import struct
from dataclasses import dataclass

MAX_SYMLINKS = 40  # the kernel's limit on links followed in one path walk
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_WANT_NAMES = {os.R_OK: "read", os.W_OK: "write", os.X_OK: "search"}


@dataclass(frozen=True)
class Creds:
    """A user as the kernel sees its processes: uid and all its groups."""

    uid: int
    gids: frozenset[int]
    name: str  # "nobody (uid 65534)", or "uid 1234" without a passwd entry


def creds_of(uid: int) -> Creds:
    """uid's credentials from the passwd and group databases (its primary group and
    every supplementary group). A uid without a passwd entry gets no groups at all."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return Creds(uid, frozenset(), f"uid {uid}")
    try:
        gids = frozenset(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except OSError:
        gids = frozenset({pw.pw_gid})
    return Creds(uid, gids, f"{pw.pw_name} (uid {uid})")


def _acl(path: str) -> list[tuple[int, int, int]] | None:
    """The access ACL of path as (tag, perm, id) entries, or None if it has none."""
    try:
        raw = os.getxattr(path, _ACL_XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise
    if len(raw) < 4 or (len(raw) - 4) % 8 or struct.unpack_from("<I", raw)[0] != _ACL_VERSION:
        raise OSError(errno.EIO, f"{path}: unreadable POSIX ACL")
    return [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw), 8)]


def _acl_allows(acl: list[tuple[int, int, int]], st: os.stat_result, creds: Creds,
                want: int) -> bool:
    """The kernel's posix_acl_permission for a non-owner (the owner uses the mode bits)."""
    mask = next((perm for tag, perm, _ in acl if tag == _MASK), 7)
    found = False
    for tag, perm, ident in acl:
        if tag == _USER and ident == creds.uid:
            return perm & mask & want == want
        if (tag == _GROUP_OBJ and st.st_gid in creds.gids) or (
                tag == _GROUP and ident in creds.gids):
            found = True
            if perm & want == want:
                return perm & mask & want == want
        if tag == _OTHER:
            return not found and perm & want == want
    return False


def may(path: str, st: os.stat_result, creds: Creds, want: int) -> bool:
    """Whether creds may access path (already stat()ed, not a symlink) for want, one of
    os.R_OK, os.W_OK, os.X_OK, as the kernel's generic_permission decides it."""
    if creds.uid == 0:
        return True  # (capabilities; execute on plain files needs an x bit, not asked here)
    mode = st.st_mode
    if creds.uid == st.st_uid:
        return (mode >> 6) & want == want
    if mode & 0o070:  # the kernel looks at an ACL only when the group class has rights
        acl = _acl(path)
        if acl is not None:
            return _acl_allows(acl, st, creds, want)
    bits = (mode >> 3) if st.st_gid in creds.gids else mode
    return bits & want == want


class Denied(Exception):
    """creds could not open the path; str() says where the walk stopped."""


def checked_stat(path: str, creds: Creds, want: int = os.R_OK) -> os.stat_result | None:
    """The stat of what path (absolute) names, if creds could open it for want.

    Raises Denied naming the directory or file that stops creds, e.g. "no search
    permission on /root". None when the path does not lead to a file for anyone (missing,
    a non-directory in the middle): the caller's own checks report that. Comparing the
    result with the opened file's fstat closes the race of a path changed in between.
    """
    todo = [c for c in path.split("/") if c]
    cur = "/"
    links = 0
    try:
        while todo:
            if not may(cur, os.stat(cur), creds, os.X_OK):
                raise Denied(f"no search permission on {cur}")
            comp = todo.pop(0)
            if comp == ".":
                continue
            if comp == "..":
                cur = os.path.dirname(cur)
                continue
            nxt = os.path.join(cur, comp)
            st = os.lstat(nxt)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise Denied(f"too many symbolic links in {path}")
                target = os.readlink(nxt)
                todo[:0] = [c for c in target.split("/") if c]
                if target.startswith("/"):
                    cur = "/"
                continue
            if todo and not stat.S_ISDIR(st.st_mode):
                return None  # ENOTDIR, for everyone
            cur = nxt
        st = os.stat(cur)
        if not may(cur, st, creds, want):
            raise Denied(f"no {_WANT_NAMES.get(want, 'access')} permission on {cur}")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Denied(f"cannot check {path}: {e.strerror}") from None
    return st


def access_problem(path: str, creds: Creds, want: int = os.R_OK) -> str | None:
    """Why creds could not open path (absolute) for want, or None if they could (or if it
    does not exist)."""
    try:
        checked_stat(path, creds, want)
    except Denied as e:
        return str(e)
    return None
