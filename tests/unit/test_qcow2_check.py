"""check_qcow2 agrees with qemu-img check on clean, leaky and corrupt images; repair works."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.helpers.chains import set_refcount
from tests.helpers.commands import assert_clean, guest_view, qemu_check, qemu_img, qemu_io, run
from vdisk.engine.qcow2 import check_qcow2


def _image(tmp: Path, opts: str = "compat=1.1", snapshot: bool = False) -> Path:
    p = tmp / "c.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, str(p), "16M")
    qemu_io(p, "write -P 1 0 300k", "write -P 2 5M 1M", "write -z 9M 128k")
    if snapshot:
        qemu_img("snapshot", "-c", "snap", str(p))
        qemu_io(p, "write -P 3 100k 64k", "write -P 4 12M 64k")
    return p


def _agree(p: Path) -> tuple[int, dict]:
    rc, q = qemu_check(p)
    mine = check_qcow2(str(p))
    assert (mine.corruptions, mine.leaks) == (q.get("corruptions", 0), q.get("leaks", 0)), (
        mine.messages, q)
    return rc, q


def _data_cluster(p: Path) -> int:
    for e in json.loads(qemu_img("map", "--output=json", str(p))):
        if e["data"] and "offset" in e:
            return e["offset"] >> 16
    raise AssertionError("no data cluster")


@pytest.mark.parametrize("opts,snap", [("compat=1.1", False), ("compat=0.10", True),
                                       ("extended_l2=on", False), ("refcount_bits=16", True)])
def test_clean_images(tmp_path: Path, opts: str, snap: bool) -> None:
    p = _image(tmp_path, opts, snap)
    rc, _ = _agree(p)
    assert rc == 0
    assert check_qcow2(str(p)).clean


def test_clean_compressed(tmp_path: Path) -> None:
    src = _image(tmp_path)
    for ctype in ("zlib", "zstd"):
        p = tmp_path / f"c-{ctype}.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", str(src),
                 str(p))
        rc, _ = _agree(p)
        assert rc == 0


def test_leak_by_refcount_edit_and_repair(tmp_path: Path) -> None:
    p = _image(tmp_path)
    size = p.stat().st_size
    with open(p, "r+b") as f:  # two unreferenced clusters with refcount 1
        f.truncate(size + 2 * 65536)
    set_refcount(p, size >> 16, 1)
    set_refcount(p, (size >> 16) + 1, 3)
    rc, q = _agree(p)
    assert rc == 3 and q["leaks"] == 2
    res = check_qcow2(str(p), repair="leaks")
    assert res.leaks_fixed == 2 and res.leaks == 0 and res.corruptions == 0
    assert_clean(p)


def test_shared_refcount_is_leak_and_copied_error(tmp_path: Path) -> None:
    p = _image(tmp_path)
    set_refcount(p, _data_cluster(p), 2)
    rc, q = _agree(p)
    assert rc == 2 and q["leaks"] == 1 and q["corruptions"] == 1
    res = check_qcow2(str(p), repair="all")
    assert res.leaks == 0 and res.corruptions == 0
    assert_clean(p)


def test_corruption_and_repair_all(tmp_path: Path) -> None:
    p = _image(tmp_path, snapshot=True)
    want = guest_view(p, tmp_path)
    c = _data_cluster(p)
    set_refcount(p, c, 0)
    rc, q = _agree(p)
    assert rc == 2 and q["corruptions"] >= 1
    res = check_qcow2(str(p), repair="leaks")  # leaks only: corruption stays
    assert res.corruptions >= 1
    res = check_qcow2(str(p), repair="all")
    assert res.corruptions == 0 and res.corruptions_fixed >= 1
    assert_clean(p)
    assert guest_view(p, tmp_path) == want


def test_copied_flag_cleared(tmp_path: Path) -> None:
    p = _image(tmp_path)
    with open(p, "rb") as f:
        f.seek(40)
        l1_off = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_off)
        e = struct.unpack(">Q", f.read(8))[0]
    assert e & 1 << 63
    with open(p, "r+b") as f:
        f.seek(l2_off)
        f.write(struct.pack(">Q", e & ~(1 << 63)))
    rc, q = _agree(p)
    assert rc == 2 and q["corruptions"] == 1
    check_qcow2(str(p), repair="all")
    assert_clean(p)


def test_bitmaps_counted_and_kept_on_write(tmp_path: Path) -> None:
    """Bitmap clusters are references while the bitmaps autoclear bit is set; vdisk maintains
    the bitmaps, so after its writes they are still referenced (no leaks)."""
    from vdisk.engine.qcow2 import open_qcow2

    p = _image(tmp_path)
    run("qemu-img", "bitmap", "--add", str(p), "b0")
    run("qemu-img", "bitmap", "--add", "-g", "65536", str(p), "b1")
    qemu_io(p, "write -P 5 2M 1M")
    rc, _ = _agree(p)
    assert rc == 0
    with open_qcow2(str(p), read_only=False) as img:
        img.write(0, b"x")
    rc, q = _agree(p)
    assert rc == 0 and q.get("leaks", 0) == 0 and q.get("corruptions", 0) == 0
    assert_clean(p)
