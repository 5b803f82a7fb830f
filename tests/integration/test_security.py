"""Security checks: the QMP socket's directory and peers, FUSE mount access, backing names.

Other users are played by child processes that switch to uid/gid 65534 (nobody) with no
supplementary groups; they run the system python with the standard library only.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from control.builtin import make_registry
from control.events import EventBus
from control.server import serve_qmp
from tests.helpers import ROOT
from tests.helpers.commands import run, vdisk_cmd
from tests.helpers.daemon import is_mounted, run_serve, serving
from vdisk.errors import VdiskError

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.root  # plays other users (uid 65534)


class NoDrives:
    def drives(self) -> dict[str, Any]:
        return {}

    def request_quit(self) -> None:
        pass


def as_nobody(code: str, *args: str) -> Any:
    """Run python `code` as uid/gid 65534 without groups; the JSON it prints."""
    res = subprocess.run(
        [SYSTEM_PYTHON, "-c", code, *args], capture_output=True, text=True, timeout=30,
        user=NOBODY, group=NOBODY, extra_groups=[], cwd="/",
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory under /tmp that others may traverse (0711) but not write."""
    d = Path(tempfile.mkdtemp(prefix="vsec", dir="/tmp"))
    d.chmod(0o711)
    try:
        yield d
    finally:
        if is_mounted(d / "mnt"):
            subprocess.run(["umount", "-l", str(d / "mnt")], check=False)
        shutil.rmtree(d, ignore_errors=True)


# --- the QMP socket's directory ------------------------------------------------------------


async def _serve_refused(path: str) -> str:
    with pytest.raises(VdiskError) as info:
        with trio.fail_after(10):
            await serve_qmp(path, make_registry(), NoDrives(), EventBus())
    assert not os.path.lexists(path)
    msg = str(info.value)
    assert "\n" not in msg and path in msg
    return msg


@pytest.mark.parametrize("mode", [0o770, 0o730, 0o707, 0o703, 0o777, 0o1777, 0o1733])
async def test_socket_in_a_directory_others_can_write_is_refused(
    tmp_path: Path, mode: int
) -> None:
    d = tmp_path / "s"
    d.mkdir()
    d.chmod(mode)
    msg = await _serve_refused(str(d / "q.sock"))
    assert "writable by other users" in msg and f"{mode:04o}" in msg


async def test_socket_directly_in_tmp_is_refused() -> None:
    msg = await _serve_refused(f"/tmp/vdisk-{uuid.uuid4().hex[:12]}.sock")
    assert "/tmp" in msg and "writable by other users" in msg


async def test_socket_dir_reached_through_a_symlink_is_checked_at_its_target(
    tmp_path: Path
) -> None:
    public = tmp_path / "public"
    public.mkdir()
    public.chmod(0o1777)
    (tmp_path / "link").symlink_to(public)
    msg = await _serve_refused(str(tmp_path / "link" / "q.sock"))
    assert "writable by other users" in msg


async def test_socket_in_another_users_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    msg = await _serve_refused(str(d / "q.sock"))
    assert f"uid {NOBODY}" in msg


async def test_socket_in_a_private_directory_is_0600(tmp_path: Path) -> None:
    path = str(tmp_path / "q.sock")
    old = os.umask(0)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_qmp, path, make_registry(), NoDrives(), EventBus())
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            nursery.cancel_scope.cancel()
    finally:
        os.umask(old)


