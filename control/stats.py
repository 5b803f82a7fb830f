"""query-blockstats: each drive's I/O counters (vdisk.block.stats) in QEMU 7.2's shape.

As in QEMU, the counts belong to the drive (QEMU's BlockBackend): the default answer has
one entry per drive, its top node's counters being the drive's, with the protocol node
below as "parent" and the backing chain nested as "backing". The nodes themselves count
nothing, as in QEMU: with query-nodes=true every node is listed with zero counters
(wr_highest_offset of a drive's top node excepted, as QEMU keeps that one per node).
"""

from __future__ import annotations

from typing import Any

from control.errors import GENERIC_ERROR, QMPError
from control.nodes import Node, NodeNames, NodesBackend
from control.registry import Context, Registry
from vdisk.block.stats import empty_qmp
from vdisk.engine.image import Image


def _file_stats(name: str) -> dict[str, Any]:
    return {
        "node-name": name,
        "stats": empty_qmp(),
        "driver-specific": {"driver": "file", "discard-nb-ok": 0, "discard-nb-failed": 0,
                            "discard-bytes-ok": 0},
    }


def _chain_stats(names: NodeNames, image: Image) -> dict[str, Any]:
    """A node's BlockStats at the drive level: its parent and its backing nested."""
    entry: dict[str, Any] = {"node-name": names.name(image), "stats": empty_qmp(),
                             "parent": _file_stats(names.name(image, True))}
    if image.backing is not None:
        entry["backing"] = _chain_stats(names, image.backing)
    return entry


def drive_stats(names: NodeNames, drive: str) -> dict[str, Any]:
    """The query-blockstats entry of one drive."""
    device = names.drive(drive)
    assert device is not None
    entry: dict[str, Any] = {"device": drive, **_chain_stats(names, device.top)}
    entry["stats"] = device.stats.as_qmp()
    return entry


def node_stats(names: NodeNames, node: Node) -> dict[str, Any]:
    """The query-blockstats query-nodes=true entry of one node."""
    if node.protocol:
        return _file_stats(node.name)
    entry: dict[str, Any] = {"node-name": node.name, "stats": empty_qmp(),
             "parent": _file_stats(names.name(node.image, True))}
    if node.is_top:
        entry["stats"]["wr_highest_offset"] = node.device.stats.counters()["wr_highest_offset"]
    return entry


async def query_blockstats(ctx: Context, args: dict[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(ctx.backend, NodesBackend):
        raise QMPError(GENERIC_ERROR, "this server has no block nodes")
    names = ctx.backend.nodes
    if args.get("query-nodes", False):
        # QEMU walks its node list here in the order opposite to query-named-block-nodes
        return [node_stats(names, node) for node in reversed(list(names.nodes()))]
    return [drive_stats(names, drive) for drive in names.drive_ids()]


def register_stats(registry: Registry) -> None:
    registry.add("query-blockstats", {"*query-nodes": "bool"}, query_blockstats)
