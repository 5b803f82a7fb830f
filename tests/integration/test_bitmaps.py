"""Persistent dirty bitmaps through `vdisk serve`: ranges written through the FUSE file are
in every enabled bitmap after a clean stop, read back with qemu-nbd -B and qemu-img map;
qemu-img check stays clean; a killed daemon leaves the bitmap in use (inconsistent), not
a corrupt image; the QMP commands answer as qemu-storage-daemon 7.2 does."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.bitmaps import bitmap_flags, expected, read_bitmap
from tests.helpers.commands import assert_clean, qemu_img, qemu_io, qemu_map
from tests.helpers.daemon import serving
from tests.helpers.qmp import QMP, qmp_session

pytestmark = pytest.mark.root

MiB = 1 << 20
SIZE = 16 * MiB
PUNCH, ZERO_RANGE = 0x03, 0x10  # FALLOC_FL_PUNCH_HOLE|KEEP_SIZE, FALLOC_FL_ZERO_RANGE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, off: int, n: int) -> None:
    if _libc.fallocate(fd, mode, off, n) != 0:
        raise OSError(ctypes.get_errno(), "fallocate")


def _image(tmp_path: Path, *bitmaps: tuple[str, int, bool], name: str = "top.qcow2",
           backing: Path | None = None) -> Path:
    p = tmp_path / name
    extra = ["-b", str(backing), "-F", "qcow2"] if backing else []
    qemu_img("create", "-f", "qcow2", *extra, p, str(SIZE))
    for bname, gran, enabled in bitmaps:
        qemu_img("bitmap", "--add", "-g", str(gran), *([] if enabled else ["--disable"]), p,
                 bname)
    return p


def _dirty_info(srv: Any, drive: str = "d0") -> list[dict[str, Any]]:
    entry = next(b for b in srv.qmp("query-block") if b["device"] == drive)
    return entry["inserted"].get("dirty-bitmaps", [])  # type: ignore[no-any-return]


def test_written_ranges_are_in_the_bitmaps(tmp_path: Path) -> None:
    top = _image(tmp_path, ("g64", 65536, True), ("g4k", 4096, True), ("off", 65536, False))
    writes = [(0, 1), (70_000, 5000), (3 * MiB + 100, 300_000), (SIZE - 10, 10)]
    zeroes = [(8 * MiB + 4096, 8192), (10 * MiB, 2 * MiB)]
    punches = [(5 * MiB, 65536 * 3), (12 * MiB + 512, 1000)]
    with serving(tmp_path, f"id=d0,file={top}") as srv:
        fd = os.open(srv.path("d0"), os.O_RDWR)
        try:
            for off, n in writes:
                assert os.pwrite(fd, os.urandom(n), off) == n
            for off, n in zeroes:
                _fallocate(fd, ZERO_RANGE, off, n)
            for off, n in punches:
                _fallocate(fd, PUNCH, off, n)
            os.fsync(fd)
        finally:
            os.close(fd)
        touched = writes + zeroes + punches
        info = {b["name"]: b for b in _dirty_info(srv)}
        assert bitmap_flags(top) == {"g64": ["in-use", "auto"], "g4k": ["in-use", "auto"],
                                     "off": ["in-use"]}  # in use while served
        assert srv.stop() == 0
    for name, gran in (("g64", 65536), ("g4k", 4096)):
        want = expected(touched, gran, SIZE)
        granules = sum(-(-n // gran) for _, n in want)
        assert info[name] == {"name": name, "recording": True, "persistent": True,
                              "busy": False, "granularity": gran, "count": granules * gran}
        assert read_bitmap(top, name, tmp_path) == want
    assert info["off"]["recording"] is False and info["off"]["count"] == 0
    assert read_bitmap(top, "off", tmp_path) == []
    assert bitmap_flags(top) == {"g64": ["auto"], "g4k": ["auto"], "off": []}
    assert_clean(top)


def test_copy_on_read_and_stream_count_as_writes(tmp_path: Path) -> None:
    """Copies into the top are writes to it: after reads (copy-on-read) and a stream the
    bitmap (cluster granularity, top empty before) is exactly the top's allocation."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, str(SIZE))
    qemu_io(base, "write -P 7 1M 2M", "write -P 9 9M 64k")
    top = _image(tmp_path, ("b", 65536, True), backing=base)
    with serving(tmp_path, f"id=d0,file={top}") as srv:
        with open(srv.path("d0"), "rb") as f:
            f.seek(MiB + 70_000)
            f.read(4096)
        srv.qmp("block-stream", device="d0")
        deadline = time.monotonic() + 60
        while srv.qmp("query-block-jobs"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert srv.stop() == 0
    allocated = [(e["start"], e["length"]) for e in qemu_map(top)
                 if e["depth"] == 0 and (e["data"] or e["zero"])
                 and e.get("present", True)]
    assert allocated, "the stream copied nothing"
    assert read_bitmap(top, "b", tmp_path) == expected(allocated, 65536, SIZE)
    assert_clean(top)


@pytest.mark.slow
def test_killed_daemon_leaves_the_bitmap_in_use(tmp_path: Path) -> None:
    top = _image(tmp_path, ("b", 65536, True))
    with serving(tmp_path, f"id=d0,file={top}") as srv:
        fd = os.open(srv.path("d0"), os.O_RDWR)
        os.pwrite(fd, b"x" * 4096, MiB)
        os.fsync(fd)
        os.close(fd)
        srv.kill()
    assert bitmap_flags(top) == {"b": ["in-use", "auto"]}
    res = subprocess.run(["qemu-img", "check", "--output=json", str(top)],
                         capture_output=True, text=True)
    report = json.loads(res.stdout)
    assert res.returncode in (0, 3), res.stderr  # clean, or leaks (the allocation reserve)
    assert report["check-errors"] == 0 and "corruptions" not in report
    with serving(tmp_path, f"id=d0,file={top}", name="again") as srv:
        assert _dirty_info(srv) == [{"name": "b", "recording": False, "persistent": True,
                                     "busy": False, "granularity": 65536, "count": 0,
                                     "inconsistent": True}]
        assert "bitmap 'b' is in use" in srv.stderr and "inconsistent" in srv.stderr
        with qmp_session(srv.qmp_path) as q:
            assert _cmd(q, "block-dirty-bitmap-clear", {"node": "d0", "name": "b"}) == {
                "class": "GenericError", "desc": "Bitmap 'b' is inconsistent and cannot be used"}
            assert _cmd(q, "block-dirty-bitmap-remove", {"node": "d0", "name": "b"}) == {}
        assert srv.stop() == 0
    assert bitmap_flags(top) == {}
    qemu_img("check", "-r", "leaks", top)
    assert_clean(top)


def _qsd(img: Path, sock: Path, read_only: bool) -> subprocess.Popen[str]:
    ro = ",read-only=on" if read_only else ""
    proc = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={img}{ro}",
         "--blockdev", f"driver=qcow2,node-name=d0,file=f{ro}",
         "--chardev", f"socket,id=c,path={sock},server=on,wait=off", "--monitor", "chardev=c"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "qemu-storage-daemon did not start"
        time.sleep(0.02)
    return proc


COMMANDS: list[tuple[str, dict[str, Any]]] = [
    ("block-dirty-bitmap-add", {"node": "d0", "name": "p", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "p"}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "old"}),
    ("block-dirty-bitmap-add", {"node": "nope", "name": "x"}),
    ("block-dirty-bitmap-add", {"node": "nope", "name": ""}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": ""}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "g", "granularity": 1000}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "g", "granularity": 256}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "g", "granularity": 1 << 32}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "g", "granularity": -1}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "big", "granularity": 1 << 31,
                                "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "n" * 1024, "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "n" * 1024}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "dis", "granularity": 512,
                                "disabled": True, "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "t", "granularity": 4096}),
    ("block-dirty-bitmap-remove", {"node": "d0", "name": "zz"}),
    ("block-dirty-bitmap-remove", {"node": "nope", "name": "zz"}),
    ("block-dirty-bitmap-clear", {"node": "d0", "name": "zz"}),
    ("block-dirty-bitmap-clear", {"node": "nope", "name": "zz"}),
    ("block-dirty-bitmap-clear", {"node": "d0", "name": "old"}),
    ("block-dirty-bitmap-clear", {"node": "d0", "name": "t"}),
    ("block-dirty-bitmap-remove", {"node": "d0", "name": "t"}),
    ("block-dirty-bitmap-remove", {"node": "d0", "name": "old"}),
    ("block-dirty-bitmap-remove", {"node": "d0", "extra": 1}),
]


