"""Power loss, replayed from a libc-level journal of what vdisk did to the top image.

tests/integration/powerloss_shim.c (built here with gcc, loaded with LD_PRELOAD) journals every
pwrite*, pwritev*, write, copy_file_range, fallocate, ftruncate, fsync, fdatasync and
sync_file_range that a process makes on the top image, with the bytes written, so the
test knows nothing of how the engine orders its work. The workload (the engine in a
subprocess, or `vdisk serve` with a second process writing through the FUSE file)
writes markers into the same journal: `i<k>` before it issues guest write k, `a<k>`
once an fsync returned after writes 0..k-1.

A power loss leaves the file as of the last completed sync plus any subset of the
writes made since, whole or in 512-byte pieces, in journal order; growth of the file
that was not synced is lost or cut short (data past the surviving size is gone).
Small windows between syncs are replayed in every subset (and with each write torn);
big ones by random cuts (a crash after a random op, a random subset before it) and
random subsets of the whole window (the cut just before its sync). The small journals:
the issue's repro (two fsynced writes) and the same shape for a copy-on-read, a
copy-up (copy_file_range) and a completed stream; the big ones: random writes,
discards, fsyncs, copy-on-read and copy-ups with a whole stream on the engine, and the
same through `vdisk serve` and FUSE. Every state must pass `qemu-img check`
(leaks allowed, no corruption) and read back, through `qemu-img convert`, every write
an fsync acknowledged, while every sector the guest never wrote reads as the backing
file's data (a later unacknowledged write may show instead, sector by sector).

VDISK_POWERLOSS_BIG=1 adds the big variants (longer workloads, more states).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from control.client import qmp_listening
from vdisk.service.mounts import force_unmount

REPO = Path(__file__).resolve().parents[2]
SHIM_SRC = Path(__file__).with_name("powerloss_shim.c")
SECTOR = 512
MiB = 1 << 20
BIG = os.environ.get("VDISK_POWERLOSS_BIG") == "1"
SCALES = ["default", "big"] if BIG else ["default"]

_FALLOC_KEEP_SIZE = 0x01
_FALLOC_PUNCH_HOLE = 0x02
_FALLOC_ZERO_RANGE = 0x10

pytestmark = pytest.mark.slow  # about a minute in all


# -- the journal ----------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    """One journal record: kind W (write), A (fallocate, aux = mode), T (truncate to
    off), S (a sync returned), R (sync_file_range), M (a workload marker in data)."""

    kind: str
    off: int
    length: int
    aux: int
    data: bytes = b""

    def __str__(self) -> str:
        if self.kind == "W":
            return f"W 0x{self.off:x}+{self.length}"
        if self.kind == "A":
            return f"A 0x{self.off:x}+{self.length} mode 0x{self.aux:x}"
        if self.kind == "T":
            return f"T 0x{self.off:x}"
        if self.kind == "M":
            return f"M {self.data.decode().strip()}"
        return self.kind


def read_journal(path: Path) -> list[Op]:
    raw = path.read_bytes()
    ops: list[Op] = []
    pos = 0
    while pos < len(raw):
        code, off, length, aux = struct.unpack_from("<QqqQ", raw, pos)
        pos += 32
        kind = chr(code)
        data = b""
        if kind in "WM":
            data = raw[pos:pos + length]
            assert len(data) == length, "truncated journal record"
            pos += length
        assert kind in "WATSRM", f"unknown journal record {code}"
        ops.append(Op(kind, off, length, aux, data))
    return ops


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shim") / "powerloss_shim.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(out),
                    str(SHIM_SRC), "-ldl", "-pthread"], check=True, capture_output=True)
    return out


def shim_env(shim: Path, target: Path, journal: Path, marker: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LD_PRELOAD=str(shim), POWERLOSS_TARGET=os.path.realpath(target),
               POWERLOSS_JOURNAL=str(journal), POWERLOSS_MARKER=os.path.realpath(marker),
               PYTHONPATH=str(REPO))
    return env


# -- workloads ------------------------------------------------------------------------
# A plan is a list of steps: ["w", off, n, seed] write, ["z", off, n] discard (reads as
# zeroes after), ["r", off, n] read (copy-on-read), ["c", off, n] copy-up (engine only:
# what a stream step does), ["f"] fsync, ["stream", speed] start
# a stream of the whole chain, ["wait"] wait for it to complete, ["sleep", seconds].

def guest_data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def guest_writes(plan: list[list]) -> list[tuple[int, bytes]]:
    """(offset, data) of every write and discard, in issue order (index k of i<k>)."""
    out = []
    for step in plan:
        if step[0] == "w":
            out.append((step[1], guest_data(step[3], step[2])))
        elif step[0] == "z":
            out.append((step[1], bytes(step[2])))
    return out


ENGINE_DRIVER = r"""
import json, os, random, sys
import trio
from vdisk.block.stream import StreamJob
from vdisk.engine.chain import open_chain
from vdisk.block.device import BlockDevice

