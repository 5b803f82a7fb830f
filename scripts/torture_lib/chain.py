"""Backing chains for the torture, made and inspected with qemu-img and qemu-io only."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.commands import CommandFailed, qemu_info, qemu_io, run

KiB = 1 << 10
MiB = 1 << 20
CLUSTER_SIZES = [512, 4 * KiB, 16 * KiB, 64 * KiB, 64 * KiB, 128 * KiB, 512 * KiB, 1 * MiB]
CLUSTER_WEIGHTS = [1, 3, 3, 4, 0, 2, 2, 2]

ToolError = CommandFailed  # a qemu tool failed


@dataclass
class Layer:
    path: Path
    fmt: str
    cluster: int


def chain_of(top: Path) -> list[Layer]:
    """The chain on disk, top first (qemu-img info --backing-chain)."""
    return [Layer(Path(e["filename"]), e["format"], e.get("cluster-size", 0))
            for e in qemu_info(top, "-U", "--backing-chain")]


def check(path: Path, repair_leaks: bool = False) -> tuple[int, str, list[int]]:
    """qemu-img check's exit code (0 clean, 2 corrupt, 3 leaks), its output (shortened)
    and the leaked clusters it lists."""
    args = ["qemu-img", "check"]
    if repair_leaks:
        args += ["-r", "leaks"]
    res = run(*args, path, check=False)
    lines = (res.stdout + res.stderr).strip().splitlines()
    listed = [ln for ln in lines if ln.startswith(("Leaked cluster", "ERROR cluster"))]
    rest = [ln for ln in lines if ln not in listed]
    leaked = [int(ln.split()[2]) for ln in listed if ln.startswith("Leaked cluster")]
    text = "\n".join(listed[:5] + [f"({len(listed)} clusters listed)"] + rest)
    return res.returncode, text, leaked


class ChainBuilder:
    def __init__(self, workdir: Path, size: int) -> None:
        self.dir = workdir
        self.size = size
        self.generation = 0
        self.layers_made = 0

    def _cluster(self, rng: random.Random) -> int:
        return rng.choices(CLUSTER_SIZES, CLUSTER_WEIGHTS)[0]

    def _opts(self, rng: random.Random) -> str:
        """Random qcow2 creation options: cluster size, sometimes extended L2, an odd
        refcount width, or compat=0.10 (version 2)."""
        cs = self._cluster(rng)
        r = rng.random()
        if r < 0.1:
            return f"cluster_size={cs},compat=0.10"
        if r < 0.25 and cs >= 16 * KiB:
            return f"cluster_size={cs},extended_l2=on"
        if r < 0.45:
            return f"cluster_size={cs},refcount_bits={rng.choice([1, 2, 4, 8, 32, 64])}"
        return f"cluster_size={cs}"

    def _ranges(self, rng: random.Random, count: int, max_len: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(count):
            length = rng.randint(1, max_len)
            off = rng.randint(0, self.size - length)
            out.append((off, length))
        return out

    def new_chain(self, rng: random.Random, depth: int) -> Path:
        """base (raw or qcow2, random data) and depth-1 qcow2 overlays; returns the top."""
        for old in self.dir.glob("c*-l*.*"):
            old.unlink()
        self.generation += 1
        raw_base = rng.random() < 0.25
        fmt = "raw" if raw_base else "qcow2"
        base = self.dir / f"c{self.generation}-l0.{fmt}"
        if raw_base:
            run("qemu-img", "create", "-q", "-f", "raw", base, str(self.size))
        else:
            run("qemu-img", "create", "-q", "-f", "qcow2", "-o", self._opts(rng), base,
                str(self.size))
        src = self.dir / "random.bin"
        src.write_bytes(rng.randbytes(4 * MiB))
        cmds = []
        if not raw_base and rng.random() < 0.5:  # a few compressed clusters, written first:
            cmds += self._compressed(rng, base)  # QEMU compresses only into free clusters
        for off, length in self._ranges(rng, rng.randint(3, 8), 4 * MiB):
            cmds.append(f"write -q -s {src} {off} {length}")
        self._qemu_io(base, fmt, cmds)
        src.unlink()
        top = base
        for _ in range(depth - 1):
            top = self.add_layer(rng, top, fmt, fill=True)
            fmt = "qcow2"
        return top

    def _compressed(self, rng: random.Random, path: Path) -> list[str]:
        """qemu-io commands writing a few compressed runs of whole, distinct clusters."""
        cs = chain_of(path)[0].cluster
        cmds = []
        used: set[int] = set()
        for _ in range(rng.randint(1, 4)):
            n = rng.randint(1, max(1, (256 * KiB) // cs))
            first = rng.randrange(0, self.size // cs - n + 1)
            if used & set(range(first, first + n)):
                continue
            used |= set(range(first, first + n))
            cmds.append(f"write -q -c -P 0x{rng.randint(1, 255):02x} {first * cs} {n * cs}")
        return cmds

    def _qemu_io(self, path: Path, fmt: str, cmds: list[str]) -> None:
        if cmds:
            qemu_io(path, *cmds, fmt=fmt)

    def add_layer(self, rng: random.Random, below: Path, below_fmt: str, *, fill: bool) -> Path:
        """A new qcow2 overlay over below (named relatively or absolutely); with fill, the
        overlay gets some pattern data, zeroed and discarded ranges."""
        self.layers_made += 1
        path = self.dir / f"c{self.generation}-l{self.layers_made}.qcow2"
        name = str(below) if rng.random() < 0.3 else below.name
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", name, "-F", below_fmt, "-o",
            self._opts(rng), path, str(self.size), cwd=self.dir)
        if fill:
            cmds = self._compressed(rng, path) if rng.random() < 0.3 else []
            for off, length in self._ranges(rng, rng.randint(2, 6), 2 * MiB):
                cmds.append(f"write -q -P 0x{rng.randint(0, 255):02x} {off} {length}")
            for off, length in self._ranges(rng, rng.randint(1, 3), 1 * MiB):
                cmds.append(f"write -q -z {off // 512 * 512} {max(512, length // 512 * 512)}")
            self._qemu_io(path, "qcow2", cmds)
        return path
