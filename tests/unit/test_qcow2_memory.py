"""Bounded memory: a 2 TiB sparse image is served with small RSS; tiny caches still work."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.commands import assert_clean, qemu_img, run
from vdisk.engine.qcow2 import create_qcow2, open_qcow2

REPO = str(ROOT)

CHILD = r"""
import hashlib, json, random, sys
from vdisk.engine.qcow2 import open_qcow2
path = sys.argv[1]
rnd = random.Random(7)
img = open_qcow2(path, read_only=False)
size = img.virtual_size
done = []
for i in range(200):
    off = rnd.randrange(0, size - (1 << 20))
    n = rnd.choice([512, 4096, 65536, 300000, 1 << 20])
    data = rnd.randbytes(n)
    img.write(off, data)
    done.append((off, n, hashlib.sha256(data).hexdigest()))
    if i % 50 == 0:
        img.flush()
for off, n, h in done[-50:]:
    assert hashlib.sha256(img.read(off, n)).hexdigest() == h
for _ in range(150):
    off = rnd.randrange(0, size - (1 << 20))
    img.read(off, 1 << 20)
pos, runs = 0, 0
while pos < size and runs < 5000:
    e = img.layer_status(pos, size - pos)
    pos += e.length
    runs += 1
img.close()
# VmHWM: peak RSS of this process image (ru_maxrss would include the forking parent's)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"maxrss_kib": int(hwm),
                  "writes": [d for d in done[:20]]}))
"""


@pytest.mark.slow
def test_2tib_sparse_rss(tmp_path: Path) -> None:
    p = tmp_path / "huge.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "2T")
    out = subprocess.run([sys.executable, "-c", CHILD, str(p)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["maxrss_kib"] < 100 * 1024, res["maxrss_kib"]
    assert_clean(p)
    # the first writes read back in a fresh process, and qemu-img map sees them allocated
    with open_qcow2(str(p), read_only=True) as img:
        for off, n, h in res["writes"]:
            assert hashlib.sha256(img.read(off, n)).hexdigest() == h
    mapped = json.loads(qemu_img("map", "--output=json", str(p)))
    for off, n, _ in res["writes"]:
        assert any(e["data"] and e["start"] <= off and off + n <= e["start"] + e["length"]
                   for e in mapped), off


def test_tiny_caches_evict_correctly(tmp_path: Path) -> None:
    size = 6 << 20
    p = tmp_path / "t.qcow2"
    create_qcow2(str(p), size, cluster_size=512, refcount_bits=4)
    rnd = random.Random(3)
    model = bytearray(size)
    with open_qcow2(str(p), read_only=False) as img:
        img.l2_cache.capacity = 2
        img.rc.cache.capacity = 1
        for _ in range(200):
            off = rnd.randrange(0, size - 1)
            n = rnd.randrange(1, min(size - off, 100_000) + 1)
            if rnd.random() < 0.7:
                d = rnd.randbytes(n)
                img.write(off, d)
                model[off:off + n] = d
            else:
                img.write_zeroes(off, n, unmap=True)
                model[off:off + n] = bytes(n)
            assert len(img.l2_cache) <= 2 and len(img.rc.cache) <= 1
        assert img.read(0, size) == model
    assert_clean(p)
    raw = tmp_path / "m.raw"
    raw.write_bytes(bytes(model))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(p), str(raw))
