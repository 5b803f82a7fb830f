"""Helpers shared by the image subcommands (create, info, map, check)."""

from __future__ import annotations

import argparse
import math
import os
import re

from vdisk.engine.chain import (
    FORMATS,
    check_image_file,
    open_chain,
    open_image,
    path_combine,
    probe_servable,
)
from vdisk.engine.image import Image
from vdisk.engine.remote.url import redact
from vdisk.errors import LockError, VdiskError

_SUFFIXES = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]?)\s*$")
MAX_SIZE = (1 << 63) - 1


class UsageError(VdiskError):
    """A bad command-line argument; the message names it."""


def parse_size(text: str, what: str = "size") -> int:
    """A size like qemu-img takes it: bytes, or a number with a K/M/G/T/P/E suffix."""
    m = _SIZE.match(text)
    if not m or m.group(2).upper() not in _SUFFIXES:
        raise UsageError(
            f"invalid {what} {text!r}: use a number of bytes with an optional "
            "K, M, G, T, P or E suffix"
        )
    number, suffix = m.group(1), m.group(2).upper()
    scale = 1 << (10 * _SUFFIXES[suffix])
    if "." in number:
        if scale == 1:
            raise UsageError(f"invalid {what} {text!r}: a byte count must be a whole number")
        value = int(float(number) * scale)
    else:
        value = int(number) * scale
    if value > MAX_SIZE:
        raise UsageError(f"invalid {what} {text!r}: too large")
    return value


def size_to_str(value: int) -> str:
    """QEMU's size_to_str: '388 KiB', '4 MiB', '1.5 GiB'."""
    suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = int((exp - 1) / 10)  # C division truncates toward zero
    return f"{value / (1 << (i * 10)):0.3g} {suffixes[i]}B"


def parse_options(text: str) -> dict[str, str]:
    """-o a=b,c=d (several -o joined with commas) into a dict; a bare key means 'on'."""
    opts: dict[str, str] = {}
    for item in text.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        opts[key.strip()] = value.strip() if sep else "on"
    return opts


def layer_names(top: Image, given: str) -> list[str]:
    """Each layer's file name as qemu-img prints it, top first, starting from the name given."""
    names = [given]
    img = top
    while img.backing is not None and img.backing_name:
        full = path_combine(names[-1], img.backing_name)
        names.append(full[len("file:"):] if full.startswith("file:") else redact(full))
        img = img.backing
    return names


FORMAT_HINT = "give -f raw to open it as raw"
FORCE_SHARE_HINT = "-U (--force-share) inspects it read-only without taking locks"


def add_owner_check_option(p: argparse.ArgumentParser) -> None:
    """--backing-owner-check on|off (see vdisk.engine.chain and docs/SECURITY.md)."""
    p.add_argument(
        "--backing-owner-check", choices=("on", "off"), default="on",
        help="off: also open backing files that the owner of an image above them could "
        "not read (default on: such chains are refused)",
    )


def lock_hint(e: LockError) -> LockError:
    """e, with the hint that -U inspects a locked image (for read-only commands)."""
    return LockError(e.path, f"{e.reason}; {FORCE_SHARE_HINT}")


def open_top(path: str, fmt: str | None, *, chain: bool, force_share: bool,
             owner_check: bool = True) -> Image:
    """Open read-only for inspection: the whole chain, or only the named file."""
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (use qcow2 or raw)")
    try:
        if chain:
            return open_chain(path, fmt=fmt, read_only=True, force_share=force_share,
                              backing_owner_check=owner_check, format_hint=FORMAT_HINT)
        apath = os.path.abspath(path)
        check_image_file(apath, "image")
        return open_image(apath, fmt or probe_servable(apath, FORMAT_HINT), read_only=True,
                          force_share=force_share)
    except LockError as e:
        raise lock_hint(e) from None
