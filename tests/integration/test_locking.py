"""vdisk and QEMU respect each other's image locks (QEMU's OFD lock protocol)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.chains import make_chain
from tests.helpers.commands import qemu_img, run, vdisk
from tests.helpers.locks import QemuHolder, locked_bytes
from vdisk.engine.chain import close_chain, open_chain
from vdisk.errors import LockError


def qemu_ok(*cmd: str | Path) -> bool:
    res = run(*cmd, check=False)
    if res.returncode != 0:
        assert "lock" in res.stderr, res.stderr
    return res.returncode == 0


def test_vdisk_writer_locks_raw(tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    qemu_img("create", "-f", "raw", raw, "1M")
    top = open_chain(str(raw), read_only=False)
    try:
        assert not qemu_ok("qemu-io", "-f", "raw", "-c", "write 0 512", raw)
        # QEMU's own raw readers share the write permission, so they may still read
        assert qemu_ok("qemu-io", "-r", "-f", "raw", "-c", "read 0 512", raw)
        assert qemu_ok("qemu-img", "info", raw)
        with pytest.raises(LockError, match="in use"):
            open_chain(str(raw), read_only=False)
    finally:
        close_chain(top)
    assert locked_bytes(raw) == []
    assert qemu_ok("qemu-io", "-f", "raw", "-c", "write 0 512", raw)


def test_qemu_writer_locks_out_vdisk_raw(tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    qemu_img("create", "-f", "raw", raw, "1M")
    with QemuHolder(raw, "raw"):
        for ro in (False, True):
            with pytest.raises(LockError, match="in use") as e:
                open_chain(str(raw), read_only=ro)
            assert str(raw) in str(e.value)
        res = vdisk("info", raw, check=False)
        assert res.returncode == 1 and "in use" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        assert vdisk("info", "-U", raw).returncode == 0
        top = open_chain(str(raw), read_only=True, force_share=True)
        close_chain(top)
        with pytest.raises(Exception, match="read-only"):
            open_chain(str(raw), read_only=False, force_share=True)
    top = open_chain(str(raw), read_only=False)
    close_chain(top)


@pytest.mark.slow
def test_vdisk_writer_locks_qcow2_chain(tmp_path: Path) -> None:
    imgs = make_chain(tmp_path)
    top = open_chain(str(imgs["top"]), read_only=False)
    try:
        t, m, b = imgs["top"], imgs["mid"], imgs["base"]
        # the top: nobody else may even read it consistently (qcow2 metadata)
        assert not qemu_ok("qemu-img", "info", t)
        assert qemu_ok("qemu-img", "info", "-U", t)
        assert not qemu_ok("qemu-io", "-c", "write 0 512", t)
        assert not qemu_ok("qemu-io", "-r", "-c", "read 0 512", t)
        # backing files are locked read-only: QEMU can read them but not write them
        assert qemu_ok("qemu-img", "info", m)
        assert qemu_ok("qemu-io", "-r", "-c", "read 0 512", m)
        assert not qemu_ok("qemu-io", "-c", "write 0 512", m)
        assert qemu_ok("qemu-io", "-r", "-f", "raw", "-c", "read 0 512", b)
        assert not qemu_ok("qemu-io", "-f", "raw", "-c", "write 0 512", b)
        res = vdisk("info", t, check=False)
        assert res.returncode == 1 and "in use" in res.stderr
        assert "Traceback" not in res.stderr
        assert vdisk("info", "-U", "--backing-chain", t).returncode == 0
        assert vdisk("map", "-U", t).returncode == 0
    finally:
        close_chain(top)
    for p in imgs.values():
        assert locked_bytes(p) == []
    assert qemu_ok("qemu-io", "-c", "write 0 512", imgs["mid"])


@pytest.mark.slow
def test_qemu_writer_locks_out_vdisk_qcow2(tmp_path: Path) -> None:
    imgs = make_chain(tmp_path)
    with QemuHolder(imgs["top"], "qcow2"):
        for ro in (False, True):
            with pytest.raises(LockError, match="in use"):
                open_chain(str(imgs["top"]), read_only=ro)
        # QEMU holds the backing files read-only: vdisk can read, not write, them
        with pytest.raises(LockError, match="in use"):
            open_chain(str(imgs["mid"]), read_only=False)
        mid = open_chain(str(imgs["mid"]), read_only=True)
        close_chain(mid)
        res = vdisk("info", imgs["top"], check=False)
        assert res.returncode == 1 and "in use" in res.stderr
        res = vdisk("info", "-U", "--output=json", imgs["top"])
        assert '"format": "qcow2"' in res.stdout
        # like qemu-img create, an overlay may be made over an image in use
        vdisk("create", "-f", "qcow2", "-b", imgs["top"], "-F", "qcow2", tmp_path / "new.qcow2")
        assert vdisk("check", "-U", imgs["top"]).returncode == 0
        res = vdisk("check", imgs["top"], check=False)
        assert res.returncode == 1 and "in use" in res.stderr
    qemu_img("check", tmp_path / "new.qcow2")
    top = open_chain(str(imgs["top"]), read_only=False)
    close_chain(top)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_create_refuses_image_in_use(tmp_path: Path, fmt: str) -> None:
    p = tmp_path / f"busy.{fmt}"
    qemu_img("create", "-f", fmt, p, "1M")
    before = p.read_bytes()
    with QemuHolder(p, fmt):
        res = vdisk("create", "-f", fmt, p, "2M", check=False)
        assert res.returncode == 1 and "in use" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert p.read_bytes() == before


@pytest.mark.slow
def test_storage_daemon_export_locks_out_vdisk(tmp_path: Path) -> None:
    """A writable NBD export in qemu-storage-daemon: vdisk can neither write nor read the top."""
    import subprocess
    import time

    imgs = make_chain(tmp_path)
    top = imgs["top"]
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f,filename={top}",
         "--blockdev", "driver=qcow2,node-name=q,file=f",
         "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
         "--export", "type=nbd,id=e,node-name=q,writable=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not {101, 203} <= set(locked_bytes(top)):
            assert proc.poll() is None and time.monotonic() < deadline, "qsd did not start"
            time.sleep(0.02)
        for ro in (False, True):
            with pytest.raises(LockError, match="in use"):
                open_chain(str(top), read_only=ro)
        res = vdisk("map", top, check=False)
        assert res.returncode == 1 and "in use" in res.stderr
        assert vdisk("map", "-U", "--output=json", top).returncode == 0
        assert vdisk("check", "-U", top).returncode == 0
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    close_chain(open_chain(str(top), read_only=False))
