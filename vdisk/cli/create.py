"""`vdisk create`: make a new qcow2 or raw image, like `qemu-img create`."""

from __future__ import annotations

import argparse
import os
from typing import Any

from vdisk.cli._common import UsageError, parse_options, parse_size
from vdisk.engine.chain import (
    FORMATS,
    open_image,
    plain_backing_name,
    probe_servable,
    resolve_backing,
)
from vdisk.engine.raw import SECTOR, create_raw, round_up
from vdisk.engine.remote.images import open_remote
from vdisk.engine.remote.url import is_remote_name, parse, redact
from vdisk.errors import ImageError

_COMPAT = {"0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}
_BOOL = {"on": True, "off": False, "true": True, "false": False}


def qcow2_options(opts: dict[str, str]) -> dict[str, Any]:
    """Validate -o options for qcow2 into create_qcow2 keyword arguments."""
    kw: dict[str, Any] = {}
    for key, value in opts.items():
        if key == "cluster_size":
            cs = parse_size(value, "cluster_size")
            if cs < 512 or cs > 2 << 20 or cs & (cs - 1):
                raise UsageError(
                    f"invalid option cluster_size={value}: must be a power of two "
                    "between 512 and 2M"
                )
            kw["cluster_size"] = cs
        elif key == "compat":
            if value not in _COMPAT:
                raise UsageError(f"invalid option compat={value}: use 0.10 or 1.1")
            kw["compat"] = _COMPAT[value]
        elif key == "refcount_bits":
            if not value.isdigit() or int(value) not in (1, 2, 4, 8, 16, 32, 64):
                raise UsageError(
                    f"invalid option refcount_bits={value}: use a power of two from 1 to 64"
                )
            kw["refcount_bits"] = int(value)
        elif key == "extended_l2":
            if value not in _BOOL:
                raise UsageError(f"invalid option extended_l2={value}: use on or off")
            kw["extended_l2"] = _BOOL[value]
        else:
            raise UsageError(
                f"invalid option '{key}' for qcow2 (cluster_size, compat, refcount_bits, "
                "extended_l2)"
            )
    compat = kw.get("compat", "1.1")
    if compat == "0.10" and kw.get("refcount_bits", 16) != 16:
        raise UsageError("invalid option refcount_bits: compat=0.10 needs refcount_bits=16")
    if kw.get("extended_l2"):
        if compat == "0.10":
            raise UsageError("invalid option extended_l2=on: needs compat=1.1")
        if kw.get("cluster_size", 65536) < 16384:
            raise UsageError("invalid option extended_l2=on: needs cluster_size of 16K or more")
    return kw


def _backing(args: argparse.Namespace, path: str) -> tuple[str | None, int | None]:
    """(backing format, backing virtual size), checking that the backing file opens."""
    name = args.backing
    bfmt = args.backing_format
    if bfmt is not None and bfmt not in FORMATS:
        raise UsageError(f"invalid backing format {bfmt!r} (use qcow2 or raw)")
    if is_remote_name(name):
        spec = parse(name)  # a URL or json: name: must parse, even with -u
        if args.unsafe:
            if bfmt is None:
                raise UsageError("-u needs the backing format (-F)")
            return bfmt, None
        img = open_remote(spec, bfmt, "give -F raw to use it as a raw backing file")
        try:
            return img.format_name, img.virtual_size
        finally:
            img.close()
    if args.unsafe:
        plain_backing_name(args.file, name)
        if bfmt is None:
            raise UsageError("-u needs the backing format (-F)")
        return bfmt, None
    bpath = resolve_backing(path, name)
    if os.path.exists(path) and os.path.samefile(bpath, path):
        raise UsageError(f"{args.file}: an image cannot be its own backing file")
    bfmt = bfmt or probe_servable(bpath, "give -F raw to use it as a raw backing file")
    # like qemu-img: open the backing file alone, read-only, sharing it with its user
    img = open_image(bpath, bfmt, read_only=True, force_share=True)
    try:
        return bfmt, img.virtual_size
    finally:
        img.close()


def run(args: argparse.Namespace) -> int:
    fmt = args.format
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (use qcow2 or raw)")
    opts = parse_options(",".join(args.options or []))
    size = parse_size(args.size, "size") if args.size is not None else None
    path = os.path.abspath(args.file)
    if args.backing_format and not args.backing:
        raise UsageError("-F needs a backing file (-b)")
    if fmt == "raw":
        if args.backing:
            raise UsageError("raw images cannot have a backing file (-b needs -f qcow2)")
        for key in opts:
            raise UsageError(f"invalid option '{key}' for raw (raw has no options)")
        if size is None:
            raise UsageError("the image size is required")
        create_raw(path, round_up(size, SECTOR))
        print(f"Formatting '{args.file}', fmt=raw size={round_up(size, SECTOR)}")
        return 0
    kw = qcow2_options(opts)
    bfmt: str | None = None
    if args.backing:
        bfmt, bsize = _backing(args, path)
        if size is None:
            size = bsize
    if size is None:
        raise UsageError("the image size is required (or give a backing file with -b)")
    size = round_up(size, SECTOR)
    from vdisk.engine.qcow2 import create_qcow2

    try:
        create_qcow2(path, size, backing_name=args.backing, backing_format=bfmt, **kw)
    except ValueError as e:
        raise ImageError(args.file, str(e)) from None
    extra = f" backing_file={redact(args.backing)} backing_fmt={bfmt}" if args.backing else ""
    print(f"Formatting '{args.file}', fmt=qcow2 size={size}{extra}")
    return 0


EPILOG = """\
examples:
  vdisk create -f raw base.raw 64M
  vdisk create -f qcow2 -b base.raw -F raw top.qcow2   # an overlay (size of the base)
  vdisk create -f qcow2 -o cluster_size=64K,extended_l2=on big.qcow2 1T
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "create", help="create a new qcow2 or raw image",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-f", "--format", default="raw", help="qcow2 or raw (default raw)")
    p.add_argument("-b", "--backing", help="backing file name, stored as given")
    p.add_argument("-F", "--backing-format", help="backing file format; probed if omitted")
    p.add_argument("-o", "--options", action="append",
                   help="cluster_size=N,compat=0.10|1.1,refcount_bits=N,extended_l2=on|off")
    p.add_argument("-u", "--unsafe", action="store_true",
                   help="do not open the backing file (needs -F and a size)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("size", metavar="SIZE", nargs="?", help="size, with K/M/G/T suffix")
    p.set_defaults(func=run)