top_path, plan_path, marker, l2_tables = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
plan = json.load(open(plan_path))
mfd = os.open(marker, os.O_WRONLY | os.O_APPEND)


def mark(text):
    os.write(mfd, text.encode() + b"\n")


async def main():
    top = open_chain(top_path)
    if l2_tables:
        top.l2_cache.capacity = l2_tables  # a tiny L2 cache: write-back on eviction
    dev = BlockDevice("d0", top, copy_on_read=True, read_only=False)
    job = None
    k = 0
    async with trio.open_nursery() as nursery:
        for step in plan:
            op = step[0]
            if op == "w":
                mark(f"i{k}")
                await dev.write(step[1], random.Random(step[3]).randbytes(step[2]))
                k += 1
            elif op == "z":
                mark(f"i{k}")
                await dev.write_zeroes(step[1], step[2], unmap=True)
                k += 1
            elif op == "r":
                await dev.read(step[1], step[2])
            elif op == "c":
                await dev.copy_up(step[1], step[2])
            elif op == "f":
                await dev.flush()
                mark(f"a{k}")
            elif op == "stream":
                job = StreamJob("s0", dev, speed=step[1])
                nursery.start_soon(job.run)
            elif op == "wait":
                await job.done.wait()
                assert job.error is None and top.backing is None, job.error
            elif op == "sleep":
                await trio.sleep(step[1])
            await trio.sleep(0)
    await dev.close()


trio.run(main)
"""

FUSE_WRITER = r"""
import ctypes, json, os, random, socket, sys, time

drive, plan_path, marker, sock_path = sys.argv[1:5]
plan = json.load(open(plan_path))
mfd = os.open(marker, os.O_WRONLY | os.O_APPEND)
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def mark(text):
    os.write(mfd, text.encode() + b"\n")


class QMP:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(120)
        self.sock.connect(path)
        self.f = self.sock.makefile("rwb")
        self.events = []
        self.read()
        self.cmd("qmp_capabilities")

    def read(self):
        line = self.f.readline()
        if not line:
            raise EOFError("QMP closed")
        return json.loads(line)

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            msg = self.read()
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise RuntimeError(f"{name}: {msg}")
            else:
                return msg["return"]

    def wait_event(self, name):
        while not any(e["event"] == name for e in self.events):
            msg = self.read()
            if "event" in msg:
                self.events.append(msg)
        return next(e for e in self.events if e["event"] == name)


