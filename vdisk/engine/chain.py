"""Backing chains: probing formats, resolving backing names, opening and querying chains.

Backing names are resolved as QEMU does: an absolute name is used as given; a relative
name is relative to the directory of the image that names it (its path as opened, not
normalized); a `file:` prefix means a plain file (QEMU then resolves a relative name
against the current directory). Everything else that is not a plain file is refused.

Two rules protect against images made by someone else:

* Probing never serves a damaged or foreign image as raw: a file that QEMU would open as
  another format, that still carries a qcow2 header without its magic, or that is named
  like another format's image (.qcow2, .vmdk, ...) is refused unless its format is given.
* The owner check: a backing file must be readable by the owner of every image above it
  in the chain (their uid and groups, not the daemon's), or the operator must turn the
  check off for that chain (`backing-owner-check=off`). Otherwise whoever can hand vdisk
  an image could read any file vdisk can read, through the drive.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from vdisk.engine import qcow2
from vdisk.engine.access import Creds, Denied, checked_stat, creds_of
from vdisk.engine.image import Image, Status
from vdisk.engine.probe import QCOW2_MAGIC, damaged_qcow2, detect_format, named_format, read_head
from vdisk.engine.raw import file_kind, open_raw
from vdisk.engine.remote.images import open_remote
from vdisk.engine.remote.url import SourceSpec, is_remote_name, parse, redact, resolve_under
from vdisk.errors import ChainError, ImageError, UnsupportedImageError

FORMATS = ("qcow2", "raw")
DEFAULT_MAX_DEPTH = 64
FORMAT_HINT = "give the format (raw) explicitly to open it as raw"
OWNER_CHECK_HINT = "backing-owner-check=off allows it"
_PROTOCOL = re.compile(r"^([^/:]*):")


def _head(path: str) -> bytes:
    try:
        return read_head(path)
    except FileNotFoundError:
        raise ImageError(path, "No such file or directory") from None
    except OSError as e:
        raise ImageError(path, f"cannot read: {e.strerror}") from None


def probe_format(path: str) -> str:
    """The format the file's first sector says, as QEMU probes it: 'qcow2', 'raw', or
    another format QEMU knows ('vmdk', 'luks', ...). See probe_servable for opening."""
    return detect_format(_head(path)) or "raw"


def probe_servable(path: str, hint: str = FORMAT_HINT) -> str:
    """The probed format of path for opening it: 'qcow2' or 'raw'.

    Raises ImageError (one line, ending with hint: what to do to open it as raw anyway)
    for a file that probes as a format vdisk does not serve, and for one that probes as
    raw but is a damaged qcow2 (the header without its magic) or is named like another
    format's image: serving those as raw would show garbage, and writes would destroy
    what is left of their metadata.
    """
    head = _head(path)
    fmt = detect_format(head)
    if fmt == "qcow2":
        return fmt
    if fmt is not None:
        raise UnsupportedImageError(
            path, f"probed as a {fmt} image, a format vdisk does not serve (qcow2 and raw "
            f"only); {hint}"
        )
    remains = damaged_qcow2(head)
    if remains:
        raise ImageError(
            path, f"not a qcow2 image (bad magic), though the rest of a qcow2 header is "
            f"there ({remains}); {hint}"
        )
    named = named_format(path)
    if named:
        what = "bad magic" if named in ("qcow2", "qcow") else f"no {named} signature"
        raise ImageError(path, f"not a {named} image ({what}), though named like one; {hint}")
    return "raw"


def path_combine(base: str, name: str) -> str:
    """QEMU's path_combine: name relative to the directory part of base, unnormalized."""
    if name.startswith("/") or _PROTOCOL.match(name):
        return name
    cut = base.rfind("/") + 1
    return base[:cut] + name


def plain_backing_name(owner: str, name: str) -> str:
    """Strip a `file:` prefix; refuse json: and other protocols. Returns a path."""
    if not name:
        raise ChainError(owner, "empty backing file name")
    if name.startswith("json:"):
        raise ChainError(
            owner, f"backing file name {redact(name)[:60]!r} is a json: pseudo-path; only "
            "plain files are supported"
        )
    m = _PROTOCOL.match(name)
    if m:
        if m.group(1) == "file":
            return name[len("file:"):]
        raise ChainError(
            owner, f"backing file {redact(name)!r} uses the protocol '{m.group(1)}:'; only "
            "plain files are supported"
        )
    return name


def backing_display_name(image_name: str, backing_name: str) -> str:
    """The full backing file name as qemu-img info prints it (full-backing-filename)."""
    return path_combine(image_name, backing_name)


def resolve_backing(image_path: str, backing_name: str) -> str:
    """The absolute path of the plain file backing_name names, as QEMU resolves it.

    Raises ChainError (naming image_path) for json:/protocol names, missing files,
    directories, devices, FIFOs and sockets.
    """
    path = backing_path(image_path, backing_name)
    check_image_file(path, f"backing file {backing_name!r} of {image_path}")
    return path


