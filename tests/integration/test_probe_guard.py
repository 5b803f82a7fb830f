"""Probing: a damaged or foreign image is never served as raw, and a probed raw image has
its first sector guarded as QEMU guards it.

QEMU is the oracle: `qemu-img info` says which format it probes for a file, and `qemu-io`
on a file whose format it probed says which first-sector writes it refuses (EPERM).
"""

from __future__ import annotations

import errno
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest

from tests.helpers.commands import CommandFailed, qemu_img, qemu_info, qemu_io, vdisk_cmd
from tests.helpers.daemon import run_serve, serving
from vdisk.engine.chain import close_chain, open_chain, probe_format
from vdisk.engine.probe import damaged_qcow2, detect_format
from vdisk.errors import ImageError
from vdisk.service.mounts import is_mounted

MiB = 1 << 20
SECTOR = 512


def vdisk(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(vdisk_cmd(*map(str, args)), capture_output=True, text=True,
                          timeout=60, cwd=cwd, stdin=subprocess.DEVNULL)


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a failed vdisk command (no traceback, exit 1)."""
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdisk: "), res.stderr
    return lines[0]


def make_image(tmp: Path, fmt: str) -> Path:
    """An empty 1 MiB image of fmt, made by qemu-img."""
    p = tmp / f"img-{fmt}"
    if fmt == "luks":
        # qemu-img times its PBKDF on the thread's CPU clock and gives up ("Unable to get
        # accurate CPU usage") when a loaded machine gives it no measurable CPU: retry.
        for attempt in range(5):
            try:
                qemu_img("create", "-q", "-f", "luks", "--object", "secret,id=s0,data=pw",
                         "-o", "key-secret=s0", p, "1M")
                break
            except CommandFailed as e:
                if "accurate CPU usage" not in str(e) or attempt == 4:
                    raise
    elif fmt == "vmdk-flat":  # a text descriptor naming a separate extent file
        p = tmp / "flat.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", p, "1M")
    else:
        qemu_img("create", "-q", "-f", fmt, p, "1M")
    return p


QEMU_FORMATS = ["raw", "qcow2", "qcow", "vmdk", "vmdk-flat", "vdi", "vpc", "vhdx", "qed",
                "parallels", "luks"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", QEMU_FORMATS)
def test_probe_finds_what_qemu_finds(tmp_path: Path, fmt: str) -> None:
    p = make_image(tmp_path, fmt)
    qemu_says = qemu_info(p)["format"]
    assert qemu_says == fmt.split("-")[0]
    assert probe_format(str(p)) == qemu_says


def _sector(data: bytes) -> bytes:
    return data.ljust(SECTOR, b"\0")[:SECTOR]


def _bochs(version: int, magic: bytes = b"Bochs Virtual HD Image") -> bytes:
    head = bytearray(SECTOR)
    head[0:len(magic)] = magic
    head[32:39] = b"Redolog"
    head[48:55] = b"Growing"
    struct.pack_into("<I", head, 64, version)
    return bytes(head)


def _vdi(signature: int) -> bytes:
    head = bytearray(_sector(b"<<< QEMU VM Virtual Disk Image >>>\n"))
    struct.pack_into("<I", head, 0x40, signature)
    return bytes(head)


CLOOP = (b"#!/bin/sh\n#V2.0 Format\n"
         b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")

# first sectors QEMU probes as another format (its raw driver refuses to write them) ...
REFUSED = {
    "vmdk-binary": _sector(b"KDMV\1\0\0\0"),
    "vmdk-cowd": _sector(b"COWD\1\0\0\0"),
    "vmdk-text": _sector(b"# Disk DescriptorFile\n   \r\n#x\nversion=1\nCID=fffffffe\n"),
    "vmdk-text-v3": _sector(b"version=3\r\n"),
    "vpc": _sector(b"conectix\0\0\0\2"),
    "vhdx": _sector(b"vhdxfile"),
    "qed": _sector(b"QED\0\0\0\1\0"),
    "cloop": _sector(CLOOP),
    "bochs-v1": _bochs(0x00010000),
    "bochs-v2": _bochs(0x00020000),
    "parallels": _sector(b"WithoutFreeSpace\2\0\0\0"),
    "parallels-ext": _sector(b"WithouFreSpacExt\2\0\0\0"),
    "luks-v1": _sector(b"LUKS\xba\xbe\0\1aes"),
    "vdi": _vdi(0xBEDA107F),
    "qcow1": _sector(b"QFI\xfb\0\0\0\1"),
    "qcow2": _sector(b"QFI\xfb\0\0\0\3"),
}
# ... and near misses that QEMU still probes as raw (writing them is allowed)
ALLOWED = {
    "zeroes": bytes(SECTOR),
    "mbr": _sector(b"\xeb\x63\x90" + bytes(507) + b"\x55\xaa"),
    "random": random.Random(13).randbytes(SECTOR),
    "vmdk-text-v4": _sector(b"# Disk DescriptorFile\nversion=4\n"),
    "vmdk-text-after-junk": _sector(b"  x\nversion=1\n"),
    "vpc-typo": _sector(b"conectiX"),
    "cloop-typo": _sector(CLOOP.replace(b"iso9660", b"iso9661")),
    "bochs-v3": _bochs(0x00030000),
    "bochs-no-nul": _bochs(0x00020000, b"Bochs Virtual HD ImageX"),
    "parallels-v1": _sector(b"WithoutFreeSpace\1\0\0\0"),
    "luks-v2": _sector(b"LUKS\xba\xbe\0\2"),
    "vdi-bad-signature": _vdi(0xBEDA107E),
}


def _qemu_refuses(raw: Path, data: bytes, offset: int = 0) -> bool:
    """Whether qemu-io, probing raw's format, refuses to write data at offset."""
    src = raw.with_suffix(".src")
    src.write_bytes(data)
    res = subprocess.run(["qemu-io", "-c", f"write -s {src} {offset} {len(data)}", str(raw)],
                         capture_output=True, text=True, timeout=60)
    src.unlink()
    if "Operation not permitted" in res.stdout + res.stderr:
        return True
    assert res.returncode == 0, res.stdout + res.stderr
    return False


def _vdisk_refuses(raw: Path, data: bytes, offset: int = 0) -> bool:
    """Whether vdisk, probing raw's format, refuses to write data at offset (EPERM)."""
    top = open_chain(str(raw))
    try:
        assert top.probed
        top.write(offset, data)
        return False
    except OSError as e:
        assert e.errno == errno.EPERM, e
        return True
    finally:
        close_chain(top)


@pytest.mark.parametrize("name", [*REFUSED, *ALLOWED])
def test_first_sector_guard_matches_qemu(tmp_path: Path, name: str) -> None:
    data = REFUSED.get(name) or ALLOWED[name]
    for who, refuses in (("qemu", _qemu_refuses), ("vdisk", _vdisk_refuses)):
        raw = tmp_path / f"{who}.raw"
        qemu_img("create", "-q", "-f", "raw", raw, "1M")
        assert refuses(raw, data) == (name in REFUSED), who
        assert raw.read_bytes()[:SECTOR] == (bytes(SECTOR) if name in REFUSED else data), who
        assert detect_format(raw.read_bytes()[:SECTOR]) is None  # still probes as raw


def test_qcow2_magic_with_any_version_is_refused(tmp_path: Path) -> None:
    """Where vdisk is stricter: QEMU probes the qcow2 magic with version 0 as raw (and lets
    it be written); vdisk reads any file starting with the magic as qcow2, so refuses it."""
    data = _sector(b"QFI\xfb\0\0\0\0")
    raw = tmp_path / "g.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    assert not _qemu_refuses(raw, data)
    raw.write_bytes(bytes(MiB))
    assert _vdisk_refuses(raw, data)


def test_partial_and_zero_writes_that_complete_a_signature(tmp_path: Path) -> None:
    raw = tmp_path / "g.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    # a LUKS magic with version 0x0101 is raw; zeroing byte 6 makes it LUKS version 1
    almost = _sector(b"LUKS\xba\xbe\1\1")
    top = open_chain(str(raw))
    try:
        top.write(0, almost)
        with pytest.raises(OSError) as e:
            top.write_zeroes(6, 1)
        assert e.value.errno == errno.EPERM
        top.write(4, b"\0\0")  # breaks the magic: allowed
        top.write(0, b"QF")
        with pytest.raises(OSError) as e:
            top.write(2, b"I\xfb")  # would complete the qcow2 magic
        assert e.value.errno == errno.EPERM
        top.write(SECTOR, REFUSED["qcow2"])  # past the first sector: anything goes
    finally:
        close_chain(top)
    # QEMU refuses the same zero write (its 512-byte alignment makes it a checked write)
    qraw = tmp_path / "q.raw"
    qemu_img("create", "-q", "-f", "raw", qraw, "1M")
    src = tmp_path / "almost.bin"
    src.write_bytes(almost)
    res = subprocess.run(["qemu-io", "-c", f"write -s {src} 0 512", "-c", "write -z 6 1",
                          str(qraw)], capture_output=True, text=True, timeout=60)
    assert "Operation not permitted" in res.stdout + res.stderr
    head = raw.read_bytes()[:SECTOR]
    assert head[:8] == b"QFKS\0\0\1\1" and detect_format(head) is None


def test_given_format_lifts_the_guard(tmp_path: Path) -> None:
    raw = tmp_path / "g.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    top = open_chain(str(raw), fmt="raw")
    try:
        assert not top.probed
        top.write(0, REFUSED["vmdk-text"])
    finally:
        close_chain(top)
    assert probe_format(str(raw)) == "vmdk"


def test_served_probed_raw_guards_sector0_over_fuse(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    qemu_io(raw, "write -P 0x5a 0 64k", fmt="raw")
    with serving(tmp_path, f"id=d0,file={raw}") as srv:
        fd = os.open(srv.path("d0"), os.O_RDWR)
        try:
            for name in ("qcow2", "vmdk-text", "luks-v1"):
                with pytest.raises(OSError) as e:
                    os.pwrite(fd, REFUSED[name], 0)
                assert e.value.errno == errno.EPERM, name
            with pytest.raises(OSError) as e:  # unaligned, inside the first sector
                os.pwrite(fd, b"QFI\xfb", 0)
            assert e.value.errno == errno.EPERM
            assert os.pwrite(fd, b"\xa5" * 1000, 100) == 1000  # harmless: allowed
            assert os.pwrite(fd, REFUSED["qcow2"], 4096) == SECTOR
            os.fsync(fd)
        finally:
            os.close(fd)
        assert srv.stop() == 0
        log = srv.stderr
    assert "format probed" in log and "probed as raw" in log
    assert log.count("refused a write that would make the image look like") == 1, log
    data = raw.read_bytes()
    assert data[:100] == b"\x5a" * 100 and data[100:1100] == b"\xa5" * 1000
    assert data[4096:4096 + SECTOR] == REFUSED["qcow2"]
    assert qemu_info(raw)["format"] == "raw"


def test_served_zero_range_that_completes_a_signature(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    raw.write_bytes(_sector(b"LUKS\xba\xbe\1\1") + bytes(MiB - SECTOR))
    with serving(tmp_path, f"id=d0,file={raw}") as srv:
        res = subprocess.run(["fallocate", "--zero-range", "--offset", "6", "--length", "1",
                              str(srv.path("d0"))], capture_output=True, text=True)
        assert res.returncode != 0 and "Operation not permitted" in res.stderr, res
        res = subprocess.run(["fallocate", "--zero-range", "--offset", "0", "--length",
                              "512", str(srv.path("d0"))], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert srv.stop() == 0
    assert raw.read_bytes()[:SECTOR] == bytes(SECTOR)


# --- damaged and foreign images are not probed as raw -----------------------------------


def _damaged_qcow2(tmp: Path, name: str = "top.qcow2") -> Path:
    p = tmp / name
    qemu_img("create", "-q", "-f", "qcow2", p, "64M")
    qemu_io(p, "write -P 0x11 0 1M")
    with open(p, "r+b") as f:
        f.write(b"XXXX")  # the magic is gone, the rest of the header is there
    return p


def test_damaged_qcow2_header_is_recognised(tmp_path: Path) -> None:
    p = _damaged_qcow2(tmp_path)
    head = p.read_bytes()[:SECTOR]
    assert damaged_qcow2(head) == "version 3, cluster size 65536, virtual size 67108864"
    v2 = tmp_path / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", v2, "1M")
    assert damaged_qcow2(b"QFI\xfa" + v2.read_bytes()[4:SECTOR]) is not None
    for other in ("raw", "vmdk", "vdi"):
        data = make_image(tmp_path, other).read_bytes()[:SECTOR].ljust(SECTOR, b"\0")
        assert damaged_qcow2(data) is None
    assert damaged_qcow2(random.Random(1).randbytes(SECTOR)) is None
    assert damaged_qcow2(bytes(SECTOR)) is None


@pytest.mark.slow
@pytest.mark.parametrize("case", ["damaged.qcow2", "damaged.img", "plain.qcow2", "vmdk.img"])
def test_refused_everywhere_unless_raw_is_given(tmp_path: Path, case: str) -> None:
    if case.startswith("damaged"):
        p = _damaged_qcow2(tmp_path, case)
        why = "not a qcow2 image (bad magic), though the rest of a qcow2 header is there"
    elif case == "plain.qcow2":  # a raw file with a qcow2 name
        p = tmp_path / case
        qemu_img("create", "-q", "-f", "raw", p, "1M")
        why = "not a qcow2 image (bad magic), though named like one"
    else:
        p = tmp_path / case
        qemu_img("create", "-q", "-f", "vmdk", p, "1M")
        why = "probed as a vmdk image, a format vdisk does not serve"
    digest = p.read_bytes()
    mnt = tmp_path / "mnt"
    res = run_serve(tmp_path, ["--mount", str(mnt), "--qmp", str(tmp_path / "q.sock"),
                               "--drive", f"id=d0,file={p}"])
    line = one_line(res)
    assert line.startswith(f"vdisk: {p}: {why}")
    assert line.endswith("give format=raw to serve it as raw"), line
    assert not mnt.exists() and not is_mounted(mnt)
    for cmd in (["info"], ["info", "--backing-chain"], ["map"], ["check"]):
        line = one_line(vdisk(*cmd, p))
        assert why in line and line.endswith("give -f raw to open it as raw"), (cmd, line)
    line = one_line(vdisk("stream", p))
    assert why in line and line.endswith("only qcow2 images can be streamed into"), line
    # like qemu-img 7.2, create refuses a backing file without its format before probing
    line = one_line(vdisk("create", "-f", "qcow2", "-b", p, tmp_path / "over.qcow2"))
    assert "without backing format" in line and "give -F raw" in line
    assert not (tmp_path / "over.qcow2").exists()
    # the format given: served and inspected as raw
    res = vdisk("info", "-f", "raw", p)
    assert res.returncode == 0 and "file format: raw" in res.stdout, res.stderr
    with serving(tmp_path, f"id=d0,file={p},format=raw,read-only=on") as srv:
        assert srv.path("d0").read_bytes()[:len(digest)] == digest
        assert srv.stop() == 0
        assert "format given" in srv.stderr
    assert p.read_bytes() == digest


def _drop_backing_format(overlay: Path) -> None:
    """Turn the overlay's backing-format header extension into an unknown (ignored) one,
    as in images made before backing formats were recorded."""
    data = bytearray(overlay.read_bytes()[:65536])
    at = data.index(struct.pack(">I", 0xE2792ACA), 72)
    with open(overlay, "r+b") as f:
        f.seek(at)
        f.write(struct.pack(">I", 0x7E570001))
    assert "backing-filename-format" not in qemu_info(overlay, "-U")


def test_probed_backing_file_is_checked_and_logged(tmp_path: Path) -> None:
    base = _damaged_qcow2(tmp_path, "base.qcow2")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "base.qcow2", "-F", "raw", top, "64M",
             cwd=tmp_path)
    _drop_backing_format(top)
    hint = (f"name its format in {top} (qemu-img rebase -u -F raw -b 'base.qcow2') to use it "
            "as raw")
    line = one_line(vdisk("info", "--backing-chain", top))
    assert line == (f"vdisk: {base}: not a qcow2 image (bad magic), though the rest of a qcow2 "
                    f"header is there (version 3, cluster size 65536, virtual size 67108864); "
                    f"{hint}")
    with pytest.raises(ImageError, match="rebase"):
        open_chain(str(top), read_only=True)
    # an undamaged raw backing file without a recorded format: probed, and the log says so
    base.write_bytes(bytes(MiB))
    good = tmp_path / "good.raw"
    os.rename(base, good)
    qemu_img("rebase", "-u", "-b", "good.raw", "-F", "raw", top, cwd=tmp_path)
    _drop_backing_format(top)
    with serving(tmp_path, f"id=d0,file={top}") as srv:
        assert srv.stop() == 0
    assert f"backing file {good} probed as raw" in srv.stderr
    # recording the format, as the hint says, ends the probing
    qemu_img("rebase", "-u", "-b", "good.raw", "-F", "raw", top, cwd=tmp_path)
    chain = open_chain(str(top), read_only=True)
    try:
        assert chain.backing is not None and not chain.backing.probed
    finally:
        close_chain(chain)
