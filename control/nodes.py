"""Node names: every image of every drive's chain has one, fixed when the chain opens.

Each image is two nodes, as in QEMU: its format node (qcow2/raw, the chain) and the
protocol node below it (driver "file"). A name is either given (`--drive
node-name=top,backing.node-name=mid,file.node-name=top-file` or the same keys in a
[[drive]] table) or made up as `#DRIVE.DEPTH` (`#DRIVE.DEPTH.file` for the protocol
node), DEPTH counted from the top (0) when the daemon opened the chain. A name stays
with its image for the daemon's life: after a stream drops images from a chain, the
images left keep their names (also when their depth changed).

query-named-block-nodes lists the nodes; `find_node` and `stream_target` resolve the
names block-stream takes (its `device` and `base-node`).
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from control.blockinfo import auto_node_name, file_node_info, node_info
from control.errors import GENERIC_ERROR, QMPError
from control.registry import Context, Registry
from vdisk.block.device import BlockDevice
from vdisk.engine.chain import iter_chain
from vdisk.engine.image import Image
from vdisk.errors import VdiskError

NodeKey = tuple[int, bool]  # (depth, protocol node?)


def node_key_text(key: NodeKey) -> str:
    """The option that names `key`: "backing.file.node-name" (the inverse of
    vdisk.service.config.parse_node_key, where the options are read)."""
    depth, protocol = key
    return "backing." * depth + ("file." if protocol else "") + "node-name"


@dataclass(frozen=True)
class Node:
    """A named node found in a live chain."""

    name: str
    drive: str
    device: BlockDevice
    image: Image
    depth: int  # in the live chain now
    protocol: bool  # the protocol ("file") node under image

    @property
    def is_top(self) -> bool:
        return self.depth == 0 and not self.protocol


class NodeNames:
    """The names of the daemon's nodes, by image; the drives whose chains hold them."""

    def __init__(self) -> None:
        self._names: weakref.WeakKeyDictionary[Image, tuple[str, str]] = (
            weakref.WeakKeyDictionary())
        self._drives: dict[str, BlockDevice] = {}
        self._taken: set[str] = set()

    def add_drive(self, drive: str, device: BlockDevice, given: Mapping[NodeKey, str],
                  reserved: Collection[str] = ()) -> None:
        """Name every node of `device`'s chain: the `given` names, else made-up ones.
        VdiskError if a given name is taken (by another node or, in `reserved`, a drive
        id) or names an image the chain does not have."""
        chain = device.chain()
        for key, name in given.items():
            if key[0] >= len(chain):
                raise VdiskError(f"drive {drive}: {node_key_text(key)}={name}: the chain of "
                                 f"{device.top.path} has no image at depth {key[0]}")
        names: list[tuple[str, str]] = []
        new: set[str] = set()
        for depth in range(len(chain)):
            pair = []
            for protocol in (False, True):
                name = given.get((depth, protocol)) or auto_node_name(drive, depth, protocol)
                if name in self._taken or name in new:
                    raise VdiskError(f"drive {drive}: duplicate node name '{name}'")
                if name in reserved:
                    raise VdiskError(f"drive {drive}: node name '{name}' is the id of a drive")
                new.add(name)
                pair.append(name)
            names.append((pair[0], pair[1]))
        for image, names_of in zip(chain, names, strict=True):
            self._names[image] = names_of
        self._taken |= new
        self._drives[drive] = device

    def drive(self, drive: str) -> BlockDevice | None:
        """The device of the drive `drive`, or None."""
        return self._drives.get(drive)

    def drive_ids(self) -> list[str]:
        return list(self._drives)

    def name(self, image: Image, protocol: bool = False) -> str:
        """The node name of `image` (of its protocol node with protocol)."""
        return self._names[image][protocol]

    def nodes(self) -> Iterator[Node]:
        """Every node of every live chain: drive by drive, each chain from its bottom
        image up, each format node before its protocol node (QEMU's order)."""
        for drive, device in self._drives.items():
            chain = list(iter_chain(device.top))
            for depth in range(len(chain) - 1, -1, -1):
                image = chain[depth]
                for protocol in (False, True):
                    yield Node(self.name(image, protocol), drive, device, image, depth,
                               protocol)

    def find(self, name: str) -> Node | None:
        """The node called `name` in a live chain, or None."""
        return next((n for n in self.nodes() if n.name == name), None)

    def node_info(self, node: Node, *, flat: bool = False) -> dict[str, Any]:
        """The node's BlockDeviceInfo (query-named-block-nodes)."""
        ro = node.device.read_only if node.depth == 0 else True
        if node.protocol:
            return file_node_info(node.image, node.name, ro)
        return node_info(node.image, node.name, ro, flat=flat)


@runtime_checkable
class NodesBackend(Protocol):
    """A backend whose drives have node names (the daemon)."""

    nodes: NodeNames


def _names(ctx: Context) -> NodeNames:
    if not isinstance(ctx.backend, NodesBackend):
        raise QMPError(GENERIC_ERROR, "this server has no block nodes")
    return ctx.backend.nodes


def stream_target(backend: object, device: str, base: str | None, base_node: str | None,
                  backing_file: str | None = None) -> tuple[str, str | None, str | None]:
    """block-stream's (drive id, base, backing-file) from its device, base, base-node and
    backing-file arguments: `device` is a drive id or the node name of a drive's top
    image; base-node, the node name of an image below it, becomes a base that find_base
    resolves (its path) and, as in QEMU, the name written into the top's header unless
    backing-file is given. A device that names no drive or node is returned as it is
    (the caller reports it)."""
    if base is not None and base_node is not None:
        raise QMPError(GENERIC_ERROR, "'base' and 'base-node' cannot be specified at the "
                       "same time")
    names = backend.nodes if isinstance(backend, NodesBackend) else None
    drive = device
    if names is not None and names.drive(device) is None:
        node = names.find(device)
        if node is not None and not node.is_top:
            raise QMPError(GENERIC_ERROR, f"Node '{device}' is not the top image of a drive: "
                           "vdisk streams into a drive's top image only")
        if node is not None:
            drive = node.drive
    if base_node is None:
        return drive, base, backing_file
    found = names.find(base_node) if names is not None else None
    if found is None:
        raise QMPError(GENERIC_ERROR, f"Cannot find device='' nor node-name='{base_node}'")
    if found.drive != drive or found.protocol or found.depth == 0:
        raise QMPError(GENERIC_ERROR,
                       f"Node '{base_node}' is not a backing image of '{device}'")
    path = found.image.path
    return drive, path, path if backing_file is None else backing_file


async def query_named_block_nodes(ctx: Context, args: dict[str, Any]) -> list[dict[str, Any]]:
    names = _names(ctx)
    flat = bool(args.get("flat", False))
    return [names.node_info(node, flat=flat) for node in names.nodes()]


def register_nodes(registry: Registry) -> None:
    registry.add("query-named-block-nodes", {"*flat": "bool"}, query_named_block_nodes)
