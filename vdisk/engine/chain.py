"""Backing chains: probing formats, resolving backing names, opening and querying chains.

Backing names are resolved as QEMU does: an absolute name is used as given; a relative
name is relative to the directory of the image that names it (its path as opened, not
normalized); a `file:` prefix means a plain file (QEMU then resolves a relative name
against the current directory). Everything else that is not a plain file is refused.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Iterator

from vdisk.engine.image import Image, Status
from vdisk.engine.raw import QCOW2_MAGIC, RawImage, file_kind, open_raw
from vdisk.errors import ChainError, ImageError, UnsupportedImageError

FORMATS = ("qcow2", "raw")
DEFAULT_MAX_DEPTH = 64
_PROTOCOL = re.compile(r"^([^/:]*):")


def probe_format(path: str) -> str:
    """'qcow2' if the file starts with the qcow2 magic, else 'raw'."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise ImageError(path, "No such file or directory") from None
    except OSError as e:
        raise ImageError(path, f"cannot read: {e.strerror}") from None
    return "qcow2" if head == QCOW2_MAGIC else "raw"


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
            owner, f"backing file name {name[:60]!r} is a json: pseudo-path; only plain files "
            "are supported"
        )
    m = _PROTOCOL.match(name)
    if m:
        if m.group(1) == "file":
            return name[len("file:"):]
        raise ChainError(
            owner, f"backing file {name!r} uses the protocol '{m.group(1)}:'; only plain "
            "files are supported"
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
    plain = plain_backing_name(image_path, backing_name)
    # not normalized: "dir/../x" must go through dir as the kernel resolves it
    if backing_name.startswith("file:"):
        path = os.path.join(os.getcwd(), plain)  # QEMU: relative to the current directory
    else:
        path = path_combine(os.path.abspath(image_path), plain)
    check_plain_file(path, f"backing file {backing_name!r} of {image_path}")
    return path


def check_plain_file(path: str, what: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ChainError(path, f"{what} does not exist") from None
    except OSError as e:
        raise ChainError(path, f"{what}: {e.strerror}") from None
    kind = file_kind(st.st_mode)
    if kind is None:
        return st
    raise ChainError(path, f"{what} is {kind}; only plain files are supported")


def _qcow2_module():  # type: ignore[no-untyped-def]
    try:
        from vdisk.engine import qcow2
    except ImportError:
        return None
    return qcow2


def open_image(path: str, fmt: str, *, read_only: bool, force_share: bool = False) -> Image:
    """Open one file (no backing) with the format driver for fmt."""
    if fmt == "raw":
        return open_raw(path, read_only=read_only, force_share=force_share)
    if fmt != "qcow2":
        raise UnsupportedImageError(path, f"unsupported image format '{fmt}' (qcow2 or raw)")
    if probe_format(path) != "qcow2":
        raise ImageError(path, "not a qcow2 image (no qcow2 magic); is it raw?")
    opener = getattr(_qcow2_module(), "open_qcow2", None)
    if opener is None:
        raise UnsupportedImageError(path, "the qcow2 driver is not available")
    if force_share:
        if read_only and "force_share" not in inspect.signature(opener).parameters:
            return _open_qcow2_unlocked(path)
        return opener(path, read_only=read_only, force_share=True)  # type: ignore[no-any-return]
    return opener(path, read_only=read_only)  # type: ignore[no-any-return]


def _open_qcow2_unlocked(path: str) -> Image:
    """open_qcow2 without taking locks (read-only), from the driver's own open steps."""
    from vdisk.engine.qcow2.image import Qcow2Image
    from vdisk.engine.qcow2.open import check_policy, read_header

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(path, f"cannot open: {e.strerror}") from None
    try:
        h = read_header(path, fd)
        check_policy(path, h, True)
        return Qcow2Image(path, fd, h, True)
    except OSError as e:
        os.close(fd)
        raise ImageError(path, f"cannot read image: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise


def open_chain(
    path: str,
    *,
    fmt: str | None = None,
    read_only: bool = False,
    max_depth: int = DEFAULT_MAX_DEPTH,
    force_share: bool = False,
) -> Image:
    """Open path (format fmt, else probed) and its whole backing chain, backing read-only.

    force_share opens without taking or testing locks (read-only only, like qemu-img -U).
    On any error, everything opened so far is closed again.
    """
    path = os.path.abspath(path)
    st = check_plain_file(path, "image")
    top = open_image(path, fmt or probe_format(path), read_only=read_only,
                     force_share=force_share)
    if fmt is None and isinstance(top, RawImage):
        top.probed = True
    try:
        seen = {(st.st_dev, st.st_ino): path}
        cur: Image = top
        depth = 0
        while cur.backing_name:
            depth += 1
            if depth > max_depth:
                raise ChainError(cur.path, f"backing chain is deeper than {max_depth} images")
            bpath = resolve_backing(cur.path, cur.backing_name)
            bst = os.stat(bpath)
            key = (bst.st_dev, bst.st_ino)
            if key in seen:
                raise ChainError(
                    cur.path, f"backing file {cur.backing_name!r} ({bpath}) makes a loop: "
                    f"it is {seen[key]}, already in the chain"
                )
            seen[key] = bpath
            bfmt = cur.backing_format or probe_format(bpath)
            if bfmt not in FORMATS:
                raise UnsupportedImageError(
                    cur.path, f"backing file {bpath} has unsupported format '{bfmt}'"
                )
            cur.backing = open_image(bpath, bfmt, read_only=True, force_share=force_share)
            cur = cur.backing
        return top
    except BaseException:
        close_chain(top)
        raise


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
