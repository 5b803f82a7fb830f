"""`vdisk create/info/map/check` against qemu-img as the oracle (run as subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.helpers.chains import expected_runs, make_chain, set_refcount, status_runs
from tests.helpers.commands import guest_view, qemu_img, qemu_info, qemu_io, run, vdisk

INFO_KEYS = (
    "filename", "format", "virtual-size", "actual-size", "cluster-size", "backing-filename",
    "full-backing-filename", "backing-filename-format", "dirty-flag", "format-specific",
)
MiB = 1 << 20



def pick(info: dict) -> dict:
    return {k: info[k] for k in INFO_KEYS if k in info}


def assert_one_line_error(res, *needles: str) -> None:
    assert res.returncode != 0
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


# -- create ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("opts", "qopts"),
    [
        ([], []),
        (["-o", "cluster_size=4k,refcount_bits=8"], ["-o", "cluster_size=4096,refcount_bits=8"]),
        (["-o", "compat=0.10"], ["-o", "compat=0.10"]),
        (["-o", "extended_l2=on", "-o", "cluster_size=128K"],
         ["-o", "extended_l2=on,cluster_size=131072"]),
    ],
)
def test_create_qcow2_like_qemu(tmp_path: Path, opts: list[str], qopts: list[str]) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    vdisk("create", "-f", "qcow2", *opts, ours, "1.5G")
    qemu_img("create", "-f", "qcow2", *qopts, theirs, "1.5G")
    qemu_img("check", ours)
    a, b = qemu_info(ours), qemu_info(theirs)
    for key in ("virtual-size", "cluster-size", "format", "format-specific", "dirty-flag"):
        assert a[key] == b[key], key
    assert pick(json.loads(vdisk("info", "--output=json", ours).stdout)) == pick(a)
    qemu_io(ours, "write -P 5 1G 64k", "read -P 5 1G 64k")
    qemu_img("check", ours)


@pytest.mark.slow
def test_create_overlay_defaults_to_backing_size(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    qemu_img("create", "-f", "raw", tmp_path / "base.raw", "3M")
    qemu_img("create", "-f", "qcow2", tmp_path / "q.qcow2", "5M")
    # relative backing name, stored as given; -F required (as qemu-img 7.2)
    vdisk("create", "-f", "qcow2", "-b", "../base.raw", "-F", "raw", sub / "o1.qcow2")
    vdisk("create", "-f", "qcow2", "-b", str(tmp_path / "q.qcow2"), "-F", "qcow2",
          sub / "o2.qcow2", "7M")
    vdisk("create", "-f", "qcow2", "-b", "o1.qcow2", "-F", "qcow2", "sub/o3.qcow2",
          cwd=tmp_path)
    for name, size, bname, bfmt in (
        ("o1", 3 * MiB, "../base.raw", "raw"),
        ("o2", 7 * MiB, str(tmp_path / "q.qcow2"), "qcow2"),
        ("o3", 3 * MiB, "o1.qcow2", "qcow2"),
    ):
        p = sub / f"{name}.qcow2"
        qemu_img("check", p)
        info = qemu_info(p)
        assert info["virtual-size"] == size
        assert info["backing-filename"] == bname
        assert info["backing-filename-format"] == bfmt
        assert pick(json.loads(vdisk("info", "--output=json", p).stdout)) == pick(info)
    chain = qemu_info(sub / "o3.qcow2", "--backing-chain")
    assert [i["format"] for i in chain] == ["qcow2", "qcow2", "raw"]


@pytest.mark.slow
def test_create_raw(tmp_path: Path) -> None:
    p = tmp_path / "r.raw"
    vdisk("create", p, "10M")
    assert qemu_info(p)["virtual-size"] == 10 * MiB
    assert qemu_info(p)["format"] == "raw"
    vdisk("create", "-f", "raw", p, "1000")
    assert os.path.getsize(p) == 1024


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["-f", "qcow2", "-o", "foo=1", "F", "1M"], ["'foo'"]),
        (["-f", "qcow2", "-o", "cluster_size=3000", "F", "1M"], ["cluster_size=3000"]),
        (["-f", "qcow2", "-o", "compat=2", "F", "1M"], ["compat=2"]),
        (["-f", "qcow2", "-o", "refcount_bits=7", "F", "1M"], ["refcount_bits=7"]),
        (["-f", "qcow2", "-o", "extended_l2=maybe", "F", "1M"], ["extended_l2=maybe"]),
        (["-f", "qcow2", "-o", "compat=0.10,extended_l2=on", "F", "1M"], ["extended_l2"]),
        (["-f", "qcow2", "F", "12X"], ["'12X'"]),
        (["-f", "qcow2", "F", "-5"], ["'-5'"]),
        (["-f", "qcow2", "F"], ["size is required"]),
        (["-f", "vmdk", "F", "1M"], ["'vmdk'"]),
        (["-f", "raw", "-b", "x.raw", "F", "1M"], ["backing"]),
        (["-f", "raw", "-o", "cluster_size=4k", "F", "1M"], ["'cluster_size'"]),
        (["-f", "qcow2", "-F", "qcow2", "-b", "missing.qcow2", "F"], ["missing.qcow2", "does not exist"]),
        (["-f", "qcow2", "-F", "qcow2", "-b", "json:{}", "F", "1M"], ["json:"]),
        (["-f", "qcow2", "-F", "qcow2", "-b", "nbd://h/x", "F", "1M"], ["nbd:"]),
        (["-f", "qcow2", "-F", "qcow2", "-b", "dir", "F", "1M"], ["directory"]),
        (["-f", "qcow2", "-F", "qcow2", "-b", "F", "F", "1M"], ["own backing"]),
        (["-f", "qcow2", "-F", "raw", "F", "1M"], ["-F needs"]),
        (["-f", "qcow2", "-b", "b.raw", "-F", "qcow2", "F"], ["not a qcow2"]),
    ],
)
def test_create_bad_input(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    (tmp_path / "dir").mkdir()
    qemu_img("create", "-f", "raw", tmp_path / "b.raw", "1M")
    if "own backing" in needles:
        qemu_img("create", "-f", "qcow2", tmp_path / "F", "1M")
    res = vdisk("create", *args, cwd=tmp_path, check=False)
    assert_one_line_error(res, *needles)


# -- info --------------------------------------------------------------------------------


@pytest.mark.slow
def test_info_chain_equals_qemu(tmp_path: Path) -> None:
    imgs = make_chain(tmp_path)
    for name, cwd in ((str(imgs["top"]), None), ("top.qcow2", tmp_path), ("mid.qcow2", tmp_path)):
        for extra in ([], ["--backing-chain"]):
            theirs = qemu_info(name, *extra, cwd=cwd)
            ours = json.loads(vdisk("info", "--output=json", *extra, name, cwd=cwd).stdout)
            if extra:
                assert [pick(i) for i in ours] == [pick(i) for i in theirs]
            else:
                assert pick(ours) == pick(theirs)
            human = vdisk("info", *extra, name, cwd=cwd).stdout
            assert human == qemu_img("info", *extra, name, cwd=cwd)


@pytest.mark.slow
def test_info_relative_dirs_and_raw(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    d.mkdir(parents=True)
    qemu_img("create", "-f", "raw", tmp_path / "base.raw", "1M")
    qemu_img("create", "-f", "qcow2", "-b", "../../base.raw", "-F", "raw", d / "t.qcow2")
    for name in ("a/b/t.qcow2", str(d / "t.qcow2"), "base.raw"):
        theirs = qemu_info(name, "--backing-chain", cwd=tmp_path)
        ours = json.loads(vdisk("info", "--output=json", "--backing-chain", name,
                                cwd=tmp_path).stdout)
        assert [pick(i) for i in ours] == [pick(i) for i in theirs]
        assert vdisk("info", "--backing-chain", name, cwd=tmp_path).stdout == qemu_img(
            "info", "--backing-chain", name, cwd=tmp_path)


@pytest.mark.slow
def test_info_dirty_and_odd_backing_names(tmp_path: Path) -> None:
    dirty = tmp_path / "dirty.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", dirty, "1M")
    proc = subprocess.Popen(["qemu-io", str(dirty)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("write 0 64k\n")
        proc.stdin.flush()
        assert "wrote" in proc.stdout.readline()
    finally:
        proc.kill()  # no clean close: the dirty bit stays set
        proc.communicate()
    names = [dirty]
    for i, backing in enumerate(('json:{"file":{"filename":"x"}}', "file:x.raw", "nbd:h:1")):
        p = tmp_path / f"odd{i}.qcow2"
        qemu_img("create", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", p, "1M")
        names.append(p)
    for p in names:
        theirs = qemu_info(p)
        assert pick(json.loads(vdisk("info", "--output=json", p).stdout)) == pick(theirs)
        assert vdisk("info", p).stdout == qemu_img("info", p)
    assert qemu_info(dirty)["dirty-flag"] is True


@pytest.mark.slow
def test_info_bad_input(tmp_path: Path) -> None:
    res = vdisk("info", tmp_path / "missing", check=False)
    assert_one_line_error(res, "missing")
    res = vdisk("info", tmp_path, check=False)
    assert_one_line_error(res, "directory")
    os.mkfifo(tmp_path / "fifo")
    res = vdisk("info", tmp_path / "fifo", check=False)
    assert_one_line_error(res, "FIFO")
    res = vdisk("info", "-f", "vmdk", tmp_path / "fifo", check=False)
    assert_one_line_error(res, "vmdk")
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(60))
    res = vdisk("info", bad, check=False)
    assert_one_line_error(res, "bad.qcow2")
    qemu_img("create", "-f", "qcow2", "-u", "-b", "gone.raw", "-F", "raw",
             tmp_path / "o.qcow2", "1M")
    assert vdisk("info", tmp_path / "o.qcow2").returncode == 0  # like qemu-img info
    res = vdisk("info", "--backing-chain", tmp_path / "o.qcow2", check=False)
    assert_one_line_error(res, "gone.raw", "does not exist")


# -- map ---------------------------------------------------------------------------------


def _map_images(tmp: Path) -> list[Path]:
    imgs = make_chain(tmp)
    out = [imgs["top"], imgs["mid"], imgs["base"]]
    frag = tmp / "frag.qcow2"  # guest-contiguous clusters at non-contiguous host offsets
    qemu_img("create", "-f", "qcow2", frag, "4M")
    qemu_io(frag, "write -P 1 128k 64k", "write -P 2 0 64k", "write -P 3 64k 64k",
            "write -P 4 192k 64k", "write -z 128k 64k", "write -z -u 1M 64k",
            "write -P 5 2M 1M", "write -z 2112k 64k")
    out.append(frag)
    ext = tmp / "ext.qcow2"  # extended L2 subclusters over a backing file
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", "-b",
             str(imgs["mid"]), "-F", "qcow2", ext, "4M")
    qemu_io(ext, "write -P 6 2k 2k", "write -P 6 8k 4k", "write -z 16k 2k", "write -P 7 3M 6k")
    out.append(ext)
    comp = tmp / "comp.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", imgs["mid"], comp)
    out.append(comp)
    small = tmp / "small.qcow2"  # 4k clusters, v2
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k,compat=0.10", "-b",
             str(imgs["base"]), "-F", "raw", small, "3M")
    qemu_io(small, "write -P 8 1020k 12k", "write -P 8 2040k 16k")
    out.append(small)
    return out


@pytest.mark.slow
def test_map_json_equals_qemu(tmp_path: Path) -> None:
    for p in _map_images(tmp_path):
        ours = vdisk("map", "--output=json", p).stdout
        theirs = qemu_img("map", "--output=json", p)
        assert json.loads(ours) == json.loads(theirs), p.name
        assert ours == theirs, p.name
    # named relative to the current directory, and a window of the image
    assert vdisk("map", "--output=json", "top.qcow2", cwd=tmp_path).stdout == qemu_img(
        "map", "--output=json", "top.qcow2", cwd=tmp_path)
    qemu_img("create", "-f", "qcow2", tmp_path / "empty.qcow2", "0")
    for args in (["--start-offset=1M", "--max-length=3000k", "top.qcow2"],
                 ["--start-offset=100M", "top.qcow2"], ["--max-length=0", "top.qcow2"],
                 ["empty.qcow2"]):
        for out in ("--output=json", "--output=human"):
            assert vdisk("map", out, *args, cwd=tmp_path).stdout == qemu_img(
                "map", out, *args, cwd=tmp_path), args


@pytest.mark.slow
def test_map_human_equals_qemu(tmp_path: Path) -> None:
    for p in _map_images(tmp_path):
        theirs = run("qemu-img", "map", p.name, cwd=tmp_path, check=False)
        ours = vdisk("map", p.name, cwd=tmp_path, check=False)
        assert ours.returncode == (0 if theirs.returncode == 0 else 1), p.name
        if theirs.returncode == 0:
            assert ours.stdout == theirs.stdout, p.name
        else:  # compressed clusters cannot be shown in human form
            assert "compressed" in ours.stderr and "Traceback" not in ours.stderr


# -- check -------------------------------------------------------------------------------


@pytest.mark.slow
def test_check_exit_codes_agree(tmp_path: Path) -> None:
    clean = tmp_path / "clean.qcow2"
    qemu_img("create", "-f", "qcow2", clean, "16M")
    qemu_io(clean, "write -P 1 0 256k")
    cs = 65536
    leak = tmp_path / "leak.qcow2"
    shutil.copy(clean, leak)
    end = -(-os.path.getsize(leak) // cs)
    with open(leak, "r+b") as f:
        f.truncate((end + 2) * cs)
    set_refcount(leak, end, 1)
    set_refcount(leak, end + 1, 1)
    corrupt = tmp_path / "corrupt.qcow2"
    shutil.copy(clean, corrupt)
    l1 = struct.unpack_from(">Q", clean.read_bytes(), 40)[0]
    set_refcount(corrupt, l1 // cs, 0)  # the L1 table's cluster is in use
    for img, code in ((clean, 0), (leak, 3), (corrupt, 2)):
        theirs = run("qemu-img", "check", img, check=False)
        ours = vdisk("check", img, check=False)
        assert theirs.returncode == code == ours.returncode, (img.name, ours.stderr)
        assert "Traceback" not in ours.stderr
        assert ours.stdout == theirs.stdout, img.name
        j = json.loads(vdisk("check", "--output=json", img, check=False).stdout)
        q = json.loads(run("qemu-img", "check", "--output=json", img, check=False).stdout)
        assert j == q, img.name
    # repair leaks: both end clean
    leak2 = tmp_path / "leak2.qcow2"
    shutil.copy(leak, leak2)
    ours = vdisk("check", "-r", "leaks", leak, check=False)
    theirs = run("qemu-img", "check", "-r", "leaks", leak2, check=False)
    assert ours.returncode == theirs.returncode == 0
    assert run("qemu-img", "check", leak, check=False).returncode == 0
    assert "2 leaked clusters" in ours.stdout
    assert ours.stdout == theirs.stdout


@pytest.mark.slow
@pytest.mark.parametrize("refcount_bits", [1, 4, 64])
def test_check_output_equals_qemu(tmp_path: Path, refcount_bits: int) -> None:
    p = tmp_path / "r.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"refcount_bits={refcount_bits},cluster_size=4k",
             p, "8M")
    qemu_io(p, "write -P 1 0 100k", "write -P 2 1M 8k", "write -P 3 50k 4k",
            "write -z 2M 8k", "discard 4k 4k")
    assert vdisk("check", p).stdout == qemu_img("check", p)
    ours = json.loads(vdisk("check", "--output=json", p).stdout)
    assert ours == json.loads(qemu_img("check", "--output=json", p))
    assert ours["allocated-clusters"] > 20 and ours["fragmented-clusters"] > 0


@pytest.mark.slow
def test_check_raw_and_bad_input(tmp_path: Path) -> None:
    raw = tmp_path / "r.raw"
    qemu_img("create", "-f", "raw", raw, "1M")
    res = vdisk("check", raw, check=False)  # like qemu-img 7.2: 63, "does not support checks"
    theirs = run("qemu-img", "check", raw, check=False)
    assert res.returncode == theirs.returncode == 63
    assert res.stdout == theirs.stdout == ""
    assert_one_line_error(res, "r.raw", "does not support checks")
    assert_one_line_error(vdisk("check", tmp_path / "nope", check=False), "nope")
    assert_one_line_error(vdisk("check", "-f", "vmdk", raw, check=False), "vmdk")
    res = vdisk("check", "-r", "some", raw, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_chains_map_and_read_like_qemu(tmp_path: Path, seed: int) -> None:
    """Random writes, zeroes and discards in a 3-layer chain: map and contents as QEMU."""
    import random

    from vdisk.engine.chain import close_chain, iter_chain, open_chain

    rng = random.Random(seed)
    cs_opts = ["cluster_size=64k", "cluster_size=4k", "extended_l2=on,cluster_size=32k"]
    base = tmp_path / "base.raw"
    qemu_img("create", "-f", "raw", base, f"{rng.choice([2, 3])}M")
    prev, prev_fmt = base, "raw"
    for i in range(2):
        img = tmp_path / f"l{i}.qcow2"
        size = rng.choice([2, 3, 4])
        qemu_img("create", "-f", "qcow2", "-o", rng.choice(cs_opts), "-b", prev.name,
                 "-F", prev_fmt, img, f"{size}M", cwd=tmp_path)
        prev, prev_fmt = img, "qcow2"
    for img, fmt in ((base, "raw"), (tmp_path / "l0.qcow2", "qcow2"),
                     (tmp_path / "l1.qcow2", "qcow2")):
        size = qemu_info(img)["virtual-size"]
        cmds = []
        for _ in range(8):
            length = rng.choice([512, 4096, 65536, 100_000, 300_000])
            off = rng.randrange(0, size - length) // 512 * 512
            kind = rng.choice(["write -P {p}", "write -P {p}", "write -z", "write -z -u",
                               "discard"])
            if fmt == "raw" and kind == "discard":
                kind = "write -z -u"
            cmds.append(f"{kind.format(p=rng.randrange(1, 255))} {off} {length}")
        qemu_io(img, *cmds, fmt=fmt)
    top_path = tmp_path / "l1.qcow2"
    assert vdisk("map", "--output=json", top_path).stdout == qemu_img(
        "map", "--output=json", top_path)
    top = open_chain(str(top_path), read_only=True)
    try:
        assert top.read(0, top.virtual_size) == guest_view(top_path, tmp_path)
        # after the reads: ext4 reports cached pages of unwritten extents as data
        entries = json.loads(qemu_img("map", "--output=json", top_path))
        layers = list(iter_chain(top))
        sizes = [i.virtual_size for i in layers]
        assert status_runs(top) == expected_runs(entries, sizes, None)
        assert status_runs(top, layers[1]) == expected_runs(entries, sizes, 1)
    finally:
        close_chain(top)
