"""Crash test: a child writes and flushes; SIGKILL at random moments; after every kill
qemu-img check finds no corruption and every write acknowledged by a flush reads back."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.commands import qemu_check, qemu_img
from vdisk.engine.chain import close_chain, open_chain
from vdisk.engine.qcow2 import check_qcow2, create_qcow2

REPO = str(ROOT)
SIZE = 32 << 20
ROUNDS = 15
PER_ROUND = 120

CHILD = r"""
import json, random, sys
from vdisk.engine.qcow2 import open_qcow2
from vdisk.engine.raw import open_raw
path, slots_file, rnd_seed, base = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
slots = json.load(open(slots_file))
img = open_qcow2(path, read_only=False)
img.backing = open_raw(base, read_only=True)
rnd = random.Random(rnd_seed)
print("open", flush=True)
for i, (off, n, kind, seed) in enumerate(slots):
    if kind == "w":
        img.write(off, random.Random(seed).randbytes(n))
    else:
        img.write_zeroes(off, n, unmap=kind == "u")
    if rnd.random() < 0.3:
        img.flush()
        print("ack", i, flush=True)
img.flush()
print("ack", len(slots) - 1, flush=True)
print("done", flush=True)
import time
time.sleep(60)
"""


def _slots(rnd: random.Random) -> list[list]:
    """Non-overlapping unaligned slots, several per 64 KiB cluster, shuffled into rounds."""
    n = ROUNDS * PER_ROUND
    region = SIZE // n
    out = []
    for k in range(n):
        a = k * region + rnd.randrange(0, region // 4)
        ln = rnd.randrange(1, region - (a - k * region))
        r = rnd.random()
        kind = "w" if r < 0.7 else ("u" if r < 0.85 else "z")
        out.append([a, ln, kind, rnd.randrange(1 << 30)])
    rnd.shuffle(out)
    return out


def _expected(slot: list) -> bytes:
    off, n, kind, seed = slot
    return random.Random(seed).randbytes(n) if kind == "w" else bytes(n)


@pytest.mark.slow
@pytest.mark.parametrize("cs,rbits", [(65536, 16), (512, 64)])
def test_sigkill_rounds(tmp_path: Path, cs: int, rbits: int) -> None:
    """64 KiB clusters; and 512 B clusters with 64-bit refcounts, where the refcount table
    keeps moving (new refcount blocks and tables) while the writer gets killed."""
    rnd = random.Random(2024 + cs)
    base = tmp_path / "base.raw"
    base_data = random.Random(1).randbytes(SIZE)
    base.write_bytes(base_data)
    top = tmp_path / "top.qcow2"
    create_qcow2(str(top), SIZE, backing_name="base.raw", backing_format="raw", cluster_size=cs,
                 refcount_bits=rbits)
    slots = _slots(rnd)
    acked: list[list] = []
    written: list[list] = []  # slots the child may have touched (acked or not)
    env = dict(os.environ, PYTHONPATH=REPO)
    mid = 0  # rounds killed before the child finished
    for r in range(ROUNDS):
        chunk = slots[r * PER_ROUND:(r + 1) * PER_ROUND]
        sf = tmp_path / f"slots{r}.json"
        sf.write_text(json.dumps(chunk))
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(top), str(sf), str(r),
                                  str(base)],
                                 stdout=subprocess.PIPE, env=env)
        assert child.stdout is not None
        out = b""
        try:
            # let it run until a random number of acknowledged flushes, plus a random while
            target = rnd.randrange(0, 25)
            deadline = time.monotonic() + 20
            while (b"open" not in out or out.count(b"ack ") < target) and \
                    b"done" not in out and time.monotonic() < deadline:
                if select.select([child.stdout], [], [], 0.5)[0]:
                    out += os.read(child.stdout.fileno(), 4096)
            assert b"open" in out, out
            time.sleep(rnd.uniform(0.0, 0.01))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        out += child.stdout.read()
        child.stdout.close()
        last = -1
        for line in out.decode().split("\n")[:-1]:  # complete lines only
            if line.startswith("ack "):
                last = int(line.split()[1])
        mid += b"done" not in out
        acked += chunk[:last + 1]
        written += chunk
        rc, q = qemu_check(top)
        assert rc in (0, 3) and q.get("corruptions", 0) == 0, (r, q)
        mine = check_qcow2(str(top))
        assert (mine.corruptions, mine.leaks) == (0, q.get("leaks", 0)), mine.messages
        img = open_chain(str(top), read_only=True)
        try:
            for s in acked:
                assert img.read(s[0], s[1]) == _expected(s), (r, s)
            # bytes outside every slot still come from the base
            covered = sorted((s[0], s[0] + s[1]) for s in written)
            pos = 0
            for a, b in covered + [(SIZE, SIZE)]:
                if a > pos:
                    k = min(a - pos, 4096)
                    assert img.read(pos, k) == base_data[pos:pos + k], (r, pos)
                pos = max(pos, b)
        finally:
            close_chain(img)
    assert mid >= ROUNDS // 3, mid
    if cs == 512:  # the refcount table did move
        with open(top, "rb") as f:
            f.seek(56)
            assert int.from_bytes(f.read(4), "big") > 1
    # the leaks a crash may leave are repairable
    check_qcow2(str(top), repair="leaks")
    rc, q = qemu_check(top)
    assert rc == 0, q
    assert qemu_img("info", str(top))
