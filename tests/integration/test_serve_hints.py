"""What `vdisk serve` and the offline commands tell the operator when something is in the
way: an external unmount, an image on a read-only file system or without write
permission, an image locked by another process. And a failed start leaves no mount
directory behind."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.commands import qemu_img, qemu_io, vdisk_cmd
from tests.helpers.daemon import run_serve, serving
from tests.helpers.locks import QemuHolder
from vdisk.service.mounts import force_unmount, is_mounted

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.getuid() != 0, reason="needs root (mount, setpriv)")]

READ_ONLY_HINT = "give read-only=on to serve it read-only"
FORCE_SHARE_HINT = "-U (--force-share) inspects it read-only without taking locks"


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdisk: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def vdisk(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(vdisk_cmd(*map(str, args)), capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_external_unmount_is_named_in_the_log(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    qemu_img("create", "-q", "-f", "raw", img, "1M")
    with serving(tmp_path, f"id=d0,file={img},format=raw") as srv:
        subprocess.run(["fusermount3", "-u", str(srv.mount)], check=True)
        assert srv.wait() == 0
    assert f"stopping: the mount at {srv.mount} was unmounted from outside" in srv.stderr
    assert "host-signal" not in srv.stderr


@pytest.fixture
def ro_fs(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs holding a qcow2 image over a raw one."""
    d = tmp_path / "ro"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(d)], check=True)
    try:
        qemu_img("create", "-q", "-f", "raw", d / "base.raw", "1M")
        qemu_io(d / "base.raw", "write -P 0x42 0 64k", fmt="raw")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", d / "top.qcow2",
                 cwd=d)
        subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        yield d
    finally:
        force_unmount(d)


def test_read_only_file_system(tmp_path: Path, ro_fs: Path) -> None:
    top = ro_fs / "top.qcow2"
    mnt = tmp_path / "new" / "dirs" / "mnt"  # nothing of it exists yet
    args = ["--mount", str(mnt), "--qmp", str(tmp_path / "q.sock")]
    line = one_line(run_serve(tmp_path, [*args, "--drive", f"id=d0,file={top}"]))
    assert line == f"vdisk: {top}: cannot open: Read-only file system; {READ_ONLY_HINT}"
    assert not (tmp_path / "new").exists()  # every directory it made is gone again
    # an existing mount directory is left as it was
    mnt.mkdir(parents=True)
    one_line(run_serve(tmp_path, [*args, "--drive", f"id=d0,file={top}"]))
    assert mnt.is_dir() and not is_mounted(mnt)
    with serving(tmp_path, f"id=d0,file={top},read-only=on", mount=mnt) as srv:
        assert srv.path("d0").read_bytes()[:65536] == b"\x42" * 65536
        assert srv.stop() == 0


def test_no_write_permission(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    img.chmod(0o444)
    mnt = tmp_path / "mnt"
    # root without CAP_DAC_OVERRIDE is bound by the mode bits, like any other user
    nocaps = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    serve = [*nocaps, *vdisk_cmd("serve", "--mount", str(mnt), "--qmp",
                                 str(tmp_path / "q.sock"), "--drive", f"id=d0,file={img}")]
    res = subprocess.run(serve, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert one_line(res) == f"vdisk: {img}: cannot open: Permission denied; {READ_ONLY_HINT}"
    assert not mnt.exists()
    img.chmod(0o000)  # unreadable too: read-only=on would not help, so no such hint
    res = subprocess.run(serve, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert one_line(res) == f"vdisk: {img}: cannot read: Permission denied"  # (probing)


@pytest.mark.slow
def test_lock_errors_point_at_force_share(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", top, "1M")
    with QemuHolder(top, "qcow2"):
        for cmd in (["info"], ["info", "--backing-chain"], ["map"], ["check"]):
            line = one_line(vdisk(*cmd, top))
            assert str(top) in line and line.endswith(FORCE_SHARE_HINT), (cmd, line)
            res = vdisk(*cmd, "-U", top)  # the hint holds: -U works
            assert res.returncode == 0, (cmd, res.stderr)
        # where -U cannot help, it is not offered
        for cmd in (["check", "-r", "leaks"], ["stream"]):
            line = one_line(vdisk(*cmd, top))
            assert "in use by another process" in line and "-U" not in line, (cmd, line)
        line = one_line(run_serve(tmp_path, ["--mount", str(tmp_path / "mnt"), "--qmp",
                                             str(tmp_path / "q.sock"), "--drive",
                                             f"id=d0,file={top}"]))
        assert "in use by another process" in line and "-U" not in line
        assert not (tmp_path / "mnt").exists()
