"""The benchmark chain: a qcow2 top (some random clusters) over a qcow2 base (all random)."""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.commands import qemu_img, run

CLUSTER = 64 << 10
TOP_FRACTION = 0.25  # share of 64 KiB clusters the top holds (random data, random places)
PIECE = 8 << 20


@dataclass(frozen=True)
class Chain:
    dir: Path
    size: int

    @property
    def top(self) -> Path:
        return self.dir / "top.qcow2"

    @property
    def base(self) -> Path:
        return self.dir / "base.qcow2"

    @property
    def expected(self) -> Path:
        """The guest view as a raw file (oracle for the streamed result)."""
        return self.dir / "expected.raw"


def random_file(path: Path, size: int) -> Path:
    """path, made size bytes of random data."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(PIECE, left)
            f.write(os.urandom(n))
            left -= n
    return path


def build_chain(dir: Path, size: int, seed: int = 1) -> Chain:
    """base.qcow2 fully written with random data; top.qcow2 over it holding TOP_FRACTION of
    the clusters with other random data; expected.raw, the guest view."""
    dir.mkdir(parents=True, exist_ok=True)
    chain = Chain(dir, size)
    raw = random_file(dir / "base.raw", size)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, chain.base, timeout=None)
    rng = random.Random(seed)
    only = dir / "top-only.raw"  # the top's clusters, holes elsewhere
    with open(raw, "r+b") as f, open(only, "wb") as t:
        t.truncate(size)
        for c in range(size // CLUSTER):
            if rng.random() < TOP_FRACTION:
                data = os.urandom(CLUSTER)
                f.seek(c * CLUSTER)
                f.write(data)
                t.seek(c * CLUSTER)
                t.write(data)
    os.replace(raw, chain.expected)  # raw is now the guest view
    # holes stay unallocated in the qcow2; then point it at the base without copying
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "top-only.raw", "top.qcow2", cwd=dir,
             timeout=None)
    only.unlink()
    qemu_img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", cwd=dir)
    return chain


def copy_chain(src: Chain, dst: Path) -> Chain:
    """A fresh copy of the two images (the top names its base relatively)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("base.qcow2", "top.qcow2"):
        run("cp", "--reflink=auto", "--sparse=always", src.dir / name, dst / name,
            timeout=None)
    os.sync()
    return Chain(dst, src.size)


def sparse_chain(dir: Path, size: int) -> Chain:
    """An empty qcow2 top over an empty qcow2 base, both `size` bytes (no data at all)."""
    dir.mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", size, cwd=dir)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2",
             size, cwd=dir)
    return Chain(dir, size)


def remove(chain: Chain) -> None:
    shutil.rmtree(chain.dir, ignore_errors=True)
