"""`vdisk info` JSON as qemu-img info prints it: ImageInfo members put in QAPI schema
order (qapi/block-core.json), then QEMU's QDict order (vdisk.cli._qjson), printed the way
qobject/qjson.c pretty-prints: an empty list or dict still opens a line, strings escape
every code point outside 0x20..0x7E as \\uXXXX (upper-case hex, surrogate pairs beyond
the BMP) and an invalid UTF-8 sequence as \\uFFFD.
"""

from __future__ import annotations

from typing import Any

from vdisk.cli._qjson import qdict_order

IMAGE_INFO = ("filename", "format", "dirty-flag", "actual-size", "virtual-size",
              "cluster-size", "encrypted", "compressed", "backing-filename",
              "full-backing-filename", "backing-filename-format", "snapshots",
              "backing-image", "format-specific")
QCOW2_SPECIFIC = ("compat", "data-file", "data-file-raw", "extended-l2", "lazy-refcounts",
                  "corrupt", "refcount-bits", "encrypt", "bitmaps", "compression-type")
SPECIFIC = ("type", "data")

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
            "\t": "\\t"}


def schema_order(d: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    """d's keys in the schema's order (keys the schema does not name last, as they are)."""
    known = {k: d[k] for k in order if k in d}
    return known | {k: v for k, v in d.items() if k not in known}


def image_info_order(info: dict[str, Any]) -> dict[str, Any]:
    """One ImageInfo (as vdisk.cli.info builds it) in schema order, then QDict order."""
    doc = schema_order(info, IMAGE_INFO)
    spec = doc.get("format-specific")
    if isinstance(spec, dict):
        spec = schema_order(spec, SPECIFIC)
        if spec.get("type") == "qcow2" and isinstance(spec.get("data"), dict):
            spec["data"] = schema_order(spec["data"], QCOW2_SPECIFIC)
        doc["format-specific"] = spec
    return qdict_order(doc)


def _string(s: str) -> str:
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xD800 <= cp <= 0xDFFF:  # a byte surrogateescape kept: not UTF-8
            out.append("\\uFFFD")
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _emit(value: Any, level: int, out: list[str]) -> None:
    pad = "    " * (level + 1)
    if isinstance(value, dict):
        items = [f"\n{pad}{_string(str(k))}: " for k in value]
        out.append("{")
        for i, (head, v) in enumerate(zip(items, value.values(), strict=True)):
            out.append(("," if i else "") + head)
            _emit(v, level + 1, out)
        out.append("\n" + "    " * level + "}")
    elif isinstance(value, list):
        out.append("[")
        for i, v in enumerate(value):
            out.append(("," if i else "") + "\n" + pad)
            _emit(v, level + 1, out)
        out.append("\n" + "    " * level + "]")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    elif isinstance(value, int):
        out.append(str(value))
    elif value is None:
        out.append("null")
    else:
        out.append(_string(str(value)))


def dumps(doc: Any) -> str:
    """doc (already in the order to print) as qemu-img --output=json prints it."""
    out: list[str] = []
    _emit(doc, 0, out)
    return "".join(out)
