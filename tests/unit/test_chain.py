"""Backing chains made by qemu-img: resolution, opening, errors, block status, contents."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.chains import expected_runs, make_chain, status_runs
from tests.helpers.commands import guest_view, qemu_img, qemu_io, qemu_map
from tests.helpers.locks import locked_bytes
from vdisk.engine.chain import (
    chain_status,
    close_chain,
    full_backing_filename,
    iter_chain,
    open_chain,
    path_combine,
    probe_format,
    resolve_backing,
)
from vdisk.engine.image import Status
from vdisk.errors import ChainError, ImageError

MiB = 1 << 20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- names -----------------------------------------------------------------------------


def test_path_combine_like_qemu() -> None:
    assert path_combine("a/b/top.qcow2", "base.raw") == "a/b/base.raw"
    assert path_combine("top.qcow2", "base.raw") == "base.raw"
    assert path_combine("/x/../y/top", "../b") == "/x/../y/../b"
    assert path_combine("/x/top", "/abs/b") == "/abs/b"
    assert path_combine("/x/top", "file:b") == "file:b"


def test_resolve_relative_and_absolute(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "base.raw").write_bytes(b"")
    top = str(sub / "top.qcow2")
    assert resolve_backing(top, "../base.raw") == str(sub / ".." / "base.raw")
    assert os.path.samefile(resolve_backing(top, "../base.raw"), tmp_path / "base.raw")
    assert resolve_backing(top, str(tmp_path / "base.raw")) == str(tmp_path / "base.raw")
    # file: means a plain file; QEMU resolves a relative one against the current directory
    assert resolve_backing(top, f"file:{tmp_path}/base.raw") == str(tmp_path / "base.raw")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert resolve_backing(top, "file:base.raw") == str(tmp_path / "base.raw")
    finally:
        os.chdir(old)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ('json:{"file":{"driver":"file","filename":"b.raw"}}', "json:"),
        ("nbd://localhost:10809/x", "protocol 'nbd:'"),
        ("http://example.com/b.raw", "protocol 'http:'"),
        ("nbd:unix:/tmp/s", "protocol 'nbd:'"),
        ("missing.raw", "does not exist"),
        ("dir", "directory"),
        ("fifo", "FIFO"),
        ("/dev/null", "device"),
        ("", "empty"),
    ],
)
def test_resolve_refuses(tmp_path: Path, name: str, match: str) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ChainError, match=match) as e:
        resolve_backing(str(tmp_path / "top.qcow2"), name)
    assert "\n" not in str(e.value)


def test_probe(tmp_path: Path) -> None:
    qemu_img("create", "-f", "qcow2", tmp_path / "q", "1M")
    qemu_img("create", "-f", "raw", tmp_path / "r", "1M")
    (tmp_path / "empty").write_bytes(b"")
    assert probe_format(str(tmp_path / "q")) == "qcow2"
    assert probe_format(str(tmp_path / "r")) == "raw"
    assert probe_format(str(tmp_path / "empty")) == "raw"


def test_raw_top_alone_and_format_mismatch(tmp_path: Path) -> None:
    raw = tmp_path / "r.raw"
    qemu_img("create", "-f", "raw", raw, "1M")
    top = open_chain(str(raw), read_only=True)
    try:
        assert [i.format_name for i in iter_chain(top)] == ["raw"]
        assert full_backing_filename(top) is None
        assert chain_status(top, 0, MiB) == (4096, 0, Status.DATA)  # qemu-img's first block
        assert chain_status(top, 4096, MiB) == (MiB - 4096, 0, Status.ZERO)
    finally:
        close_chain(top)
    fds = open_fds()
    with pytest.raises(ImageError, match="not a qcow2 image"):
        open_chain(str(raw), fmt="qcow2", read_only=True)
    assert open_fds() == fds
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ChainError, match="FIFO"):
        open_chain(str(fifo), read_only=True)


# -- chains (need the qcow2 driver) ------------------------------------------------------


def test_chain_reads_like_qemu(tmp_path: Path) -> None:
    imgs = make_chain(tmp_path)
    top = open_chain(str(imgs["top"]), read_only=True)
    try:
        layers = list(iter_chain(top))
        assert [i.format_name for i in layers] == ["qcow2", "qcow2", "raw"]
        assert [i.virtual_size for i in layers] == [8 * MiB, 4 * MiB, 2 * MiB]
        assert all(i.read_only for i in layers)
        assert full_backing_filename(layers[0]) == str(imgs["mid"])
        assert os.path.samefile(full_backing_filename(layers[1]) or "", imgs["base"])
        assert top.read(0, top.virtual_size) == guest_view(imgs["top"], tmp_path)
        mid = layers[1]
        assert mid.read(0, mid.virtual_size) == guest_view(imgs["mid"], tmp_path)
    finally:
        close_chain(top)


def test_four_deep_mixed_names(tmp_path: Path) -> None:
    d1, d2 = tmp_path / "d1", tmp_path / "d1" / "d2"
    d2.mkdir(parents=True)
    base = tmp_path / "base.raw"
    qemu_img("create", "-f", "raw", base, "3M")
    qemu_io(base, "write -P 7 0 3M", fmt="raw")
    qemu_img("create", "-f", "qcow2", "-b", "../base.raw", "-F", "raw", d1 / "l1.qcow2", "5M")
    qemu_io(d1 / "l1.qcow2", "write -P 8 64k 64k", "write -z 2M 128k", "write -P 8 4M 4k")
    qemu_img("create", "-f", "qcow2", "-b", str(d1 / "l1.qcow2"), "-F", "qcow2",
             d2 / "l2.qcow2", "6M")
    qemu_io(d2 / "l2.qcow2", "write -P 9 2M 4k", "write -P 9 5M 64k")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "d2/l2.qcow2",
             "-F", "qcow2", d1 / "top.qcow2", cwd=d1)
    qemu_io(d1 / "top.qcow2", "write -P 10 1M 8k")
    top = open_chain(str(d1 / "top.qcow2"), read_only=False)
    try:
        assert len(list(iter_chain(top))) == 4
        assert not top.read_only and all(i.read_only for i in list(iter_chain(top))[1:])
        assert top.virtual_size == 6 * MiB
        assert top.read(0, top.virtual_size) == guest_view(d1 / "top.qcow2", tmp_path)
    finally:
        close_chain(top)


def test_chain_status_matches_qemu_map(tmp_path: Path) -> None:
    imgs = make_chain(tmp_path)
    entries = qemu_map(imgs["top"])
    top = open_chain(str(imgs["top"]), read_only=True)
    try:
        layers = list(iter_chain(top))
        sizes = [i.virtual_size for i in layers]
        got = status_runs(top)
        assert got == expected_runs(entries, sizes, None)
        # the intermediate zero cluster over base data is held by mid, as ZERO
        assert (MiB, 65536, 1, Status.ZERO) in got
        # past mid's end (4M..8M), minus top's data: held by mid as zeroes
        assert chain_status(top, 7 * MiB, MiB) == (MiB, 1, Status.ZERO)
        for base_depth in (1, 2):
            assert status_runs(top, base=layers[base_depth]) == expected_runs(entries, sizes,
                                                                              base_depth)
        with pytest.raises(ValueError):
            chain_status(top, top.virtual_size, 1)
    finally:
        close_chain(top)


def test_chain_status_one_call_per_layer(tmp_path: Path) -> None:
    imgs = make_chain(tmp_path)
    top = open_chain(str(imgs["top"]), read_only=True)
    calls: list[str] = []
    try:
        for img in iter_chain(top):
            orig = img.layer_status

            def counted(off, n, _orig=orig, _name=img.path):
                calls.append(_name)
                return _orig(off, n)

            img.layer_status = counted  # type: ignore[method-assign]
        n, depth, st = chain_status(top, 1152 * 1024, MiB)
        assert (depth, st) == (2, Status.DATA) and n == 65536
        assert len(calls) == 3 == len(set(calls))
    finally:
        close_chain(top)


# -- chain errors (need the qcow2 driver to read the headers) ------------------------------


def test_loop_detected(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", a, "1M")
    qemu_img("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b, cwd=tmp_path)
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a, cwd=tmp_path)
    os.symlink(a, tmp_path / "link.qcow2")
    fds = open_fds()
    with pytest.raises(ChainError, match="loop") as e:
        open_chain(str(b), read_only=True)
    assert "a.qcow2" in str(e.value)
    with pytest.raises(ChainError, match="loop"):
        open_chain(str(tmp_path / "link.qcow2"), read_only=True)
    assert open_fds() == fds
    # a self-reference
    qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", a, cwd=tmp_path)
    with pytest.raises(ChainError, match="loop"):
        open_chain(str(a), read_only=True)


def test_missing_backing_closes_everything(tmp_path: Path) -> None:
    imgs = make_chain(tmp_path)
    imgs["base"].unlink()
    fds = open_fds()
    with pytest.raises(ChainError, match="does not exist") as e:
        open_chain(str(imgs["top"]), read_only=False)
    assert "base.raw" in str(e.value) and "mid.qcow2" in str(e.value)
    assert open_fds() == fds
    assert locked_bytes(imgs["top"]) == [] and locked_bytes(imgs["mid"]) == []


def test_depth_limit(tmp_path: Path) -> None:
    prev = tmp_path / "l0.qcow2"
    qemu_img("create", "-f", "qcow2", prev, "1M")
    for i in range(1, 5):
        cur = tmp_path / f"l{i}.qcow2"
        qemu_img("create", "-f", "qcow2", "-b", prev.name, "-F", "qcow2", cur, cwd=tmp_path)
        prev = cur
    top = open_chain(str(prev), read_only=True, max_depth=4)
    assert len(list(iter_chain(top))) == 5
    close_chain(top)
    with pytest.raises(ChainError, match="deeper than 3"):
        open_chain(str(prev), read_only=True, max_depth=3)


@pytest.mark.parametrize(
    ("backing", "match"),
    [
        ('json:{"file":{"driver":"file","filename":"b.raw"}}', "json:"),
        ("ftp://u:pw@h/x", "protocol 'ftp:'"),
        ("fifo", "FIFO"),
        ("/dev/zero", "device"),
        ("dir", "directory"),
    ],
)
def test_bad_backing_names_in_headers(tmp_path: Path, backing: str, match: str) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", top, "1M", cwd=tmp_path)
    fds = open_fds()
    with pytest.raises(ChainError, match=match) as e:
        open_chain(str(top), read_only=True)
    assert open_fds() == fds
    assert "u:pw@" not in str(e.value)


@pytest.mark.parametrize(
    ("backing", "path", "match"),
    [
        ('json:{"file.driver":"http","file.url":"http://u:pw@127.0.0.1:1/x"}',
         "http://127.0.0.1:1/x", "cannot connect: Connection refused"),
        ("nbd://127.0.0.1:1/x", "nbd://127.0.0.1:1/x", "connection refused"),
        ("http://127.0.0.1:1:2/x", "http://127.0.0.1:1:2/x", "not a valid URL"),
    ],
)
def test_remote_backing_names_that_cannot_open(tmp_path: Path, backing: str, path: str,
                                               match: str) -> None:
    """Remote names fail with the (redacted) name and the reason, nothing left open."""
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", top, "1M", cwd=tmp_path)
    fds = open_fds()
    with pytest.raises(ImageError, match=match) as e:
        open_chain(str(top), read_only=True)
    assert e.value.path == path
    assert open_fds() == fds


def test_backing_format_mismatch(tmp_path: Path) -> None:
    qemu_img("create", "-f", "raw", tmp_path / "b.raw", "1M")
    qemu_img("create", "-f", "qcow2", "-u", "-b", "b.raw", "-F", "qcow2", tmp_path / "t.qcow2",
             "1M", cwd=tmp_path)
    with pytest.raises(ImageError, match="not a qcow2 image"):
        open_chain(str(tmp_path / "t.qcow2"), read_only=True)
