"""`vdisk info`: what `qemu-img info` says about an image (and its backing chain)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vdisk.cli._common import add_owner_check_option, layer_names, open_top, size_to_str
from vdisk.cli._info_extras import add_extras, snapshot_table, snapshots_of
from vdisk.cli._info_json import dumps, image_info_order
from vdisk.engine.chain import close_chain, iter_chain, path_combine
from vdisk.engine.image import Image
from vdisk.engine.remote.url import redact

_BACKING_KEYS = ("backing-filename", "full-backing-filename", "backing-filename-format")


def layer_info(img: Image, name: str) -> dict[str, Any]:
    """The qemu-img info keys for one opened image, named as the user (or chain) names it,
    in the order qemu-img prints them."""
    info = dict(img.info())
    add_extras(img, info)
    info["filename"] = name
    for key in _BACKING_KEYS:
        info.pop(key, None)
    if img.backing_name:  # (a URL's user:password@ is never shown)
        info["backing-filename"] = redact(img.backing_name)
        info["full-backing-filename"] = redact(path_combine(name, img.backing_name))
        if img.backing_format:
            info["backing-filename-format"] = img.backing_format
    return image_info_order(info)


def _dump(value: Any, indent: int, lines: list[str]) -> None:
    """qemu-img's dump of format-specific data: dashes become spaces, 4-space levels."""
    pad = " " * (4 * indent)
    items = value.items() if isinstance(value, dict) else (
        (f"[{i}]", v) for i, v in enumerate(value)
    )
    for key, val in items:
        label = f"{pad}{str(key).replace('-', ' ')}:"
        if isinstance(val, (dict, list)):
            lines.append(label)
            _dump(val, indent + 1, lines)
        else:
            lines.append(f"{label} {_scalar(val)}")


def _scalar(val: Any) -> str:
    if isinstance(val, bool):
        return "true" if val else "false"
    return str(val)


def human(info: dict[str, Any], img: Image | None = None) -> str:
    """One image's block of `qemu-img info` human output (img: for its snapshot table)."""
    vs = info["virtual-size"]
    actual = info.get("actual-size")
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(vs)} ({vs} bytes)",
        f"disk size: {size_to_str(actual) if actual is not None else 'unavailable'}",
    ]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if img is not None and "snapshots" in info:
        lines += snapshot_table(snapshots_of(img))
    spec = info.get("format-specific")
    if isinstance(spec, dict) and isinstance(spec.get("data"), dict):
        lines.append("Format specific information:")
        _dump(spec["data"], 1, lines)
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    top = open_top(args.file, args.format, chain=args.backing_chain,
                   force_share=args.force_share, owner_check=args.backing_owner_check == "on")
    try:
        layers = list(iter_chain(top)) if args.backing_chain else [top]
        names = layer_names(top, args.file)
        infos = [layer_info(img, names[i]) for i, img in enumerate(layers)]
        if args.output == "json":
            text = dumps(infos if args.backing_chain else infos[0]) + "\n"
        else:
            text = "\n".join(human(i, img) for i, img in zip(infos, layers, strict=True))
    finally:
        close_chain(top)
    sys.stdout.flush()
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))
    return 0


EPILOG = """\
examples:
  vdisk info top.qcow2
  vdisk info --backing-chain --output json top.qcow2
  vdisk info -U /srv/images/vm1.qcow2    # an image a running vdisk or QEMU holds
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "info", help="show an image's format, size and backing file",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("-f", "--format", help="image format (qcow2 or raw); probed if omitted")
    p.add_argument("--backing-chain", action="store_true", help="show every image of the chain")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open without locks (the image may be in use)")
    add_owner_check_option(p)
    p.set_defaults(func=run)
