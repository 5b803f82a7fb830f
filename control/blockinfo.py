"""query-block and query-named-block-nodes entries (QEMU 7.2's BlockInfo and
BlockDeviceInfo shapes) built from an open image chain.

vdisk opens each image file once, but QEMU shows two nodes for it: the format node
(qcow2 or raw, with the backing chain) and the protocol node below it (driver "file",
the host file itself). vdisk lists both, so that tools written for QEMU find what they
look for; their names come from control.nodes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vdisk.engine.image import Image

# vdisk acknowledges a write once the image has it (not yet durable: a flush makes it
# so), through the host page cache: QEMU's cache.writeback=on, direct=off.
CACHE = {"writeback": True, "direct": False, "no-flush": False}


def image_info(top: Image, *, flat: bool = False) -> dict[str, Any]:
    """QMP ImageInfo of `top`: its info() with each backing layer nested as
    "backing-image" (none with flat, as query-named-block-nodes flat=true)."""
    layers: list[dict[str, Any]] = []
    image: Image | None = top
    while image is not None:
        info = dict(image.info())
        if image.backing is not None:  # the backing file as resolved and opened
            info["full-backing-filename"] = image.backing.path
        layers.append(info)
        image = None if flat else image.backing
    for upper, lower in zip(layers, layers[1:], strict=False):
        upper["backing-image"] = lower
    return layers[0]


def file_image_info(image: Image) -> dict[str, Any]:
    """ImageInfo of the protocol node under `image`: the host file, format "file"."""
    st = os.fstat(image.fileno())
    return {
        "virtual-size": st.st_size,
        "filename": image.path,
        "format": "file",
        "actual-size": st.st_blocks * 512,
        "dirty-flag": False,
    }


def chain_depth(top: Image) -> int:
    """The number of backing images below `top`."""
    depth = 0
    image = top.backing
    while image is not None:
        depth += 1
        image = image.backing
    return depth


def _device_info(file: str, drv: str, node_name: str, read_only: bool, depth: int,
                 image: dict[str, Any]) -> dict[str, Any]:
    return {
        "file": file,
        "node-name": node_name,
        "drv": drv,
        "ro": read_only,
        "encrypted": False,
        "backing_file_depth": depth,
        "detect_zeroes": "off",
        "bps": 0,
        "bps_rd": 0,
        "bps_wr": 0,
        "iops": 0,
        "iops_rd": 0,
        "iops_wr": 0,
        "write_threshold": 0,
        "cache": dict(CACHE),
        "image": image,
    }


def node_info(image: Image, node_name: str, read_only: bool, *, flat: bool = False
              ) -> dict[str, Any]:
    """BlockDeviceInfo of the format node of `image` (also query-block's "inserted").
    flat leaves the chain out, as QEMU 7.2 does: no backing-image, backing_file_depth 0."""
    info = _device_info(image.path, image.format_name, node_name, read_only,
                        0 if flat else chain_depth(image), image_info(image, flat=flat))
    if image.backing is not None:  # as QEMU: the backing node's file name, as opened
        info["backing_file"] = image.backing.path
    bitmaps = image.bitmaps.info() if image.bitmaps is not None else []
    if bitmaps:  # QEMU leaves the member out when there are none
        info["dirty-bitmaps"] = bitmaps
    return info


def file_node_info(image: Image, node_name: str, read_only: bool) -> dict[str, Any]:
    """BlockDeviceInfo of the protocol node under `image` (drv "file")."""
    return _device_info(image.path, "file", node_name, read_only, 0, file_image_info(image))


def auto_node_name(drive: str, depth: int, protocol: bool = False) -> str:
    """The node name vdisk makes up for the image at `depth` (0: the top) of drive `drive`
    when none was given: "#disk0.1", and "#disk0.1.file" for its protocol node. The '#'
    keeps them apart from given names (which start with a letter), and the drive id and
    depth (at start-up) make them unique and predictable."""
    return f"#{drive}.{depth}{'.file' if protocol else ''}"


def block_info(device: str, top: Image, read_only: bool, node_name: str | None = None
               ) -> dict[str, Any]:
    """One query-block entry for the drive `device` serving `top` (BlockInfo); node_name
    is the top's (by default the made-up one)."""
    if node_name is None:
        node_name = auto_node_name(device, 0)
    return {
        "device": device,
        "locked": False,
        "removable": False,
        "io-status": "ok",
        "inserted": node_info(top, node_name, read_only),
    }
