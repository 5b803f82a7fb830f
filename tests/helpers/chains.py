"""Helpers for the raw/chain/CLI/locking tests: qemu-img and qemu-io as oracles."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

VDISK = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "vdisk")


def run(*cmd: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                         timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}): {res.stderr}{res.stdout}")
    return res


def qemu_img(*args: str | os.PathLike[str], cwd: Any = None) -> str:
    return run("qemu-img", *args, cwd=cwd).stdout


def qemu_io(path: str | os.PathLike[str], *cmds: str, fmt: str | None = None) -> None:
    args: list[str] = []
    if fmt:
        args += ["-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run("qemu-io", *args, path)


def qemu_map(path: str | os.PathLike[str], cwd: Any = None) -> list[dict[str, Any]]:
    return json.loads(qemu_img("map", "--output=json", path, cwd=cwd))


def qemu_info(path: str | os.PathLike[str], *extra: str, cwd: Any = None) -> Any:
    return json.loads(qemu_img("info", "--output=json", *extra, path, cwd=cwd))


def qemu_raw(path: str | os.PathLike[str], tmp: Path) -> bytes:
    """The guest view of an image as `qemu-img convert -O raw` gives it."""
    out = tmp / f"conv-{os.getpid()}-{abs(hash(str(path)))}.raw"
    qemu_img("convert", "-U", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data




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


def locked_bytes(path: str | os.PathLike[str]) -> list[int]:
    """QEMU lock bytes (100.., 200..) some open file description holds on path."""
    import fcntl
    import struct

    fmt = "hhqqi4x"
    held = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for byte in [*range(100, 105), *range(200, 205)]:
            req = struct.pack(fmt, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
            res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, req)
            if struct.unpack(fmt, res)[0] != fcntl.F_UNLCK:
                held.append(byte)
    finally:
        os.close(fd)
    return held


class QemuHolder:
    """`qemu-io` kept running interactively, holding an image (and its chain) open."""

    def __init__(self, path: str | os.PathLike[str], fmt: str, *, read_only: bool = False):
        args = ["qemu-io", "-f", fmt] + (["-r"] if read_only else []) + [str(path)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        # qemu-io answers commands only once the image is open, with all its locks taken
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write("length\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        except OSError:
            answer = ""
        if "iB" not in answer or not locked_bytes(path):
            self.close()
            raise AssertionError(f"qemu-io did not open {path}: {answer!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.communicate("quit\n", timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()

    def __enter__(self) -> QemuHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
