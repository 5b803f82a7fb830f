"""`vdisk create`: make a new qcow2 or raw image, like `qemu-img create`."""

from __future__ import annotations

import argparse
import os
import sys
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
_PREALLOC = ("off", "metadata", "falloc", "full")
QCOW2_HELP = """Supported qcow2 options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  compression_type=<str> - Compression method used for image cluster compression
  extended_l2=<bool (on/off)> - Extended L2 tables
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
"""
RAW_HELP = """Supported raw options:
  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)
  size=<size>            - Virtual disk size
"""


def formatting_line(name: str, fmt: str, size: int, opts: dict[str, str],
                    backing: str | None, bfmt: str | None) -> str:
    """qemu-img's "Formatting ..." line: its options in qemu-img's order, defaults shown."""
    if fmt == "raw":
        extra = f" preallocation={opts['preallocation']}" if "preallocation" in opts else ""
        return f"Formatting '{name}', fmt=raw size={size}{extra}"
    items: list[tuple[str, str | None]] = [
        ("cluster_size", str(parse_size(opts["cluster_size"])) if "cluster_size" in opts
         else "65536"),
        ("extended_l2", opts.get("extended_l2", "off")),
        ("preallocation", opts.get("preallocation")),
        ("compression_type", opts.get("compression_type", "zlib")),
        ("size", str(size)), ("compat", opts.get("compat")),
        ("backing_file", backing), ("backing_fmt", bfmt),
        ("lazy_refcounts", opts.get("lazy_refcounts", "off")),
        ("refcount_bits", str(int(opts["refcount_bits"])) if "refcount_bits" in opts
         else "16"),
    ]
    body = " ".join(f"{k}={v}" for k, v in items if v is not None)
    return f"Formatting '{name}', fmt=qcow2 {body}"


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
        elif key in ("extended_l2", "lazy_refcounts"):
            if value not in _BOOL:
                raise UsageError(f"invalid option {key}={value}: use on or off")
            kw[key] = _BOOL[value]
        elif key == "compression_type":
            if value not in ("zlib", "zstd"):
                raise UsageError(f"invalid option compression_type={value}: use zlib or zstd")
            kw[key] = value
        elif key == "preallocation":
            if value not in _PREALLOC:
                raise UsageError(f"invalid option preallocation={value}: use off, metadata, "
                                 "falloc or full")
            kw[key] = value
        elif key in ("backing_file", "backing_fmt", "size"):
            pass  # taken by run()
        else:
            raise UsageError(f"invalid option '{key}' for qcow2 (see -o help)")
    compat = kw.get("compat", "1.1")
    if compat == "0.10" and (kw.get("lazy_refcounts") or kw.get("compression_type", "zlib")
                             != "zlib"):
        raise UsageError("invalid options: lazy_refcounts and compression_type=zstd need "
                         "compat=1.1")
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


def _raw_prealloc(path: str, size: int, mode: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if mode == "falloc" and size:
            os.posix_fallocate(fd, 0, size)
        elif mode == "full":
            chunk = bytes(min(size, 1 << 20))
            for pos in range(0, size, len(chunk) or 1):
                os.pwrite(fd, chunk[:min(len(chunk), size - pos)], pos)
        os.fsync(fd)
    finally:
        os.close(fd)


def run(args: argparse.Namespace) -> int:
    fmt = args.format
    opts = parse_options(",".join(args.options or []))
    if opts.get("help") == "on" or "?" in opts:
        sys.stdout.write((RAW_HELP if fmt == "raw" else QCOW2_HELP)
                         + "\nThe protocol level may support further options.\n"
                         "Specify the target filename to include those options.\n")
        return 0
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (use qcow2 or raw)")
    if args.file is None:
        raise UsageError("the image file name is required")
    if "size" in opts and args.size is None:
        args.size = opts["size"]
    args.backing = args.backing or opts.get("backing_file")
    args.backing_format = args.backing_format or opts.get("backing_fmt")
    size = parse_size(args.size, "size") if args.size is not None else None
    path = os.path.abspath(args.file)
    if args.backing_format and not args.backing:
        raise UsageError("-F needs a backing file (-b)")
    if args.backing and not args.backing_format:
        raise UsageError(f"{args.file}: backing file specified without backing format "
                         "(give -F raw or -F qcow2, as qemu-img 7.2 requires)")
    if fmt == "raw":
        if args.backing:
            raise UsageError("raw images cannot have a backing file (-b needs -f qcow2)")
        for key, value in opts.items():
            if key == "preallocation" and value in ("off", "falloc", "full"):
                continue
            if key != "size":
                raise UsageError(f"invalid option '{key}' for raw (see -o help)")
        if size is None:
            raise UsageError("the image size is required")
        create_raw(path, round_up(size, SECTOR))
        _raw_prealloc(path, round_up(size, SECTOR), opts.get("preallocation", "off"))
        if not args.quiet:
            print(formatting_line(args.file, "raw", size, opts, None, None))
        return 0
    kw = qcow2_options(opts)
    bfmt: str | None = None
    if args.backing:
        bfmt, bsize = _backing(args, path)
        if size is None:
            size = bsize
    if size is None:
        raise UsageError("the image size is required (or give a backing file with -b)")
    shown = size  # qemu-img prints the size asked for, and rounds the image's up to 512
    size = round_up(size, SECTOR)
    from vdisk.engine.qcow2 import create_qcow2

    try:
        create_qcow2(path, size, backing_name=args.backing, backing_format=bfmt, **kw)
    except ValueError as e:
        raise ImageError(args.file, str(e)) from None
    if not args.quiet:
        backing = redact(args.backing) if args.backing else None
        print(formatting_line(args.file, "qcow2", shown, opts, backing, bfmt))
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
                   help="options as qemu-img's (-o help lists them)")
    p.add_argument("-u", "--unsafe", action="store_true",
                   help="do not open the backing file (needs -F and a size)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.add_argument("file", metavar="FILE", nargs="?")
    p.add_argument("size", metavar="SIZE", nargs="?", help="size, with K/M/G/T suffix")
    p.set_defaults(func=run)
