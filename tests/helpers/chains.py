"""Backing chains for the tests, made with qemu-img and qemu-io only; reading them back.

To open a chain with vdisk's engine, use vdisk.engine.chain (open_chain, iter_chain,
close_chain): nothing here walks a chain by hand.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

from tests.helpers.commands import qemu_img, qemu_io
from vdisk.engine.chain import chain_status
from vdisk.engine.image import Image, Status

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
Run = tuple[int, int, int | None, Status]  # (offset, length, depth or None, status)


def create(path: Path, size: int | str, backing: Path | str | None = None,
           backing_fmt: str = "qcow2", fmt: str = "qcow2", opts: str = "") -> Path:
    """qemu-img create one image (a backing name is stored as given)."""
    args: list[str | Path] = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt]
    if opts:
        args += ["-o", opts]
    qemu_img(*args, path, str(size))
    return path


def make_chain(tmp: Path) -> dict[str, Path]:
    """qcow2 (8M) over qcow2 (4M) over a 2M raw, each layer holding distinct data.

    top: pattern 3 at 2M and 6M (past mid's end); mid: pattern 2 at 0, a zero cluster at
    1M over base data, pattern 2 at 3M (past base's end); base: pattern 1 at 1M and
    at 1M+128K, a hole elsewhere.
    """
    base, mid, top = tmp / "base.raw", tmp / "mid.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-f", "raw", base, "2M")
    qemu_io(base, "write -P 1 1M 64k", "write -P 1 1152k 64k", fmt="raw")
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "4M", cwd=tmp)
    qemu_io(mid, "write -P 2 0 64k", "write -z 1M 64k", "write -P 2 3M 64k")
    qemu_img("create", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", top, "8M")
    qemu_io(top, "write -P 3 2M 64k", "write -P 3 6M 64k", "write -P 4 100k 1k")
    return {"base": base, "mid": mid, "top": top}


def three_layers(d: Path, size: int = 64 * MiB) -> tuple[Path, Path, Path]:
    """base <- mid <- top with data in every layer; mid zeroes a range over base data;
    top has unaligned writes (one over mid data, one over unallocated space)."""
    base = create(d / "base.qcow2", size)
    qemu_io(base, "write -P 0x11 0 16M", "write -P 0x12 40M 4M", f"write -P 0x13 {size - MiB} 1M")
    mid = create(d / "mid.qcow2", size, "base.qcow2")
    qemu_io(mid, "write -P 0x21 8M 4M", "write -z 1M 1M", "write -P 0x22 20M 4M",
            "write -z 41M 64K")
    top = create(d / "top.qcow2", size, "mid.qcow2")
    qemu_io(top, "write -P 0x31 3146962 100000", "write -P 0x32 22020173 5000",
            "write -P 0x33 52428877 4097")
    return base, mid, top


def depth_of(entries: list[dict[str, Any]], offset: int) -> tuple[int, bool, bool]:
    """(depth, data, zero) of the `qemu-img map` entry covering offset."""
    for e in entries:
        if e["start"] <= offset < e["start"] + e["length"]:
            return e["depth"], e["data"], e["zero"]
    raise AssertionError(f"offset {offset} not in map")


def set_refcount(path: Path, cluster: int, value: int) -> None:
    """Overwrite the 16-bit refcount of a host cluster in place (the image's first refcount
    block only), to make leaks and corruptions for the check tests."""
    head = path.read_bytes()[:104]
    cs = 1 << struct.unpack_from(">I", head, 20)[0]
    rt_off = struct.unpack_from(">Q", head, 48)[0]
    with open(path, "r+b") as f:
        f.seek(rt_off)
        rb = struct.unpack(">Q", f.read(8))[0]
        assert cluster < cs // 2, "past the first refcount block"
        f.seek(rb + 2 * cluster)
        f.write(struct.pack(">H", value))


def sha(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's content (read in 4 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


# -- chain_status against qemu-img map ---------------------------------------------------


def _expected_status(entry: dict[str, Any], sizes: list[int]) -> tuple[int | None, Status]:
    """chain_status's answer derived from one qemu-img map entry."""
    if entry["present"]:
        return entry["depth"], Status.DATA if entry["data"] else Status.ZERO
    d = entry["depth"]
    if d + 1 < len(sizes) and entry["start"] >= sizes[d + 1]:
        return d + 1, Status.ZERO  # past the end of the shorter backing image d+1
    return None, Status.ZERO


def status_runs(top: Image, base: Image | None = None) -> list[Run]:
    """chain_status over the whole top, adjacent equal answers merged: (offset, length,
    depth, status) runs."""
    out: list[Run] = []
    off = 0
    while off < top.virtual_size:
        n, depth, st = chain_status(top, off, top.virtual_size - off, base=base)
        assert n > 0
        if out and out[-1][2:] == (depth, st) and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, depth, st)
        else:
            out.append((off, n, depth, st))
        off += n
    return out


def expected_runs(entries: list[dict[str, Any]], sizes: list[int], base_depth: int | None
                  ) -> list[Run]:
    """The runs status_runs must give, derived from `qemu-img map` entries of the top, the
    virtual sizes of the chain's layers (top first) and the depth of base (or None)."""
    out: list[Run] = []
    for e in entries:
        depth, st = _expected_status(e, sizes)
        if base_depth is not None and (depth is None or depth >= base_depth):
            depth, st = None, Status.UNALLOCATED
        if out and out[-1][2:] == (depth, st):
            out[-1] = (out[-1][0], out[-1][1] + e["length"], depth, st)
        else:
            out.append((e["start"], e["length"], depth, st))
    return out


def remote_site_images(root: Path) -> None:
    """The images the remote-chain tests serve from root/: base.raw (6M, patterns and
    holes) and mid.qcow2 (8M) over it with data, a zero range and a compressed cluster."""
    root.mkdir()
    create(root / "base.raw", "6M", fmt="raw")
    qemu_io(root / "base.raw", "write -P 0x11 0 1M", "write -P 0x12 3M 512k", fmt="raw")
    create(root / "mid.qcow2", 8 * MiB, backing="base.raw", backing_fmt="raw")
    qemu_io(root / "mid.qcow2", "write -P 0x21 512k 1M", "write -z 3M 64k",
            "write -c -P 0x23 5M 128k")