qmp = QMP(sock_path)
fd = os.open(drive, os.O_RDWR)
k = 0
for step in plan:
    op = step[0]
    if op == "w":
        mark(f"i{k}")
        data = random.Random(step[3]).randbytes(step[2])
        assert os.pwrite(fd, data, step[1]) == len(data)
        k += 1
    elif op == "z":
        mark(f"i{k}")
        if libc.fallocate(fd, 3, step[1], step[2]) != 0:  # PUNCH_HOLE | KEEP_SIZE
            raise OSError(ctypes.get_errno(), "fallocate")
        k += 1
    elif op == "r":
        os.pread(fd, step[2], step[1])
    elif op == "f":
        os.fsync(fd)
        mark(f"a{k}")
    elif op == "stream":
        qmp.cmd("block-stream", device="d0", speed=step[1])
    elif op == "wait":
        ev = qmp.wait_event("BLOCK_JOB_COMPLETED")
        assert "error" not in ev["data"], ev
    elif op == "sleep":
        time.sleep(step[1])
os.close(fd)
"""


@dataclass
class Chain:
    """A raw base (with a qcow2 middle layer on it, if asked) and a qcow2 top, in d; the
    replayed states go there too, so the top's relative backing name resolves.
    backing_view: what the guest sees of the backing chain."""

    d: Path
    top: Path
    size: int
    backing_view: bytes


def make_chain(d: Path, size: int, cluster_size: int, seed: int,
               mid: list[tuple[int, int]] | None = None, sparse_base: bool = False) -> Chain:
    """base.raw [<- mid.qcow2] <- top.qcow2; mid holds data in the (offset, length) runs
    given. A stream or copy-up copies what mid holds with copy_file_range (plain data in
    a qcow2 layer), what base holds with writes; a sparse base reads as zeroes (a stream
    leaves such runs unallocated)."""
    d.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    base = d / "base.raw"
    if sparse_base:
        base.write_bytes(b"")
        os.truncate(base, size)
    else:
        base.write_bytes(rnd.randbytes(size))
    below, fmt = "base.raw", "raw"
    if mid is not None:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                        f"cluster_size={cluster_size}", "-b", "base.raw", "-F", "raw",
                        "mid.qcow2"], check=True, cwd=d)
        cmds = []
        for k, (off, n) in enumerate(mid):
            cmds += ["-c", f"write -P {(k * 37 + 1) & 0xff} {off} {n}"]
        subprocess.run(["qemu-io", *cmds, "mid.qcow2"], check=True, cwd=d,
                       capture_output=True)
        below, fmt = "mid.qcow2", "qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={cluster_size}", "-b", below, "-F", fmt, "top.qcow2"],
                   check=True, cwd=d)
    view = d / "backing-view.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", below, str(view)], check=True, cwd=d)
    data = view.read_bytes()
    view.unlink()
    return Chain(d, d / "top.qcow2", size, data)


def random_runs(rnd: random.Random, size: int, count: int) -> list[tuple[int, int]]:
    """Runs of whole and partial clusters for a middle layer."""
    out = []
    for _ in range(count):
        off = rnd.randrange(0, size // 4096) * 4096
        out.append((off, min(size - off, rnd.choice([4096, 65536, 131072, 262144]))))
    return out


def run_engine(shim: Path, ch: Chain, plan: list[list], l2_tables: int = 0) -> list[Op]:
    """Run the plan on the engine (BlockDevice, StreamJob) in a subprocess under the shim."""
    journal, marker = ch.d / "journal.bin", ch.d / "marker.txt"
    journal.unlink(missing_ok=True)
    marker.write_bytes(b"")
    plan_path = ch.d / "plan.json"
    plan_path.write_text(json.dumps(plan))
    res = subprocess.run([sys.executable, "-c", ENGINE_DRIVER, str(ch.top), str(plan_path),
                          str(marker), str(l2_tables)],
                         env=shim_env(shim, ch.top, journal, marker), cwd=ch.d,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    return read_journal(journal)


def run_fuse(shim: Path, ch: Chain, plan: list[list]) -> list[Op]:
    """Run the plan through `vdisk serve` (FUSE, QMP), both processes under the shim."""
    journal, marker = ch.d / "journal.bin", ch.d / "marker.txt"
    journal.unlink(missing_ok=True)
    marker.write_bytes(b"")
    plan_path = ch.d / "plan.json"
    plan_path.write_text(json.dumps(plan))
    mnt, sock, log = ch.d / "mnt", ch.d / "qmp.sock", ch.d / "serve.log"
    env = shim_env(shim, ch.top, journal, marker)
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "vdisk", "serve", "--mount", str(mnt),
                                 "--qmp", str(sock), "--drive", f"id=d0,file={ch.top}"],
                                env=env, cwd=REPO, stdout=logf, stderr=logf,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not qmp_listening(sock):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        res = subprocess.run([sys.executable, "-c", FUSE_WRITER, str(mnt / "d0"),
                              str(plan_path), str(marker), str(sock)],
                             env=env, cwd=ch.d, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stderr + log.read_text()
        proc.send_signal(signal.SIGTERM)  # a clean stop: flush, close
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mnt)
    return read_journal(journal)


# -- replay ---------------------------------------------------------------------------

@dataclass
class Window:
    """The ops between two completed syncs (or after the last one), on top of the file
    as the earlier sync left it; acked/issued: the workload's markers up to the end."""

    index: int
    durable: bytes
    ops: list[Op]
    acked: int
    issued: int
    first_op: int  # journal index of the window's first record