def backing_path(image_path: str, backing_name: str) -> str:
    """The absolute path backing_name names (json:/protocols refused), not yet checked."""
    plain = plain_backing_name(image_path, backing_name)
    # not normalized: "dir/../x" must go through dir as the kernel resolves it
    if backing_name.startswith("file:"):
        return os.path.join(os.getcwd(), plain)  # QEMU: relative to the current directory
    return path_combine(os.path.abspath(image_path), plain)


@dataclass(frozen=True)
class Owner:
    """The owner of an image in a chain, whose rights bound what its backing files may be."""

    creds: Creds
    image: str  # the first image of the chain (top first) that this user owns


def owner_of(st: os.stat_result, image: str) -> Owner | None:
    """The Owner to check backing files against, or None when that is trivial: root may
    read anything, and the daemon's own uid is checked by the kernel at open."""
    if st.st_uid in (0, os.geteuid()):
        return None
    return Owner(creds_of(st.st_uid), image)


def check_owners(image_path: str, backing_name: str, target: str, owners: Sequence[Owner],
                 want: int = os.R_OK) -> os.stat_result | None:
    """Refuse target (what backing_name of image_path resolves to) unless every owner
    could open it for want: os.R_OK for files and block devices; for a UNIX socket that a
    URL names (nbd+unix, later), connecting needs os.W_OK on it. Returns the stat of what
    was checked (None if nothing to check, or target does not exist)."""
    found = None
    for owner in owners:
        try:
            found = checked_stat(target, owner.creds, want)
        except Denied as e:
            whose = "this image" if owner.image == image_path else owner.image
            raise ChainError(
                image_path, f"backing file {backing_name!r} ({target}) is refused: "
                f"{owner.creds.name}, who owns {whose}, could not open it ({e}); "
                f"{OWNER_CHECK_HINT}"
            ) from None
    return found


