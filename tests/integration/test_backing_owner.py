"""The backing owner check: a backing file that the owner of an image above it could not
read is refused, unless the operator turns the check off for that drive.

The unprivileged user is nobody (uid 65534), played with runuser and setpriv; the kernel
is the oracle for what that user may open.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.commands import qemu_img, vdisk_cmd
from tests.helpers.daemon import run_serve, serving
from vdisk.engine.access import Creds, access_problem, creds_of
from vdisk.engine.chain import close_chain, open_chain
from vdisk.errors import ChainError
from vdisk.service.mounts import is_mounted

NOBODY = 65534
G1, G2 = 31001, 31002  # gids that need no group database entry (setpriv --groups)
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.getuid() != 0, reason="needs root to play other users")]


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory under /tmp that nobody may traverse: the secret file in it is
    root's (0600), images/ belongs to nobody."""
    d = Path(tempfile.mkdtemp(prefix="vown", dir="/tmp"))
    d.chmod(0o755)
    (d / "secret.raw").write_bytes(os.urandom(64 << 10))
    (d / "secret.raw").chmod(0o600)
    (d / "images").mkdir()
    os.chown(d / "images", NOBODY, NOBODY)
    try:
        yield d
    finally:
        if is_mounted(d / "mnt"):
            subprocess.run(["umount", "-l", str(d / "mnt")], check=False)
        shutil.rmtree(d, ignore_errors=True)


def as_nobody(*cmd: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["runuser", "-u", "nobody", "--", *map(str, cmd)],
                          capture_output=True, timeout=60, cwd="/")


def nobody_image(shared: Path, backing: Path | str, name: str = "top.qcow2") -> Path:
    """A qcow2 that nobody makes (and owns) over backing, which nobody need not read."""
    top = shared / "images" / name
    res = as_nobody("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing,
                    "-F", "raw", top, "64k")
    assert res.returncode == 0, res.stderr
    assert top.stat().st_uid == NOBODY
    return top