def _cmd(q: QMP, command: str, args: dict[str, Any]) -> Any:
    """The return value or the error of one command (args may hold "name")."""
    r = q.q.cmd_raw(command, args)
    return r.get("return", r.get("error"))


def _answers(q: QMP, commands: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    return [_cmd(q, name, args) for name, args in commands]


def _qsd_bitmaps(q: QMP) -> list[dict[str, Any]]:
    node = next(n for n in q.ok("query-named-block-nodes", flat=True)
                if n["node-name"] == "d0")
    return node.get("dirty-bitmaps", [])  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("read_only", [False, True])
def test_qmp_answers_as_qemu_storage_daemon(tmp_path: Path, read_only: bool) -> None:
    images = {}
    for who in ("vdisk", "qsd"):
        d = tmp_path / who
        d.mkdir()
        images[who] = _image(d, ("old", 65536, True), ("cold", 4096, False))
        qemu_io(images[who], "write 0 64k")
    commands = COMMANDS if not read_only else [
        ("block-dirty-bitmap-clear", {"node": "d0", "name": "old"}),
        ("block-dirty-bitmap-remove", {"node": "d0", "name": "old"}),
        ("block-dirty-bitmap-add", {"node": "d0", "name": "new", "persistent": True}),
        ("block-dirty-bitmap-add", {"node": "d0", "name": "mem"}),
        ("block-dirty-bitmap-remove", {"node": "d0", "name": "mem"}),
    ]
    sock = tmp_path / "qsd.sock"
    proc = _qsd(images["qsd"], sock, read_only)
    try:
        with qmp_session(sock) as q:
            want = _answers(q, commands)
            want_bitmaps = _qsd_bitmaps(q)
            q.cmd("quit")
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    ro = ",read-only=on" if read_only else ""
    with serving(tmp_path / "vdisk", f"id=d0,file={images['vdisk']}{ro}") as srv:
        with qmp_session(srv.qmp_path) as q:
            got = _answers(q, commands)
            got_bitmaps = _dirty_info(srv)
        assert srv.stop() == 0
    assert got == want
    assert got_bitmaps == want_bitmaps
    assert bitmap_flags(images["vdisk"]) == bitmap_flags(images["qsd"])
    for name in bitmap_flags(images["qsd"]):
        assert (read_bitmap(images["vdisk"], name, tmp_path)
                == read_bitmap(images["qsd"], name, tmp_path))
    assert_clean(images["vdisk"])
