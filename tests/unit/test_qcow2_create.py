"""create_qcow2 images pass qemu-img check and qemu-img info describes them the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.commands import assert_clean, qemu_img
from vdisk.engine.qcow2 import create_qcow2, open_qcow2
from vdisk.errors import ImageError

CASES = [
    dict(size=1 << 30),
    dict(size=10 << 20, compat="0.10"),
    dict(size=3 << 20, cluster_size=512),
    dict(size=5 << 30, cluster_size=2 << 20),
    dict(size=64 << 20, refcount_bits=1),
    dict(size=64 << 20, refcount_bits=64),
    dict(size=64 << 20, extended_l2=True),
    dict(size=1 << 20, backing_name="base.raw", backing_format="raw"),
    dict(size=2 << 40, backing_name="b a/se.qcow2", backing_format="qcow2", compat="0.10"),
    dict(size=8 << 20, backing_name="nofmt.img"),
    dict(size=0),
    dict(size=1 << 40, cluster_size=4096, refcount_bits=2),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_create(tmp_path: Path, kw: dict) -> None:
    p = tmp_path / "new.qcow2"
    kw = dict(kw)
    size = kw.pop("size")
    create_qcow2(str(p), size, **kw)
    if kw.get("backing_name"):  # qemu-img opens the backing file
        b = tmp_path / kw["backing_name"]
        b.parent.mkdir(exist_ok=True)
        qemu_img("create", "-f", kw.get("backing_format") or "raw", str(b), "1M")
    assert_clean(p)
    info = json.loads(qemu_img("info", "-U", "--output=json", str(p)))
    assert info["virtual-size"] == size
    assert info["cluster-size"] == kw.get("cluster_size", 65536)
    assert info.get("backing-filename") == kw.get("backing_name")
    assert info.get("backing-filename-format") == kw.get("backing_format")
    data = info["format-specific"]["data"]
    assert data["compat"] == kw.get("compat", "1.1")
    assert data["refcount-bits"] == kw.get("refcount_bits", 16)
    if data["compat"] == "1.1":
        assert data["extended-l2"] == kw.get("extended_l2", False)
    with open_qcow2(str(p), read_only=True) as img:
        mine = img.info()
        for key in ("virtual-size", "cluster-size", "format", "dirty-flag", "backing-filename",
                    "backing-filename-format"):
            assert mine.get(key) == info.get(key), key
        assert mine["format-specific"] == info["format-specific"]
        if size:
            assert img.read(0, min(size, 1 << 20)) == bytes(min(size, 1 << 20))


def test_info_matches_qemu_for_qemu_images(tmp_path: Path) -> None:
    for i, opts in enumerate(["compat=1.1,compression_type=zstd,lazy_refcounts=on",
                              "compat=0.10", "extended_l2=on,refcount_bits=8"]):
        p = tmp_path / f"q{i}.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", opts, str(p), "100M")
        info = json.loads(qemu_img("info", "--output=json", str(p)))
        with open_qcow2(str(p), read_only=True) as img:
            assert img.info()["format-specific"] == info["format-specific"]


@pytest.mark.parametrize("kw,msg", [
    (dict(cluster_size=1000), "cluster size"),
    (dict(compat="0.10", refcount_bits=8), "compat 0.10"),
    (dict(extended_l2=True, cluster_size=4096), "extended L2"),
    (dict(refcount_bits=3), "refcount bits"),
    (dict(compat="2.0"), "compat"),
    (dict(backing_name="x" * 2000), "too long"),
])
def test_create_refuses(tmp_path: Path, kw: dict, msg: str) -> None:
    p = tmp_path / "bad.qcow2"
    with pytest.raises(ImageError) as ei:
        create_qcow2(str(p), 1 << 20, **kw)
    assert msg in str(ei.value) and str(p) in str(ei.value)


def test_create_refuses_bad_size(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="multiple of 512"):
        create_qcow2(str(tmp_path / "x.qcow2"), 1000)
    with pytest.raises(ImageError, match="too large"):
        create_qcow2(str(tmp_path / "y.qcow2"), 1 << 50, cluster_size=512)