def apply_op(img: bytearray, op: Op, lo: int | None = None, hi: int | None = None) -> None:
    """Apply op (for a write, only bytes [lo, hi) of the file) to the file image."""
    if op.kind == "W":
        a = op.off if lo is None else lo
        b = op.off + op.length if hi is None else hi
        if len(img) < b:
            img.extend(bytes(b - len(img)))
        img[a:b] = op.data[a - op.off:b - op.off]
    elif op.kind == "T":
        if op.off < len(img):
            del img[op.off:]
        else:
            img.extend(bytes(op.off - len(img)))
    elif op.kind == "A":
        end = op.off + op.length
        if not op.aux & _FALLOC_KEEP_SIZE and end > len(img):
            img.extend(bytes(end - len(img)))
        if op.aux & (_FALLOC_PUNCH_HOLE | _FALLOC_ZERO_RANGE):
            b = min(end, len(img))
            if b > op.off:
                img[op.off:b] = bytes(b - op.off)


def windows(initial: bytes, journal: list[Op]) -> tuple[list[Window], bytes]:
    """Split the journal at completed syncs; also the file with every op applied."""
    out: list[Window] = []
    cur = bytearray(initial)
    pending: list[Op] = []
    acked = issued = 0
    first = 0
    for i, op in enumerate(journal):
        if op.kind == "M":
            text = op.data.decode().strip()
            if text[0] == "a":
                acked = max(acked, int(text[1:]))
            elif text[0] == "i":
                issued = max(issued, int(text[1:]) + 1)
        elif op.kind == "S":
            out.append(Window(len(out), bytes(cur), pending, acked, issued, first))
            for p in pending:
                apply_op(cur, p)
            pending = []
            first = i + 1
        elif op.kind in "WAT":
            pending.append(op)
    out.append(Window(len(out), bytes(cur), pending, acked, issued, first))
    for p in pending:
        apply_op(cur, p)
    return out, bytes(cur)


# The ops of a window that survive, in journal order: "all" whole, or the (lo, hi) pieces
# that made it; an op not listed is lost.
Choice = list[tuple[Op, str | list[tuple[int, int]]]]


def pieces(op: Op) -> list[tuple[int, int]]:
    """The 512-byte-sector pieces of a write."""
    out = []
    s = op.off - op.off % SECTOR
    end = op.off + op.length
    while s < end:
        out.append((max(s, op.off), min(s + SECTOR, end)))
        s += SECTOR
    return out


