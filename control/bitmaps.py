"""The dirty bitmap QMP commands, answering as qemu-storage-daemon 7.2 does:
block-dirty-bitmap-add {node, name, *granularity, *persistent, *disabled},
block-dirty-bitmap-remove {node, name}, block-dirty-bitmap-clear {node, name}.
query-block lists the bitmaps (control/blockinfo.py).

`node` names a drive by its id; `find_node` is the one place that resolves it, so node
names can be added there.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from control.errors import GENERIC_ERROR, QMPError
from control.registry import Context, Registry
from vdisk.engine.dirty_bitmap import BitmapError

UINT32_MAX = (1 << 32) - 1


class BitmapDevice(Protocol):
    """What the commands need of a drive (vdisk.block.device.BlockDevice)."""

    async def bitmap_op(self, op: str, *args: Any, **kwargs: Any) -> None: ...


@runtime_checkable
class BitmapBackend(Protocol):
    def block_device(self, drive_id: str) -> Any: ...


def find_node(ctx: Context, node: str) -> BitmapDevice | None:
    """The drive that `node` names (a drive id for now), or None."""
    backend = ctx.backend
    if not isinstance(backend, BitmapBackend):
        return None
    dev: BitmapDevice | None = backend.block_device(node)
    return dev


async def _run(dev: BitmapDevice, op: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        await dev.bitmap_op(op, *args, **kwargs)
    except BitmapError as e:
        raise QMPError(GENERIC_ERROR, str(e)) from None
    except OSError as e:
        raise QMPError(GENERIC_ERROR, f"Failed to update bitmap extension: "
                                      f"{e.strerror or e}") from None
    return {}


async def _add(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    node, name = args["node"], args["name"]
    granularity = args.get("granularity")
    if granularity is not None and not 0 <= granularity <= UINT32_MAX:
        raise QMPError(GENERIC_ERROR, "Parameter 'granularity' expects uint32_t")
    if not name:
        raise QMPError(GENERIC_ERROR, "Bitmap name cannot be empty")
    dev = find_node(ctx, node)
    if dev is None:
        raise QMPError(GENERIC_ERROR, f"Cannot find device='{node}' nor node-name='{node}'")
    return await _run(dev, "add", node, name, granularity,
                      persistent=args.get("persistent", False),
                      disabled=args.get("disabled", False))


def _lookup(ctx: Context, node: str) -> BitmapDevice:
    dev = find_node(ctx, node)
    if dev is None:
        raise QMPError(GENERIC_ERROR, f"Node '{node}' not found")
    return dev


async def _remove(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return await _run(_lookup(ctx, args["node"]), "remove", args["name"])


async def _clear(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return await _run(_lookup(ctx, args["node"]), "clear", args["name"])


def register_bitmaps(registry: Registry) -> None:
    """Add the dirty bitmap commands to `registry`."""
    registry.add("block-dirty-bitmap-add",
                 {"node": "str", "name": "str", "*granularity": "int", "*persistent": "bool",
                  "*disabled": "bool"}, _add)
    registry.add("block-dirty-bitmap-remove", {"node": "str", "name": "str"}, _remove)
    registry.add("block-dirty-bitmap-clear", {"node": "str", "name": "str"}, _clear)