def vdisk(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(vdisk_cmd(*map(str, args)), capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdisk: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


@pytest.mark.slow
def test_nobody_cannot_read_roots_file_through_a_drive(shared: Path, tmp_path: Path) -> None:
    secret = shared / "secret.raw"
    assert as_nobody("cat", secret).returncode != 0  # the kernel agrees: not nobody's
    top = nobody_image(shared, secret)
    mnt, sock = shared / "mnt", tmp_path / "q.sock"
    args = ["--mount", str(mnt), "--qmp", str(sock), "--allow-other"]
    res = run_serve(tmp_path, [*args, "--drive", f"id=d0,file={top},read-only=on"])
    line = one_line(res)
    assert line == (
        f"vdisk: {top}: backing file '{secret}' ({secret}) is refused: nobody (uid 65534), "
        f"who owns this image, could not open it (no read permission on {secret}); "
        "backing-owner-check=off allows it"
    )
    assert not mnt.exists() and not sock.exists()
    # the offline commands refuse it with the same line
    for cmd in (["info", "--backing-chain"], ["map"], ["stream"]):
        assert one_line(vdisk(*cmd, top)) == line, cmd
    # vdisk check reads only the image itself, never its backing file
    assert vdisk("check", top).returncode == 0
    # the operator's explicit choice: served, and then nobody reads it through the drive
    with serving(tmp_path, f"id=d0,file={top},read-only=on,backing-owner-check=off",
                 mount=mnt, qmp_path=sock, extra=("--allow-other",)) as srv:
        seen = as_nobody("head", "-c", str(64 << 10), srv.path("d0"))
        assert seen.returncode == 0, seen.stderr
        assert seen.stdout == secret.read_bytes()
        assert srv.stop() == 0
    assert "backing-owner-check off" in srv.stderr
    res = vdisk("info", "--backing-chain", "--backing-owner-check=off", top)
    assert res.returncode == 0 and str(secret) in res.stdout, res.stderr


def test_config_file_option(shared: Path, tmp_path: Path) -> None:
    top = nobody_image(shared, shared / "secret.raw")
    conf = tmp_path / "vdisk.toml"
    body = (f'mount = "{shared / "mnt"}"\nqmp = "{tmp_path / "q.sock"}"\n'
            f'[[drive]]\nid = "d0"\nfile = "{top}"\nread-only = true\n')
    conf.write_text(body)
    assert "backing-owner-check=off allows it" in one_line(
        run_serve(tmp_path, ["--config", str(conf)]))
    conf.write_text(body + "backing-owner-check = false\n")
    with serving(tmp_path, extra=("--config", str(conf)), mount=shared / "mnt",
                 qmp_path=tmp_path / "q.sock") as srv:
        assert srv.path("d0").read_bytes() == (shared / "secret.raw").read_bytes()
        assert srv.stop() == 0
    conf.write_text(body + 'backing-owner-check = "no"\n')
    line = one_line(run_serve(tmp_path, ["--config", str(conf)]))
    assert "backing-owner-check: expected true or false" in line


def test_search_permission_on_every_directory(shared: Path) -> None:
    vault = shared / "vault"
    vault.mkdir(mode=0o700)
    plain = vault / "plain.raw"
    plain.write_bytes(b"x" * 4096)
    plain.chmod(0o644)  # readable, but nobody cannot get through vault
    top = nobody_image(shared, "../vault/plain.raw")
    with pytest.raises(ChainError) as e:
        open_chain(str(top), read_only=True)
    assert f"no search permission on {vault}" in str(e.value)
    vault.chmod(0o711)
    close_chain(open_chain(str(top), read_only=True))
    # a symbolic link nobody owns does not help: its target is walked as the kernel does
    vault.chmod(0o700)
    os.symlink(plain, shared / "images" / "link.raw")
    link_top = nobody_image(shared, "link.raw", "link.qcow2")
    with pytest.raises(ChainError, match=f"no search permission on {vault}"):
        open_chain(str(link_top), read_only=True)
    close_chain(open_chain(str(link_top), read_only=True, backing_owner_check=False))


def test_every_owner_above_is_checked(shared: Path) -> None:
    """root's mid image may use root's file; nobody's image over mid still may not."""
    secret = shared / "secret.raw"
    mid = shared / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", mid, "64k")
    mid.chmod(0o644)
    close_chain(open_chain(str(mid), read_only=True))  # root owns mid: its own choice
    top = shared / "images" / "top.qcow2"
    res = as_nobody("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", mid, "-F", "qcow2",
                    top, "64k")
    assert res.returncode == 0, res.stderr
    with pytest.raises(ChainError) as e:
        open_chain(str(top), read_only=True)
    assert str(e.value) == (
        f"{mid}: backing file '{secret}' ({secret}) is refused: nobody (uid 65534), who owns "
        f"{top}, could not open it (no read permission on {secret}); "
        "backing-owner-check=off allows it"
    )


@pytest.fixture
def member_group() -> Iterator[tuple[str, int]]:
    """A temporary group in /etc/group with nobody as a supplementary member."""
    name = f"vdt{uuid.uuid4().hex[:8]}"
    subprocess.run(["groupadd", "-U", "nobody", name], check=True, capture_output=True)
    try:
        yield name, int(subprocess.run(["getent", "group", name], check=True,
                                       capture_output=True, text=True).stdout.split(":")[2])
    finally:
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def test_supplementary_groups_from_the_group_database(
    shared: Path, member_group: tuple[str, int]
) -> None:
    _, gid = member_group
    ids = subprocess.run(["id", "-G", "nobody"], check=True, capture_output=True, text=True)
    assert creds_of(NOBODY).gids == {int(g) for g in ids.stdout.split()}
    assert gid in creds_of(NOBODY).gids
    shared_file = shared / "group.raw"
    shared_file.write_bytes(b"g" * 4096)
    os.chown(shared_file, 0, gid)
    shared_file.chmod(0o640)
    assert as_nobody("cat", shared_file).stdout == b"g" * 4096  # the kernel: allowed
    top = nobody_image(shared, shared_file)
    chain = open_chain(str(top), read_only=True)
    try:
        assert chain.read(0, 4096) == b"g" * 4096
    finally:
        close_chain(chain)
    os.chown(shared_file, 0, G1)  # a group nobody is not in
    with pytest.raises(ChainError, match="no read permission"):
        open_chain(str(top), read_only=True)


# --- the permission model against the kernel ------------------------------------------


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 1, 2, 4, 8, 0x10, 0x20
ANY = 0xFFFFFFFF


def _tree(d: Path) -> list[str]:
    """Files, directories, ACLs and links covering the kernel's rules; the paths to try."""
    def file(name: str, mode: int, uid: int = 0, gid: int = 0, acl: bytes | None = None) -> None:
        p = d / name
        p.write_bytes(b"data")
        os.chown(p, uid, gid)
        p.chmod(mode)
        if acl is not None:
            os.setxattr(p, "system.posix_acl_access", acl)

    def directory(name: str, mode: int, gid: int = 0) -> None:
        (d / name).mkdir()
        os.chown(d / name, 0, gid)
        (d / name / "f").write_bytes(b"data")
        (d / name / "f").chmod(0o644)
        (d / name).chmod(mode)

    file("f0600", 0o600)
    file("f0644", 0o644)
    file("f0640-g1", 0o640, gid=G1)
    file("f0604-g1", 0o604, gid=G1)  # members of G1 get the group bits: nothing
    file("own0400", 0o400, uid=NOBODY, gid=NOBODY)
    file("own0044", 0o044, uid=NOBODY, gid=NOBODY)  # the owner gets the owner bits only
    file("acl-user-deny", 0o644, acl=_acl((USER_OBJ, 6, ANY), (USER, 0, NOBODY),
                                          (GROUP_OBJ, 4, ANY), (MASK, 4, ANY), (OTHER, 4, ANY)))
    file("acl-group-grant", 0o640, acl=_acl((USER_OBJ, 6, ANY), (GROUP_OBJ, 0, ANY),
                                            (GROUP, 4, G2), (MASK, 4, ANY), (OTHER, 0, ANY)))
    file("acl-mask-blocks", 0o640, acl=_acl((USER_OBJ, 6, ANY), (USER, 4, NOBODY),
                                            (GROUP_OBJ, 0, ANY), (MASK, 0, ANY),
                                            (OTHER, 4, ANY)))
    file("acl-group-found-denies", 0o644, gid=G1,
         acl=_acl((USER_OBJ, 6, ANY), (GROUP_OBJ, 0, ANY), (MASK, 4, ANY), (OTHER, 4, ANY)))
    directory("d0700", 0o700)
    directory("d0711", 0o711)
    directory("d0710-g2", 0o710, gid=G2)
    os.symlink(d / "d0700" / "f", d / "abs-into-d0700")
    os.symlink("d0711/f", d / "rel-into-d0711")
    os.symlink("../f0644", d / "d0711" / "up")
    os.symlink("rel-into-d0711", d / "link-to-link")
    os.symlink("missing", d / "dangling")
    os.symlink("loop-b", d / "loop-a")
    os.symlink("loop-a", d / "loop-b")
    names = [p.name for p in d.iterdir()]
    names += ["d0700/f", "d0711/f", "d0710-g2/f", "d0711/up", "d0711/../f0644",
              "d0700/../f0644", "./d0711/./f", "f0644/x", "nothing-here"]
    return [str(d / n) for n in sorted(names) if n not in ("d0700", "d0711", "d0710-g2")]


OPEN_ALL = """
import json, sys
out = {}
for p in sys.argv[1:]:
    try:
        open(p, "rb").close()
        out[p] = 0
    except OSError as e:
        out[p] = e.errno
print(json.dumps(out))
"""


@pytest.mark.parametrize("groups", [(), (G1,), (G2,), (G1, G2)], ids=str)
def test_access_model_matches_the_kernel(shared: Path, groups: tuple[int, ...]) -> None:
    d = shared / "tree"
    d.mkdir(mode=0o755)
    paths = _tree(d)
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}"]
    cmd += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    res = subprocess.run([*cmd, SYSTEM_PYTHON, "-I", "-c", OPEN_ALL, *paths],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    kernel = json.loads(res.stdout)
    creds = Creds(NOBODY, frozenset({NOBODY, *groups}), "nobody")
    checked = 0
    for p in paths:
        problem = access_problem(p, creds)
        if kernel[p] in (errno.ENOENT, errno.ENOTDIR):
            assert problem is None, (p, problem)  # not a permission matter: reported later
        else:
            assert (kernel[p] == 0) == (problem is None), (p, kernel[p], problem)
            checked += 1
    assert checked >= 20
    allowed = {Path(p).name for p in paths if kernel[p] == 0}
    assert {"f0644", "own0400", "rel-into-d0711"} <= allowed
    assert not {"f0600", "own0044", "acl-user-deny", "abs-into-d0700"} & allowed
    assert ("acl-group-grant" in allowed) == (G2 in groups)
    assert ("f0604-g1" in allowed) == (G1 not in groups)