def materialize(durable: bytes, choice: Choice, grow: str | float) -> bytes:
    """The file after a power loss: durable plus the chosen ops, in journal order; growth
    past the durable size is kept ("full"), lost ("lost") or cut short (a fraction)."""
    img = bytearray(durable)
    for op, how in choice:
        if how == "all":
            apply_op(img, op)
        else:
            assert not isinstance(how, str)
            for lo, hi in how:
                apply_op(img, op, lo, hi)
    ld, lf = len(durable), len(img)
    if lf > ld:
        if grow == "lost":
            keep = ld
        elif grow == "full":
            keep = lf
        else:
            assert isinstance(grow, float)
            keep = ld + int((lf - ld) * grow) // SECTOR * SECTOR
        del img[keep:]
    return bytes(img)


def grows(durable: bytes, choice: Choice) -> bool:
    return len(materialize(durable, choice, "full")) > len(durable)


def torn_variants(op: Op) -> list[list[tuple[int, int]]]:
    ps = pieces(op)
    if len(ps) < 2:
        return []
    return [ps[:len(ps) // 2], ps[1::2]]  # a torn tail; every other sector


def crash_states(w: Window, rnd: random.Random, exhaustive: int, randoms: int
                 ) -> Iterator[tuple[str, bytes]]:
    """(label, file) of the power-loss states of one window."""
    ops = w.ops
    if not ops:
        yield "nothing since the sync", w.durable
        return

    def with_growth(label: str, choice: Choice) -> Iterator[tuple[str, bytes]]:
        yield label, materialize(w.durable, choice, "full")
        if grows(w.durable, choice):
            yield label + ", growth lost", materialize(w.durable, choice, "lost")
            yield label + ", growth cut short", materialize(w.durable, choice,
                                                            rnd.uniform(0.1, 0.9))

    if len(ops) <= exhaustive:
        for mask in range(1 << len(ops)):
            choice: Choice = [(op, "all") for j, op in enumerate(ops) if mask >> j & 1]
            yield from with_growth(f"ops {mask:0{len(ops)}b}", choice)
        for j, op in enumerate(ops):
            for t, torn in enumerate(torn_variants(op)):
                alone: Choice = [(op, torn)]
                yield from with_growth(f"op {j} torn ({t}) alone", alone)
                rest: Choice = [(o, torn if i == j else "all") for i, o in enumerate(ops)]
                yield from with_growth(f"op {j} torn ({t}), all others", rest)
        return
    for r in range(randoms):
        cut = len(ops) if r % 2 == 0 else rnd.randrange(0, len(ops))  # even: before the sync
        choice = []
        for op in ops[:cut]:
            x = rnd.random()
            if x < 0.35:
                continue
            if x < 0.7 or op.kind != "W" or op.length <= SECTOR:
                choice.append((op, "all"))
            else:
                choice.append((op, [p for p in pieces(op) if rnd.random() < 0.5]))
        grow: str | float = rnd.choice(["full", "lost", round(rnd.uniform(0.1, 0.9), 2)])
        yield f"cut {cut}/{len(ops)} #{r} growth {grow}", materialize(w.durable, choice, grow)


# -- oracles --------------------------------------------------------------------------

class ContentOracle:
    """What the guest may read after a crash with writes [0, acked) acknowledged and
    [0, issued) issued: per sector, the last acknowledged value (or the backing file's),
    or the value of any later issued write that covers it."""

    def __init__(self, base: bytes, writes: list[tuple[int, bytes]]) -> None:
        self.base = base
        self.writes = writes
        self._expected: dict[int, bytes] = {}

    def expected(self, acked: int) -> bytes:
        got = self._expected.get(acked)
        if got is None:
            img = bytearray(self.base)
            for off, data in self.writes[:acked]:
                img[off:off + len(data)] = data
            got = self._expected[acked] = bytes(img)
        return got

    def problems(self, view: bytes, acked: int, issued: int) -> list[str]:
        exp = self.expected(acked)
        if view == exp:
            return []
        if len(view) != len(exp):
            return [f"guest view is {len(view)} bytes, not {len(exp)}"]
        later = self.writes[acked:issued]
        bad: list[str] = []
        block = 64 << 10
        for b in range(0, len(exp), block):
            if view[b:b + block] == exp[b:b + block]:
                continue
            for s in range(b, min(b + block, len(exp)), SECTOR):
                got = view[s:s + SECTOR]
                if got == exp[s:s + SECTOR]:
                    continue
                if any(off <= s < off + len(d) and d[s - off:s - off + SECTOR] == got
                       for off, d in later):
                    continue
                what = "zeroes" if got == bytes(SECTOR) else "other data"
                last = [k for k, (off, d) in enumerate(self.writes[:acked])
                        if off <= s < off + len(d)]
                want = f"acknowledged write {last[-1]}" if last else "the backing file"
                bad.append(f"sector 0x{s:x} reads {what}, not {want}")
        return bad


def judge(ch: Chain, oracle: ContentOracle, states: Iterator[tuple[str, Window, bytes]]
          ) -> tuple[int, list[str]]:
    """Check every state with qemu-img (check, convert), a few at a time (the states are
    made as they are needed: they are megabytes each); the count and the failures."""

    def one(n: int, label: str, w: Window, img: bytes) -> str | None:
        path = ch.d / f"state{n}.qcow2"
        raw = ch.d / f"state{n}.raw"
        path.write_bytes(img)
        try:
            res = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                                 capture_output=True, text=True, cwd=ch.d)
            out = json.loads(res.stdout) if res.stdout.strip() else {}
            where = f"window {w.index} ({label})"
            if res.returncode not in (0, 3) or out.get("corruptions", 0) or \
                    out.get("check-errors", 0):
                errors = " / ".join(res.stderr.strip().splitlines()[:3])
                return f"{where}: qemu-img check rc {res.returncode}, " \
                       f"{out.get('corruptions')} corruptions: {errors}"
            conv = subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)],
                                  capture_output=True, text=True, cwd=ch.d)
            if conv.returncode:
                return f"{where}: qemu-img convert failed: {conv.stderr.strip()}"
            bad = oracle.problems(raw.read_bytes(), w.acked, w.issued)
            if bad:
                return f"{where}: {len(bad)} bad sectors: {'; '.join(bad[:4])}"
            return None
        finally:
            path.unlink(missing_ok=True)
            raw.unlink(missing_ok=True)

    workers = max(2, os.cpu_count() or 2)
    failures: list[str] = []
    count = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running: deque[Future[str | None]] = deque()
        for label, w, img in states:
            if len(running) >= 2 * workers:
                if (r := running.popleft().result()) is not None:
                    failures.append(r)
            running.append(pool.submit(one, count, label, w, img))
            count += 1
        failures += [r for f in running if (r := f.result()) is not None]
    return count, failures


