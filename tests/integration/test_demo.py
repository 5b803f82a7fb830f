"""`vdisk demo` end to end: it succeeds, verifies, and leaves nothing behind (also on Ctrl-C)."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from vdisk.cli import _demo as demo_mod
from vdisk.errors import VdiskError

TIMEOUT = 60
LOSETUP = demo_mod.find_tool("losetup") or "losetup"  # before any test changes PATH


def _plain_path() -> str:
    """PATH without the sbin folders, as a normal user has it on Debian."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if not d.rstrip("/").endswith("/sbin"))


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp_path)  # the demo's folder is created here
    env["PATH"] = _plain_path()  # mkfs.ext4, losetup, mount: the demo finds them in sbin
    return env


def _leftovers(tmp_path: Path) -> list[str]:
    """Mounts, loop devices and processes that still refer to tmp_path; files in it."""
    found = []
    where = str(tmp_path)
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if where in line.split()[4]]
    res = subprocess.run([LOSETUP, "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=False)
    found += [f"loop {line}" for line in res.stdout.splitlines() if where in line]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if where.encode() in cmdline:
                found.append(f"process {pid}: {cmdline.decode(errors='replace')}")
    found += [f"file {p}" for p in tmp_path.iterdir()]
    return found


def _default_sigint() -> None:
    # A suite started in the background (`scripts/test &`, nohup) inherits SIGINT ignored,
    # and Python keeps it so: the demo would never see the test's Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _demo(tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vdisk", "demo"], cwd=ROOT,
                            env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            preexec_fn=_default_sigint)


def _loop_possible() -> bool:
    return demo_mod.loop_unavailable() is None


@pytest.mark.slow
def test_demo_runs_and_cleans_up(tmp_path: Path) -> None:
    proc = _demo(tmp_path)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert "\x1b[" not in out  # not a TTY: plain progress lines
    assert "Checksums verified" in out
    assert "BLOCK_JOB_COMPLETED" in out
    assert "backing_file_depth 0" in out
    assert "top.qcow2: qcow2, 64.0 MiB" in out and "backing base.raw" in out
    assert "no backing file" in out.split("6. ")[1]  # the chain after the stream
    if _loop_possible():
        assert "mounted its ext4 read-only" in out, out
        assert "8 files" in out
        assert re.search(r"^6\. Unmounted fs/, detached /dev/loop\d+, stopped the daemon ",
                         out, flags=re.M), out
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_demo_sigint_midway_cleans_up(tmp_path: Path) -> None:
    proc = _demo(tmp_path)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("4. Streaming"):
                proc.send_signal(signal.SIGINT)
                break
        out = "".join(lines) + proc.communicate(timeout=TIMEOUT)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert any(x.startswith("4. Streaming") for x in lines), "".join(lines)
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    assert "Interrupted: cleaned up" in out
    assert "Checksums verified" not in out
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_demo_without_loop_reads_the_raw_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(demo_mod, "loop_unavailable", lambda: "not running as root")
    monkeypatch.setattr(demo_mod, "READ_PAUSE", 0.0)
    out = io.StringIO()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert demo_mod.run_demo(out, speed=64 << 20) == 0
    text = out.getvalue()
    assert "Skipping the loop mount (not running as root)" in text
    assert "the whole 64.0 MiB disk" in text and "Checksums verified" in text
    assert "6. Stopped the daemon (SIGTERM), which unmounted mnt/. The chain now:" in text
    assert "detached" not in text and "Unmounted" not in text
    assert _leftovers(tmp_path) == []


def test_demo_reports_a_failed_start_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon that cannot start: one clear error, and still nothing left behind."""
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(demo_mod, "DRIVE", "bad/id")  # refused by vdisk serve
    with pytest.raises(VdiskError, match="vdisk serve exited with status 1"):
        demo_mod.run_demo(io.StringIO())
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_scripts_run_passes_arguments_and_exit_status(tmp_path: Path) -> None:
    """scripts/run sets up (idempotent), then runs vdisk with the arguments, from any folder."""
    run = ROOT / "scripts" / "run"
    ok = subprocess.run([str(run), "--version"], cwd=tmp_path, capture_output=True, text=True,
                        timeout=300, stdin=subprocess.DEVNULL)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("vdisk ")
    bad = subprocess.run([str(run), "info", str(tmp_path / "missing.qcow2")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("vdisk: ")
    assert "Traceback" not in bad.stderr


def test_tools_are_found_in_sbin_without_it_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _plain_path())
    for name in ("mkfs.ext4", "losetup"):
        assert shutil.which(name) is None, f"{name} is on {_plain_path()}"
        found = demo_mod.find_tool(name)
        assert found is not None, name
        assert os.path.dirname(found) in demo_mod.SBIN_DIRS and os.access(found, os.X_OK)
    assert demo_mod.find_tool("vdisk-no-such-tool") is None


def test_demo_names_a_missing_tool_and_its_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("TMPDIR", str(work))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("PATH", str(nowhere))
    monkeypatch.setattr(demo_mod, "SBIN_DIRS", (str(nowhere),))
    with pytest.raises(VdiskError) as err:
        demo_mod.run_demo(io.StringIO())
    assert str(err.value) == (f"demo failed: mkfs.ext4 is not installed (Debian/Ubuntu package "
                              f"e2fsprogs): not on PATH, nor in {nowhere}")
    assert _leftovers(work) == []


def test_fuse_unavailable_names_a_missing_device(tmp_path: Path) -> None:
    assert demo_mod.fuse_unavailable(str(tmp_path / "fuse")) == (
        f"there is no {tmp_path / 'fuse'} (load the kernel module: modprobe fuse; in a "
        "container, pass the device in)")
    assert demo_mod.fuse_unavailable() is None  # this suite serves through /dev/fuse
