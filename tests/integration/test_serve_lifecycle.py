"""`vdisk serve` start and stop: clean stops persist unflushed writes and release
everything; a killed daemon's dead mount is cleared by the next one; start-up errors are
one line, a non-zero exit, and leave no mount and no socket."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers.commands import qemu_img, qemu_io, run
from tests.helpers.daemon import force_unmount, is_mounted, run_serve, serving, start
from tests.helpers.locks import QemuHolder, locked_bytes

MiB = 1 << 20


def _image(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 0x21 0 4M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd=tmp_path)
    return base, top


def _expect(tmp_path: Path) -> Path:
    expect = tmp_path / "expect.raw"
    qemu_img("create", "-f", "raw", expect, "4M")
    qemu_io(expect, "write -P 0x21 0 4M", "write -P 0x77 100000 300000", fmt="raw")
    return expect


def _write_unflushed(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"\x77" * 300000, 100000) == 300000  # no fsync
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["sigterm", "sigint", "sighup", "qmp-quit", "unmount"])
def test_clean_stop_persists_unflushed_writes(tmp_path: Path, how: str) -> None:
    base, top = _image(tmp_path)
    with serving(tmp_path, f"id=d0,file={top}") as srv:
        _write_unflushed(srv.path("d0"))
        assert locked_bytes(top)
        if how == "qmp-quit":
            assert srv.qmp("quit") == {}
            assert srv.wait() == 0
        elif how == "unmount":  # someone unmounts the file system under the daemon
            subprocess.run(["fusermount3", "-u", str(srv.mount)], check=True)
            assert srv.wait() == 0
        else:
            assert srv.stop(getattr(signal, how.upper())) == 0
        assert not is_mounted(srv.mount)
        assert not srv.qmp_path.exists()
        assert "Traceback" not in srv.stderr
        assert "stopped" in srv.stderr
    assert locked_bytes(top) == [] and locked_bytes(base) == []
    qemu_img("compare", "-f", "qcow2", "-F", "raw", top, _expect(tmp_path))
    qemu_img("check", top)


def test_kill9_then_restart_clears_stale_mount(tmp_path: Path) -> None:
    _, top = _image(tmp_path)
    mnt = tmp_path / "mnt"
    srv = start(tmp_path, [f"id=d0,file={top}"], name="first")
    try:
        _write_unflushed(srv.path("d0"))
        srv.kill()
        assert is_mounted(mnt)
        with pytest.raises(OSError):
            os.stat(mnt / "d0")
        with serving(tmp_path, f"id=d0,file={top}", name="second") as srv2:
            assert "stale" in srv2.stderr
            assert srv2.path("d0").stat().st_size == 4 * MiB
            assert srv2.stop() == 0
        assert not is_mounted(mnt)
        # a crash may leak clusters (exit 3), never corrupt (exit 2)
        assert run("qemu-img", "check", top, check=False).returncode in (0, 3)
    finally:
        if srv.proc.poll() is None:
            srv.kill()
        force_unmount(mnt)


def _errors_ok(res: subprocess.CompletedProcess[str], mnt: Path, sock: Path) -> str:
    try:
        assert res.returncode != 0, res.stderr
        assert "Traceback" not in res.stderr, res.stderr
        assert not is_mounted(mnt)
        assert not sock.exists()
        return res.stderr
    finally:
        force_unmount(mnt)


def _one_line(res: subprocess.CompletedProcess[str], mnt: Path, sock: Path) -> str:
    err = _errors_ok(res, mnt, sock)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vdisk: "), err
    return lines[0]


@pytest.mark.slow
def test_startup_errors(tmp_path: Path) -> None:
    _, top = _image(tmp_path)
    mnt, sock = tmp_path / "mnt", tmp_path / "q.sock"
    common = ["--mount", str(mnt), "--qmp", str(sock)]

    def serve(*drives: str, extra: tuple[str, ...] = ()) -> str:
        args = [*common, *extra]
        for d in drives:
            args += ["--drive", d]
        return _one_line(run_serve(tmp_path, args), mnt, sock)

    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 1000)
    assert str(bad) in serve(f"id=d0,file={bad}")
    orphan = tmp_path / "orphan.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", "-u", orphan, "4M",
             cwd=tmp_path)
    assert "gone.qcow2" in serve(f"id=d0,file={orphan}")
    assert "nothere.qcow2" in serve(f"id=d0,file={tmp_path / 'nothere.qcow2'}")
    with QemuHolder(top, "qcow2"):
        line = serve(f"id=d0,file={top}")
        assert str(top) in line and ("lock" in line or "in use" in line)
    assert "d0" in serve(f"id=d0,file={top}", f"id=d0,file={tmp_path / 'base.qcow2'}")
    assert "'colour'" in serve(f"id=d0,file={top},colour=red")
    assert "id=" in serve(f"file={top}")
    assert "file=" in serve("id=d0")
    assert "copy-on-read" in serve(f"id=d0,file={top},copy-on-read=maybe")
    # two drives with one image: the second open finds the first's lock
    assert str(top) in serve(f"id=a,file={top}", f"id=b,file={top}")
    inside = ["--mount", str(mnt), "--qmp", str(mnt / "q.sock"), "--drive", f"id=d0,file={top}"]
    assert "mount point" in _one_line(run_serve(tmp_path, inside), mnt, mnt / "q.sock")
    # QMP socket problems show up after the mount is live: it must be undone
    nodir = tmp_path / "nodir" / "q.sock"
    res = run_serve(tmp_path, ["--mount", str(mnt), "--qmp", str(nodir),
                               "--drive", f"id=d0,file={top}"])
    assert "nodir" in _one_line(res, mnt, nodir)
    notsock = tmp_path / "notsock"
    notsock.write_text("x")
    res = run_serve(tmp_path, ["--mount", str(mnt), "--qmp", str(notsock),
                               "--drive", f"id=d0,file={top}"])
    assert str(notsock) in _one_line(res, mnt, tmp_path / "absent")
    assert notsock.read_text() == "x" and locked_bytes(top) == []
    # unknown option: argparse's message names it (usage line allowed), no traceback
    err = _errors_ok(run_serve(tmp_path, [*common, "--drive", f"id=d0,file={top}",
                                          "--bogus"]), mnt, sock)
    assert "--bogus" in err
    assert not mnt.exists() or not os.listdir(mnt)


@pytest.mark.slow
@pytest.mark.root
def test_busy_mount_point(tmp_path: Path) -> None:
    _, top = _image(tmp_path)
    mnt, sock = tmp_path / "mnt", tmp_path / "q.sock"
    args = ["--mount", str(mnt), "--qmp", str(sock), "--drive", f"id=d0,file={top}"]
    mnt.mkdir()
    (mnt / "somefile").write_text("x")
    line = _one_line(run_serve(tmp_path, args), mnt, sock)
    assert str(mnt) in line and "busy" in line
    (mnt / "somefile").unlink()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        res = run_serve(tmp_path, args)
        assert is_mounted(mnt)  # the other program's mount is left alone
        subprocess.run(["umount", str(mnt)], check=True)
        line = _one_line(res, mnt, sock)
        assert str(mnt) in line and "busy" in line
    finally:
        force_unmount(mnt)
    # a live vdisk at the mount point
    with serving(tmp_path, f"id=d0,file={top}") as srv:
        other = ["--mount", str(mnt), "--qmp", str(tmp_path / "q2.sock"),
                 "--drive", f"id=x,file={tmp_path / 'base.qcow2'},read-only=on"]
        res = run_serve(tmp_path, other)
        assert res.returncode != 0 and "busy" in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        assert is_mounted(mnt) and srv.path("d0").exists()
        # a stuck (stopped) vdisk there: refused after a bounded wait, not a hang
        os.kill(srv.pid, signal.SIGSTOP)
        try:
            res = run_serve(tmp_path, other)
        finally:
            os.kill(srv.pid, signal.SIGCONT)
        assert res.returncode != 0 and "does not answer" in res.stderr, res.stderr
        assert srv.path("d0").exists()
        assert srv.stop() == 0