@dataclass
class Replay:
    states: int = 0
    windows: int = 0
    failures: list[str] = field(default_factory=list)


def replay(ch: Chain, initial: bytes, journal: list[Op], writes: list[tuple[int, bytes]],
           seed: int, exhaustive: int, randoms: int) -> Replay:
    """Rebuild the power-loss states of every window and judge them."""
    wins, final = windows(initial, journal)
    # the journal is complete: replaying every op gives the file vdisk left behind
    assert final == ch.top.read_bytes(), "the journal misses writes to the top image"
    assert not [op for op in journal if op.kind == "R"], "sync_file_range is not a barrier"
    rnd = random.Random(seed)

    def states() -> Iterator[tuple[str, Window, bytes]]:
        seen: set[tuple[bytes, int, int]] = set()  # the same file, judged the same way
        for w in wins:
            for label, img in crash_states(w, rnd, exhaustive, randoms):
                key = (hashlib.sha1(img).digest(), w.acked, w.issued)
                if key not in seen:
                    seen.add(key)
                    yield label, w, img

    count, failures = judge(ch, ContentOracle(ch.backing_view, writes), states())
    result = Replay(count, len(wins), failures)
    cfr = sum(1 for op in journal if op.kind == "W" and op.aux == 1)
    print(f"\n{len(journal)} journal records ({cfr} copy_file_range), {len(wins)} sync "
          f"windows, {result.states} states replayed, {len(result.failures)} bad")
    for f in result.failures[:10]:
        print("  " + f)
    return result