def check_image_file(path: str, what: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ChainError(path, f"{what} does not exist") from None
    except OSError as e:
        raise ChainError(path, f"{what}: {e.strerror}") from None
    kind = file_kind(st.st_mode)
    if kind is None:
        return st
    raise ChainError(path, f"{what} is {kind}; only plain files and block devices are "
                           "supported")


def open_image(path: str, fmt: str, *, read_only: bool, force_share: bool = False) -> Image:
    """Open one file (no backing) with the format driver for fmt."""
    if fmt == "raw":
        return open_raw(path, read_only=read_only, force_share=force_share)
    if fmt != "qcow2":
        raise UnsupportedImageError(path, f"unsupported image format '{fmt}' (qcow2 or raw)")
    if not _head(path).startswith(QCOW2_MAGIC):
        raise ImageError(path, "not a qcow2 image (no qcow2 magic); is it raw?")
    return qcow2.open_qcow2(path, read_only=read_only, force_share=force_share)


def _file_key(img: Image) -> tuple[int, int]:
    """(st_dev, st_ino) of the file img has open."""
    st = os.fstat(img.fileno())
    return st.st_dev, st.st_ino


def open_chain(
    path: str,
    *,
    fmt: str | None = None,
    read_only: bool = False,
    max_depth: int = DEFAULT_MAX_DEPTH,
    force_share: bool = False,
    backing_owner_check: bool = True,
    format_hint: str = FORMAT_HINT,
) -> Image:
    """Open path (format fmt, else probed) and its whole backing chain, backing read-only.

    force_share opens without taking or testing locks (read-only only, like qemu-img -U).
    backing_owner_check: refuse a backing file that the owner of an image above it could
    not read (see the module docstring). format_hint ends the error for a top image that
    probing refuses to open as raw. Every image whose format was probed has probed=True.
    On any error, everything opened so far is closed again.
    """
    path = os.path.abspath(path)
    st = check_image_file(path, "image")
    top = open_image(path, fmt or probe_servable(path, format_hint), read_only=read_only,
                     force_share=force_share)
    top.probed = fmt is None
    try:
        owners: list[Owner] = []
        seen: dict[object, str] = {(st.st_dev, st.st_ino): path}
        cur: Image = top
        cur_st: os.stat_result | None = st  # None for a remote image
        cur_spec: SourceSpec | None = None  # how a remote image was reached
        depth = 0
        while cur.backing_name:
            if backing_owner_check and cur_st is not None:
                owner = owner_of(cur_st, cur.path)
                if owner is not None and owner.creds.uid not in {o.creds.uid for o in owners}:
                    owners.append(owner)
            depth += 1
            if depth > max_depth:
                raise ChainError(cur.path, f"backing chain is deeper than {max_depth} images")
            if cur_spec is not None or is_remote_name(cur.backing_name):
                cur_spec, backing = _open_remote_backing(cur, cur_spec, owners, seen)
                cur.backing = backing
                cur, cur_st = backing, None
                continue
            assert cur.backing_name  # (mypy: the continue above loses the narrowing)
            bpath = backing_path(cur.path, cur.backing_name)
            checked = check_owners(cur.path, cur.backing_name, bpath, owners)
            check_image_file(bpath, f"backing file {cur.backing_name!r} of {cur.path}")
            bst = os.stat(bpath)
            key = (bst.st_dev, bst.st_ino)
            if key in seen:
                raise ChainError(
                    cur.path, f"backing file {cur.backing_name!r} ({bpath}) makes a loop: "
                    f"it is {seen[key]}, already in the chain"
                )
            seen[key] = bpath
            hint = (f"name its format in {cur.path} (qemu-img rebase -u -F raw -b "
                    f"{cur.backing_name!r}) to use it as raw")
            bfmt = cur.backing_format or probe_servable(bpath, hint)
            if bfmt not in FORMATS:
                raise UnsupportedImageError(
                    cur.path, f"backing file {bpath} has unsupported format '{bfmt}'"
                )
            cur.backing = backing = open_image(bpath, bfmt, read_only=True,
                                               force_share=force_share)
            backing.probed = not cur.backing_format
            if checked is not None and _file_key(backing) != (checked.st_dev, checked.st_ino):
                raise ChainError(
                    cur.path, f"backing file {cur.backing_name!r} ({bpath}) was replaced "
                    "while it was being opened"
                )
            cur, cur_st = backing, bst
        return top
    except BaseException:
        close_chain(top)
        raise


def _open_remote_backing(cur: Image, spec: SourceSpec | None, owners: Sequence[Owner],
                         seen: dict[object, str]) -> tuple[SourceSpec, Image]:
    """Open the backing file that cur names by URL or json: name (or, under a remote
    image, by a name relative to its URL): its spec and the image, read-only."""
    assert cur.backing_name is not None
    name = cur.backing_name if spec is None else resolve_under(spec, cur.backing_name)
    bspec = parse(name)
    if bspec.socket_path is not None:  # connecting to a socket needs write permission
        check_owners(cur.path, redact(cur.backing_name), bspec.socket_path, owners, os.W_OK)
    if bspec.key in seen:
        raise ChainError(cur.path, f"backing file {bspec.display!r} makes a loop: it is "
                                   f"already in the chain")
    seen[bspec.key] = bspec.display
    hint = (f"name its format in {cur.path} (qemu-img rebase -u -F raw -b ...) to use it "
            "as raw")
    backing = open_remote(bspec, cur.backing_format, hint)
    backing.probed = not cur.backing_format and bspec.format is None
    return bspec, backing


def iter_chain(top: Image) -> Iterator[Image]:
    """The images of the chain, top first."""
    img: Image | None = top
    while img is not None:
        yield img
        img = img.backing


def close_chain(top: Image) -> None:
    """Close every image of the chain (top first); the first error is re-raised at the end."""
    first: BaseException | None = None
    for img in list(iter_chain(top)):
        try:
            img.close()
        except BaseException as e:  # noqa: BLE001 - keep closing the rest
            first = first or e
    if first is not None:
        raise first


def chain_status(
    top: Image, offset: int, length: int, *, base: Image | None = None
) -> tuple[int, int | None, Status]:
    """Which layer holds the run at offset (at most length bytes) of the top's view.

    Returns (run_length, depth, status): depth 0 is the top; status DATA or ZERO. A range
    past the end of a shorter backing image reads as zeroes and counts as held, as ZERO,
    by that shorter image. depth is None if no layer above base holds the run: status is
    then ZERO without base (it reads as zeroes) and UNALLOCATED with base (it reads from
    base). One layer_status call per layer.
    """
    if offset < 0 or length <= 0 or offset >= top.virtual_size:
        raise ValueError(f"bad range {offset}+{length} for size {top.virtual_size}")
    n = min(length, top.virtual_size - offset)
    depth = 0
    img: Image | None = top
    while img is not None and img is not base:
        if offset >= img.virtual_size:
            return n, depth, Status.ZERO
        n = min(n, img.virtual_size - offset)
        ext = img.layer_status(offset, n)
        n = min(n, ext.length)
        if ext.status is not Status.UNALLOCATED:
            return n, depth, ext.status
        img = img.backing
        depth += 1
    if base is None:
        return n, None, Status.ZERO
    if img is None:
        raise ValueError("base is not in the chain")
    return n, None, Status.UNALLOCATED


def full_backing_filename(image: Image) -> str | None:
    """The resolved absolute path of image's backing file, or None without one."""
    if not image.backing_name:
        return None
    if image.backing is not None:
        return image.backing.path
    return resolve_backing(image.path, image.backing_name)
