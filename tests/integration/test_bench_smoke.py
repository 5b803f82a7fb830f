"""Smoke runs of scripts/bench: a tiny chain, short fio runs; every figure for both sides.

No timing asserts: only that the bench runs end to end, cleans up (no mount, loop device
or qemu left), and reports every figure (and the qemu-img reference and the targets) in
its JSON. The I/O matrix on the host's access paths in one run; the VM guest (TCG) in
another, which needs qemu-system-x86_64 and busybox (scripts/bench installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT
from tests.helpers.leftovers import loops_under, mounts_under

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("fio", "qemu-storage-daemon", "qemu-img", "losetup")),
    reason="needs fio, qemu-img, qemu-storage-daemon and losetup",
)
HOST_PATHS = "fuse-direct,fuse-buffered,loop-buffered,loop-direct"


def bench(tmp_path: Path, *args: str, timeout: float) -> tuple[dict[str, Any], str]:
    """Run a --quick bench on a 16 MiB chain; its JSON and its stdout, after checking that
    it succeeded and left nothing behind."""
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--size", "16M",
         "--runtime", "0.5", "--json", str(out), "--workdir", str(work), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    assert not work.exists()  # scratch removed
    assert mounts_under(tmp_path) == []  # nothing left mounted
    assert loops_under(tmp_path) == []  # no loop device left on a served file
    assert qemus_on(tmp_path) == []
    return json.loads(out.read_text()), res.stdout


def qemus_on(root: Path) -> list[int]:
    """Pids of qemu-system processes whose command line names a file under root."""
    found = []
    for name in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].startswith(b"qemu-system") and str(root).encode() in b" ".join(argv):
            found.append(int(name))
    return found


def figure_keys(guest: bool) -> list[str]:
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_lib.report import FIGURES

    return [f.key for f in FIGURES if f.key.startswith("guest.") == guest]


def check_figure(figs: dict[str, Any], key: str) -> None:
    entry = figs[key]
    for side in ("vdisk", "qsd"):
        assert isinstance(entry[side], (int, float)), (key, side, entry)
        assert entry[side] >= 0, (key, side, entry)
    assert entry["ratio"] is not None, key
    assert entry["better"] in ("higher", "lower")


@pytest.mark.slow
def test_bench_quick_reports_every_figure(tmp_path: Path) -> None:
    doc, stdout = bench(tmp_path, "--paths", HOST_PATHS, timeout=300)
    figs = doc["figures"]
    keys = figure_keys(guest=False)
    for prefix in ("fuse_buffered.", "loop_buffered.", "loop_direct."):
        assert sum(k.startswith(prefix) for k in keys) == 6, prefix
    for key in keys:
        check_figure(figs, key)
    for key in figure_keys(guest=True):  # not asked for: not measured, not in the table
        assert figs[key]["vdisk"] is None and figs[key]["qsd"] is None, key
        assert figs[key]["label"] not in stdout
    assert doc["reference"]["qemu_img_rebase_s"] > 0
    floor = doc["reference"]["request_floor"]  # vdisk, qsd and a bare pyfuse3 passthrough
    for server in ("vdisk", "qsd", "passthrough"):
        for job in ("randread_4k_j1", "randwrite_4k_j1"):
            assert floor[server][job]["iops"] > 0 and floor[server][job]["cpu_us_per_request"] > 0
    assert doc["targets"] and all(t["met"] in (True, False) for t in doc["targets"])
    by_name = {t["target"]: t for t in doc["targets"]}
    assert by_name["RSS idle: vdisk/qsd"]["rule"] == "<=" and \
        by_name["RSS idle: vdisk/qsd"]["limit"] == 2.0
    for key in keys:
        f = figs[key]
        if key.endswith(("_iops", "_mbps")):
            t = by_name[f"{f['label']}: vdisk/qsd"]
            assert (t["rule"], t["limit"]) == (">=", 1.0), t
    assert doc["config"]["paths"] == HOST_PATHS.split(",")
    for key in ("nproc", "cpu", "kernel", "qemu", "python"):
        assert doc["machine"][key]
    assert "vdisk/qsd" in stdout  # the table was printed


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or
                    not Path("/bin/busybox").exists(),
                    reason="needs qemu-system-x86_64 and busybox (qemu-system-x86, busybox-static)")
def test_bench_quick_guest_reports_its_figures(tmp_path: Path) -> None:
    doc, stdout = bench(tmp_path, "--paths", "guest", "--no-remote", timeout=400)
    figs = doc["figures"]
    keys = figure_keys(guest=True)
    assert len(keys) == 4
    for key in keys:
        check_figure(figs, key)
        assert figs[key]["vdisk"] > 0 and figs[key]["qsd"] > 0, key
        assert figs[key]["label"] in stdout
    for side in ("vdisk", "qsd"):
        assert doc["raw"][side]["guest_run_s"] > 0
        assert doc["raw"][side]["rss_idle_mib"] > 0  # measured before the guest's I/O
    assert figs["randread_4k_j1_iops"]["vdisk"] is None  # fuse-direct was not asked for
    assert any(n.startswith("guest: qemu-system-x86_64 -accel tcg") for n in doc["notes"])
