"""QEMU's image locks: which lock bytes are held on a file, and a qemu-io that holds an
image (and its chain) open, as a running QEMU would."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess


def locked_bytes(path: str | os.PathLike[str]) -> list[int]:
    """QEMU lock bytes (100.., 200..) some open file description holds on path."""
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
