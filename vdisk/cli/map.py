"""`vdisk map`: where each range of the guest view comes from, like `qemu-img map`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from vdisk.cli._common import (
    UsageError,
    add_owner_check_option,
    layer_names,
    open_top,
    parse_size,
)
from vdisk.cli._qcow2map import HostMapper
from vdisk.engine.chain import close_chain
from vdisk.engine.image import Image, Status
from vdisk.engine.qcow2 import Qcow2Image


@dataclass
class MapEntry:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str

    def mergeable(self, nxt: MapEntry) -> bool:
        """qemu-img's rule: same flags, depth and file, and contiguous host offsets."""
        if (self.zero, self.data, self.depth, self.present, self.filename) != (
            nxt.zero, nxt.data, nxt.depth, nxt.present, nxt.filename
        ):
            return False
        if (self.offset is None) != (nxt.offset is None):
            return False
        return self.offset is None or self.offset + self.length == nxt.offset

    def json(self) -> str:
        text = (
            f'{{ "start": {self.start}, "length": {self.length}, "depth": {self.depth}, '
            f'"present": {_b(self.present)}, "zero": {_b(self.zero)}, "data": {_b(self.data)}'
        )
        if self.offset is not None:
            text += f', "offset": {self.offset}'
        return text + "}"


def _b(flag: bool) -> str:
    return "true" if flag else "false"


def raw_entries(top: Image, names: list[str], start: int, end: int) -> Iterator[MapEntry]:
    """Unmerged entries for [start, end), walking the chain as qemu-img map does."""
    mappers: dict[int, HostMapper] = {}
    try:
        off = start
        while off < end:
            n = end - off
            img, depth = top, 0
            while True:
                n = min(n, img.virtual_size - off)
                ext = img.layer_status(off, n)
                n = min(n, ext.length)
                if ext.status is not Status.UNALLOCATED:
                    present, zero, data = True, ext.status is Status.ZERO, ext.status is Status.DATA
                    break
                below = img.backing
                if below is None or off >= below.virtual_size:
                    present, zero, data = False, True, False  # reads as zeroes
                    break
                img, depth = below, depth + 1
            host: int | None
            if img.format_name == "raw":
                host = off
            else:
                mapper = mappers.get(depth)
                if mapper is None:
                    remote = img.f.pread if img.remote and isinstance(img, Qcow2Image) else None
                    mapper = mappers[depth] = HostMapper(img.path, remote)
                n, host = mapper.host_run(off, n)
            yield MapEntry(off, n, depth, present, zero, data, host, names[depth])
            off += n
    finally:
        for m in mappers.values():
            m.close()


def merged_entries(entries: Iterator[MapEntry], *, human: bool = False) -> Iterator[MapEntry]:
    """Merge neighbours as qemu-img does (human output also folds zero runs together)."""
    cur: MapEntry | None = None
    for e in entries:
        if human and (not e.data or e.zero):
            e.data, e.zero = False, True
        if cur is not None and cur.mergeable(e):
            cur.length += e.length
            continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"


def run(args: argparse.Namespace) -> int:
    start = parse_size(args.start_offset, "--start-offset") if args.start_offset else 0
    top = open_top(args.file, args.format, chain=True, force_share=args.force_share,
                   owner_check=args.backing_owner_check == "on")
    try:
        end = top.virtual_size
        if args.max_length:
            end = min(end, start + parse_size(args.max_length, "--max-length"))
        names = layer_names(top, args.file)
        entries = raw_entries(top, names, start, end)
        out = sys.stdout
        if args.output == "json":
            out.write("[")
            first = True
            for e in merged_entries(entries):
                out.write(("" if first else ",\n") + e.json())
                first = False
            if first:  # an empty range: qemu-img prints one empty entry
                out.write(MapEntry(start, 0, 0, False, False, False, None, "").json())
            out.write("]\n")
        else:
            out.write(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n")
            for e in merged_entries(entries, human=True):
                if e.data and e.offset is None:
                    raise UsageError(
                        f"{args.file}: contains compressed clusters; use --output=json"
                    )
                if e.data and not e.zero:
                    assert e.offset is not None
                    out.write(f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset):<16}"
                              f"{e.filename}\n")
        return 0
    finally:
        close_chain(top)


EPILOG = """\
examples:
  vdisk map top.qcow2
  vdisk map --output json --start-offset 1M --max-length 4M top.qcow2
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "map", help="show where each range of an image's data comes from",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("-f", "--format", help="image format (qcow2 or raw)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open without locks (the image may be in use)")
    p.add_argument("--start-offset", help="first byte to map")
    p.add_argument("--max-length", help="map at most this many bytes")
    add_owner_check_option(p)
    p.set_defaults(func=run)