def describe(wins: list[Window], failures: list[str]) -> str:
    """The failures, and the ops of the windows they are in."""
    lines = failures[:12]
    shown = set()
    for f in failures[:12]:
        k = int(f.split()[1])
        if k not in shown:
            shown.add(k)
            lines.append(f"window {k} (journal records {wins[k].first_op}..): "
                         + ", ".join(str(op) for op in wins[k].ops[:20]))
    return "\n".join(lines)


def assert_no_bad_states(ch: Chain, initial: bytes, journal: list[Op], plan: list[list],
                         seed: int, exhaustive: int, randoms: int, min_states: int) -> None:
    res = replay(ch, initial, journal, guest_writes(plan), seed, exhaustive, randoms)
    wins, _ = windows(initial, journal)
    assert not res.failures, f"{len(res.failures)} of {res.states} power-loss states are bad:\n" \
                             + describe(wins, res.failures)
    assert res.states >= min_states, res.states


# -- the workloads --------------------------------------------------------------------

def random_plan(rnd: random.Random, size: int, steps: int, stream_at: int | None,
                speed: int, copy_up: bool) -> list[list]:
    """Random 4 KiB-aligned writes, discards, copy-on-read reads (or copy-ups) and fsyncs;
    with stream_at, a stream of the whole chain starts there and completes before the
    end."""
    plan: list[list] = []
    for i in range(steps):
        if i == stream_at:
            plan.append(["stream", speed])
        off = rnd.randrange(0, size // 4096) * 4096
        n = min(size - off, rnd.choice([4096, 4096, 8192, 16384, 65536, 196608]))
        x = rnd.random()
        if x < 0.45:
            plan.append(["w", off, n, rnd.randrange(1 << 30)])
        elif x < 0.55:
            plan.append(["z", off, n])
        elif x < 0.75:
            plan.append(["c" if copy_up and rnd.random() < 0.5 else "r", off, n])
        else:
            plan.append(["f"])
        if stream_at is not None and i >= stream_at and rnd.random() < 0.3:
            plan.append(["sleep", 0.01])
    plan.append(["f"])
    if stream_at is not None:
        plan.append(["wait"])
        for _ in range(3):
            off = rnd.randrange(0, size // 4096) * 4096
            plan.append(["w", off, 4096, rnd.randrange(1 << 30)])
        plan.append(["f"])
    return plan


# Two fsync windows each: the first allocates (the L2 table, a reserve of clusters whose
# refcounts its flush syncs), the second puts data into a cluster of that synced reserve
# and names it in the L2 table, so no refcount write orders anything in that window.
# (mid runs, sparse base, plan)
SCENARIOS: dict[str, tuple[list[tuple[int, int]] | None, bool, list[list]]] = {
    # the repro: 4 KiB at 0, fsync; 4 KiB at 1 MiB + 4 KiB, fsync
    "write": (None, False, [["w", 0, 4096, 11], ["f"], ["w", MiB + 4096, 4096, 12], ["f"]]),
    # the second window is a copy-on-read of a cluster the backing file holds
    "copy-on-read": (None, False, [["w", 0, 4096, 11], ["f"], ["r", MiB + 4096, 4096],
                                   ["f"]]),
    # a copy-up of a cluster a qcow2 middle layer holds: copy_file_range
    "copy-up": ([(MiB, 2 * 65536)], False, [["w", 0, 4096, 11], ["f"], ["c", MiB, 65536],
                                             ["f"]]),
    # a whole stream that copies two clusters (copy_file_range) and completes: its flush,
    # then the header rewrite that drops the backing file
    "stream": ([(MiB, 65536), (3 * MiB, 65536)], True,
               [["w", 0, 4096, 11], ["f"], ["stream", 0], ["wait"], ["w", 2 * MiB, 4096, 13],
                ["f"]]),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_windows_every_subset(shim: Path, tmp_path: Path, scenario: str) -> None:
    """Small journals, replayed in every subset of every window."""
    mid, sparse, plan = SCENARIOS[scenario]
    ch = make_chain(tmp_path / "c", 4 * MiB, 65536, seed=1, mid=mid, sparse_base=sparse)
    initial = ch.top.read_bytes()
    journal = run_engine(shim, ch, plan)
    assert_no_bad_states(ch, initial, journal, plan, seed=1, exhaustive=8, randoms=0,
                         min_states=20)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("cluster_size,l2_tables", [(65536, 0), (4096, 1)],
                         ids=["64k", "4k-evicting"])
def test_engine_random_cor_stream(shim: Path, tmp_path: Path, scale: str, cluster_size: int,
                                  l2_tables: int) -> None:
    """Random writes, discards and fsyncs, copy-on-read, and a whole stream that
    completes (the header rewrite drops the backing file), on the engine, over a qcow2
    middle layer (stream copies with copy_file_range) on a raw base; with 4 KiB clusters
    and a one-table L2 cache, dirty tables are also written back on eviction."""
    big = scale == "big"
    rnd = random.Random(cluster_size + l2_tables)
    ch = make_chain(tmp_path / "c", 4 * MiB, cluster_size, seed=2,
                    mid=random_runs(rnd, 4 * MiB, 16))
    initial = ch.top.read_bytes()
    steps = 160 if big else 40
    plan = random_plan(rnd, ch.size, steps, stream_at=steps // 2, speed=8 * MiB, copy_up=True)
    journal = run_engine(shim, ch, plan, l2_tables)
    assert_no_bad_states(ch, initial, journal, plan, seed=3, exhaustive=6 if big else 3,
                         randoms=24 if big else 4, min_states=60)


@pytest.mark.parametrize("scale", SCALES)
def test_fuse_random_cor_stream(shim: Path, tmp_path: Path, scale: str) -> None:
    """The same through `vdisk serve`: a second process writes, discards and reads through
    the FUSE file and fsyncs it, and streams the chain over QMP while it writes."""
    big = scale == "big"
    rnd = random.Random(5)
    ch = make_chain(tmp_path / "c", 4 * MiB, 65536, seed=4, mid=random_runs(rnd, 4 * MiB, 16))
    initial = ch.top.read_bytes()
    steps = 160 if big else 40
    plan = random_plan(rnd, ch.size, steps, stream_at=steps // 2, speed=4 * MiB,
                       copy_up=False)
    journal = run_fuse(shim, ch, plan)
    assert_no_bad_states(ch, initial, journal, plan, seed=6, exhaustive=6 if big else 3,
                         randoms=24 if big else 4, min_states=60)


def test_replay_model_finds_the_unordered_l2_entry(tmp_path: Path) -> None:
    """The model has teeth: every change qemu-io makes for one write, replayed as one
    window without a barrier (an L2 entry and the data cluster it names made durable
    in the same window, the bug), gives states that the oracles reject."""
    ch = make_chain(tmp_path / "c", 4 * MiB, 65536, seed=7)
    initial = ch.top.read_bytes()
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 4k", str(ch.top)], check=True,
                   capture_output=True)
    after = ch.top.read_bytes()
    journal: list[Op] = []
    for c in range(0, len(after), 65536):  # what changed, one pwrite per cluster
        new = after[c:c + 65536]
        if new != initial[c:c + 65536]:
            journal.append(Op("W", c, len(new), 0, new))
    journal += [Op("S", 0, 0, 0), Op("M", 0, 3, 0, b"a1\n")]
    res = replay(ch, initial, journal, [(0, b"\x5a" * 4096)], seed=8, exhaustive=8,
                 randoms=0)
    assert any("qemu-img check" in f for f in res.failures), res.failures
    assert any("reads zeroes, not the backing file" in f for f in res.failures), res.failures
