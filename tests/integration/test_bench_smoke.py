"""Smoke run of scripts/bench: a tiny chain, short fio runs; every figure for both sides.

No timing asserts: only that the bench runs end to end, cleans up, and reports every
figure (and the qemu-img reference and the targets) in its JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.leftovers import mounts_under

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("fio", "qemu-storage-daemon", "qemu-img")),
    reason="needs fio, qemu-img and qemu-storage-daemon",
)



@pytest.mark.slow
def test_bench_quick_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--size", "16M",
         "--runtime", "0.5", "--json", str(out), "--workdir", str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    doc = json.loads(out.read_text())
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_lib.report import FIGURES

    figs = doc["figures"]
    for f in FIGURES:
        entry = figs[f.key]
        for side in ("vdisk", "qsd"):
            assert isinstance(entry[side], (int, float)), (f.key, side, entry)
            assert entry[side] >= 0, (f.key, side, entry)
        assert entry["ratio"] is not None, f.key
        assert entry["better"] in ("higher", "lower")
    assert doc["reference"]["qemu_img_rebase_s"] > 0
    assert doc["targets"] and all(t["met"] in (True, False) for t in doc["targets"])
    for key in ("nproc", "cpu", "kernel", "qemu", "python"):
        assert doc["machine"][key]
    assert "vdisk/qsd" in res.stdout  # the table was printed
    assert not work.exists()  # scratch removed
    assert mounts_under(tmp_path) == []  # nothing left mounted
