"""JSON as qemu-img prints it: QEMU's QDict order and its pretty printer.

qemu-img builds a QDict from the QAPI struct (members in schema order) and prints it by
walking the dict's 512 hash buckets in order, each bucket newest entry first (qobject/
qdict.c: tdb_hash, QLIST_INSERT_HEAD). So the printed order is a fixed function of the
keys and the schema order, reproduced here; the layout is json.dumps(indent=4)'s.
"""

from __future__ import annotations

import json
from typing import Any

_BUCKETS = 512
_M32 = 0xFFFF_FFFF


def _tdb_hash(name: str) -> int:
    raw = name.encode()
    value = (0x238F13AF * len(raw)) & _M32
    for i, ch in enumerate(raw):
        value = (value + (ch << (i * 5 % 24))) & _M32
    return (1103515243 * value + 12345) & _M32


def qdict_order(d: dict[str, Any]) -> dict[str, Any]:
    """d (in schema order) re-ordered as QEMU prints it; nested dicts and lists too."""
    keyed = [(_tdb_hash(k) % _BUCKETS, -i, k) for i, k in enumerate(d)]
    return {k: _order(d[k]) for _, _, k in sorted(keyed)}


def _order(v: Any) -> Any:
    if isinstance(v, dict):
        return qdict_order(v)
    if isinstance(v, list):
        return [_order(x) for x in v]
    return v


def dumps(doc: Any) -> str:
    """doc (dicts in QAPI schema order) as qemu-img --output=json prints it."""
    return json.dumps(_order(doc), indent=4)
