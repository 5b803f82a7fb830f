"""query-block entries built from an open image chain (QEMU's BlockInfo shape)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vdisk.engine.image import Image


def image_info(top: Image) -> dict[str, Any]:
    """QMP ImageInfo of `top`: its info() with each backing layer nested as "backing-image"."""
    layers: list[dict[str, Any]] = []
    image: Image | None = top
    while image is not None:
        layers.append(dict(image.info()))
        image = image.backing
    for upper, lower in zip(layers, layers[1:], strict=False):
        upper["backing-image"] = lower
    return layers[0]


def chain_depth(top: Image) -> int:
    """The number of backing images below `top`."""
    depth = 0
    image = top.backing
    while image is not None:
        depth += 1
        image = image.backing
    return depth


def block_info(device: str, top: Image, read_only: bool) -> dict[str, Any]:
    """One query-block entry for the drive `device` serving `top` (BlockInfo)."""
    inserted: dict[str, Any] = {
        "file": top.path,
        "drv": top.format_name,
        "ro": read_only,
        "encrypted": False,
        "backing_file_depth": chain_depth(top),
        "detect_zeroes": "off",
        "bps": 0,
        "bps_rd": 0,
        "bps_wr": 0,
        "iops": 0,
        "iops_rd": 0,
        "iops_wr": 0,
        "write_threshold": 0,
        "image": image_info(top),
    }
    if top.backing_name is not None:
        inserted["backing_file"] = top.backing_name
    bitmaps = top.bitmaps.info() if top.bitmaps is not None else []
    if bitmaps:  # QEMU leaves the member out when there are none
        inserted["dirty-bitmaps"] = bitmaps
    return {
        "device": device,
        "locked": False,
        "removable": False,
        "io-status": "ok",
        "inserted": inserted,
    }
