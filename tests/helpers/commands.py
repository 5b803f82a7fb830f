"""Helpers for the qcow2 driver tests (qemu-img / qemu-io as oracles). No tests here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from vdisk.engine.image import Image
from vdisk.engine.qcow2 import open_qcow2


def run(*cmd: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}): {res.stderr}{res.stdout}")
    return res


def qemu_img(*args: str | os.PathLike[str]) -> str:
    return run("qemu-img", *args).stdout


def qemu_io(path: str | os.PathLike[str], *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    run("qemu-io", "-f", fmt, *args, str(path))


def qemu_check(path: str | os.PathLike[str]) -> tuple[int, dict[str, Any]]:
    res = run("qemu-img", "check", "--output=json", str(path), check=False)
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else {}


def assert_clean(path: str | os.PathLike[str], leaks_ok: bool = False) -> None:
    rc, out = qemu_check(path)
    assert rc in ((0, 3) if leaks_ok else (0,)), (rc, out)
    assert out.get("corruptions", 0) == 0, out
    if not leaks_ok:
        assert out.get("leaks", 0) == 0, out


def convert_raw(path: str | os.PathLike[str], tmp: Path, *extra: str) -> bytes:
    out = tmp / f"conv-{os.getpid()}-{Path(path).name}.raw"
    qemu_img("convert", *extra, "-O", "raw", str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def open_chain(path: str | os.PathLike[str], read_only: bool = True) -> Image:
    """Open a qcow2 image and its backing chain (qcow2 or raw) by hand, read-only below."""
    from vdisk.engine.raw import open_raw

    top = open_qcow2(str(path), read_only=read_only)
    img: Any = top
    while img.backing_name is not None:
        name = img.backing_name
        bpath = name if os.path.isabs(name) else os.path.join(os.path.dirname(img.path), name)
        fmt = img.backing_format or "qcow2"
        img.backing = (open_qcow2(bpath, read_only=True) if fmt == "qcow2"
                       else open_raw(bpath, read_only=True))
        img = img.backing
        if fmt != "qcow2":
            break
    return top


def close_chain(img: Any) -> None:
    while img is not None:
        nxt = getattr(img, "backing", None)
        img.close()
        img = nxt