def test_serve_refuses_a_public_socket_directory(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    run("qemu-img", "create", "-f", "raw", img, "1M")
    mnt = tmp_path / "mnt"
    sock = f"/tmp/vdisk-{uuid.uuid4().hex[:12]}.sock"
    try:
        res = run_serve(tmp_path, ["--mount", str(mnt), "--qmp", sock,
                                   "--drive", f"id=d0,file={img}"])
        lines = res.stderr.strip().splitlines()
        assert res.returncode != 0 and "Traceback" not in res.stderr
        errors = [x for x in lines if "writable by other users" in x]
        assert len(errors) == 1 and errors[0].startswith("vdisk: ") and sock in errors[0]
        assert not os.path.lexists(sock) and not is_mounted(mnt)
    finally:
        if os.path.lexists(sock):
            os.unlink(sock)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


# --- QMP peers of another uid ------------------------------------------------------------

CONNECT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect": e.errno}))
    sys.exit(0)
try:
    s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-block"}')
except OSError:
    pass  # already dropped
data = b""
while True:
    try:
        chunk = s.recv(4096)
    except ConnectionResetError:
        break
    if not chunk:
        break
    data += chunk
print(json.dumps({"connect": 0, "data": data.decode("latin-1")}))
"""


def test_daemon_refuses_other_uids(shared_dir: Path, tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    run("qemu-img", "create", "-f", "raw", img, "1M")
    sock = shared_dir / "q.sock"
    with serving(tmp_path, f"id=d0,file={img}", qmp_path=sock) as srv:
        # first line of defence: the socket file is 0600
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert as_nobody(CONNECT, str(sock)) == {"connect": errno.EACCES}
        # second: SO_PEERCRED; with the file opened up, the peer is dropped unanswered
        sock.chmod(0o666)
        assert as_nobody(CONNECT, str(sock)) == {"connect": 0, "data": ""}
        assert f"uid {NOBODY}" in srv.stderr and "refused" in srv.stderr
        assert srv.qmp("query-block")[0]["device"] == "d0"  # our own uid is served
        assert srv.stop() == 0


# --- FUSE mount access ---------------------------------------------------------------------

PROBE = """
import json, os, sys
mnt = sys.argv[1]
out = {}
def attempt(key, fn):
    try:
        out[key] = fn()
    except OSError as e:
        out[key] = "errno %d" % e.errno
attempt("listdir", lambda: sorted(os.listdir(mnt)))
attempt("stat_rw", lambda: os.stat(os.path.join(mnt, "rw")).st_size)
attempt("stat_ro", lambda: os.stat(os.path.join(mnt, "ro")).st_size)
def read(name):
    with open(os.path.join(mnt, name), "rb") as f:
        return f.read(8).hex()
attempt("read_rw", lambda: read("rw"))
attempt("read_ro", lambda: read("ro"))
attempt("write_ro", lambda: open(os.path.join(mnt, "ro"), "r+b").close())
print(json.dumps(out))
"""


@pytest.mark.parametrize("allow_other", [False, True])
def test_mount_is_private_unless_allow_other(
    shared_dir: Path, tmp_path: Path, allow_other: bool
) -> None:
    rw, ro = tmp_path / "rw.raw", tmp_path / "ro.raw"
    for img in (rw, ro):
        run("qemu-img", "create", "-f", "raw", img, "1M")
        run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 4k", img)
    mnt = shared_dir / "mnt"
    extra = ("--allow-other",) if allow_other else ()
    with serving(tmp_path, f"id=rw,file={rw}", f"id=ro,file={ro},read-only=on",
                 mount=mnt, extra=extra) as srv:
        assert (mnt / "ro").read_bytes()[:4] == b"\xab" * 4  # the mounting user: fine
        seen = as_nobody(PROBE, str(mnt))
        denied = f"errno {errno.EACCES}"
        if not allow_other:
            assert set(seen.values()) == {denied}, seen
        else:
            assert seen["listdir"] == ["ro", "rw"]
            assert seen["stat_rw"] == seen["stat_ro"] == 1 << 20
            assert seen["read_ro"] == "ab" * 8  # 0444: readable by all
            assert seen["read_rw"] == denied  # 0600: the owner's only
            assert seen["write_ro"] == denied
        assert srv.stop() == 0


# --- backing names that are not plain files ------------------------------------------------


@pytest.fixture
def odd_files(tmp_path: Path) -> Path:
    run("qemu-img", "create", "-f", "raw", tmp_path / "base.raw", "1M")
    os.mkfifo(tmp_path / "fifo")
    os.symlink("/dev/zero", tmp_path / "zero-link")
    (tmp_path / "dir").mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "sock"))
    s.close()
    return tmp_path


BAD_BACKING = [
    ('json:{"file": {"driver": "file", "filename": "base.raw"}}', "json:"),
    ("nbd:localhost:10809", "protocol 'nbd:'"),
    ("ssh://host/disk.img", "protocol 'ssh:'"),
    ("iscsi://host/iqn.x/0", "protocol 'iscsi:'"),
    ("/dev/zero", "a character device"),
    ("/dev/null", "a character device"),
    ("zero-link", "a character device"),
    ("fifo", "a FIFO"),
    ("file:fifo", "a FIFO"),  # QEMU: relative to the current directory
    ("file:{dir}/fifo", "a FIFO"),
    ("sock", "a socket"),
    ("dir", "a directory"),
    ("missing.raw", "does not exist"),
]


def vdisk_all(cwd: Path, *commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run several vdisk commands at once (in cwd); their results."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(vdisk_cmd(*args), cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                              env=env) for args in commands]
    results = []
    for args, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=30)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def serve_args(cwd: Path, image: Path | str) -> list[str]:
    return ["serve", "--mount", str(cwd / "mnt"), "--qmp", str(cwd / "q.sock"),
            "--drive", f"id=d0,file={image}"]


def no_leftovers(cwd: Path) -> None:
    assert not (cwd / "q.sock").exists() and not is_mounted(cwd / "mnt")


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdisk: "), res.stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(("backing", "reason"), BAD_BACKING, ids=[b for b, _ in BAD_BACKING])
def test_backing_that_is_not_a_plain_file_is_refused(
    odd_files: Path, backing: str, reason: str
) -> None:
    top = odd_files / "top.qcow2"
    backing = backing.replace("{dir}", str(odd_files))
    run("qemu-img", "create", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", top, "1M",
         cwd=odd_files)
    # one after the other: at once, one could find the image locked by the other
    [info] = vdisk_all(odd_files, ["info", "--backing-chain", str(top)])
    [serve] = vdisk_all(odd_files, serve_args(odd_files, top))
    line = one_error_line(info)
    assert reason in line and str(top) in line, line
    if reason != "does not exist":
        assert "only plain files" in line
    if backing != "file:fifo":  # (in the daemon's directory, the name means another file)
        assert one_error_line(serve) == line
    no_leftovers(odd_files)


REMOTE_DOWN = [  # remote names vdisk reads, whose servers are not there
    ("nbd+unix:///exp?socket={dir}/no.sock", "nbd+unix:///exp?socket={dir}/no.sock"),
    ("http://u:pw@127.0.0.1:1/disk.img", "http://127.0.0.1:1/disk.img"),
    ("https://127.0.0.1:1/disk.img", "https://127.0.0.1:1/disk.img"),
]


@pytest.mark.parametrize(("backing", "shown"), REMOTE_DOWN, ids=[b for b, _ in REMOTE_DOWN])
def test_remote_backing_that_does_not_answer_is_one_line(
    odd_files: Path, backing: str, shown: str
) -> None:
    top = odd_files / "top.qcow2"
    backing = backing.replace("{dir}", str(odd_files))
    shown = shown.replace("{dir}", str(odd_files))
    run("qemu-img", "create", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", top, "1M",
        cwd=odd_files)
    [info] = vdisk_all(odd_files, ["info", "--backing-chain", str(top)])
    line = one_error_line(info)
    assert line.startswith(f"vdisk: {shown}: ") and "u:pw" not in line, line
    # (serve: not checked here yet; at e399f5c a chain that fails to open makes serve
    # end in BlockingOnLoopError on close, for plain-file refusals too)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "reason"), [
    ("/dev/zero", "a character device"), ("fifo", "a FIFO"), ("dir", "a directory"),
    ("sock", "a socket"), ("zero-link", "a character device"),
])
def test_image_that_is_not_a_plain_file_is_refused(
    odd_files: Path, name: str, reason: str
) -> None:
    results = vdisk_all(odd_files, ["info", name], ["map", name], ["check", name],
                        serve_args(odd_files, odd_files / name))
    for res in results:
        line = one_error_line(res)
        assert reason in line and "only plain files" in line, line
    no_leftovers(odd_files)


def test_plain_backing_with_file_prefix_is_accepted(odd_files: Path) -> None:
    top = odd_files / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-u", "-b", "file:base.raw", "-F", "raw", top,
         "1M", cwd=odd_files)
    [res] = vdisk_all(odd_files, ["info", "--backing-chain", "--output=json", str(top)])
    assert res.returncode == 0, res.stderr
    assert [layer["format"] for layer in json.loads(res.stdout)] == ["qcow2", "raw"]


# --- untrusted image contents ------------------------------------------------------------

BOMB = """
import resource, sys, zstandard
from vdisk.engine.qcow2.compress import decompress_cluster
bomb = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(bytes(256 << 20))
assert len(bomb) < 64 << 10  # fits in what one compressed 64 KiB cluster may occupy
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    out = decompress_cluster(1, bomb, 65536)
except OSError:
    pass  # refusing it is fine too
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_zstd_cluster_cannot_inflate_past_the_cluster_size() -> None:
    """A compressed cluster from an untrusted image must not cost more than a cluster."""
    res = subprocess.run([sys.executable, "-c", BOMB], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) < 64, f"peak RSS grew by {res.stdout.strip()} MiB"
