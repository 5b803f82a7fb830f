"""scripts/setup: the OS packages it asks for, the .venv it repairs, what it says; and
`scripts/run` (the demo) as a user other than root, on a copy it set up.

The copy lives in a folder under /tmp that other users may read, with a .venv made from
the python3 on a plain PATH (/usr/local/bin:/usr/bin:/bin), not the one running pytest
(which may live in root's home). Other users are played by uid/gid of `nobody`; their
/dev/fuse is a device node of our own, bind-mounted in a private mount namespace, so the
test chooses whether they may open it without touching the machine's /dev/fuse.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vdisk.cli import _demo as demo_mod

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup"
PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"  # a normal user's PATH on Debian: no sbin
IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache",
                                ".ruff_cache", ".mypy_cache", ".hypothesis", "build",
                                "bench-results")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play another user")

pytestmark = pytest.mark.slow  # about a minute in all


def functions(snippet: str, *args: str, cwd: Path = ROOT, setup: Path = SETUP,
              env: dict[str, str] | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a bash snippet with scripts/setup's functions loaded (its main does not run)."""
    if "input" not in kw:
        kw["stdin"] = subprocess.DEVNULL
    bash = shutil.which("bash") or "/bin/bash"
    return subprocess.run([bash, "-c", f'. "$1"; shift; {snippet}', "bash", str(setup), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          **kw)  # type: ignore[call-overload]


def venv_problem(venv: Path) -> str:
    res = functions('venv_problem "$1"', str(venv))
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def array(name: str) -> list[str]:
    res = functions(f'printf "%s\\n" "${{{name}[@]}}"')
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


@dataclass
class SetUp:
    base: Path  # world-readable; holds the copy and the other user's home
    copy: Path
    first: subprocess.CompletedProcess[str]  # scripts/setup on the poisoned .venv
    seconds: float


@pytest.fixture(scope="module")
def set_up() -> Iterator[SetUp]:
    """A copy of the working tree whose .venv is what a failed first `python3 -m venv`
    leaves (a python, no pip), then scripts/setup run on it."""
    python3 = shutil.which("python3", path=PLAIN_PATH)
    if python3 is None:
        pytest.skip(f"no python3 on {PLAIN_PATH}")
    missing = functions('missing_packages "${RUN_PACKAGES[@]}"').stdout.split()
    if missing:
        pytest.skip(f"OS packages missing (scripts/setup installs them): {' '.join(missing)}")
    base = Path(tempfile.mkdtemp(prefix="vdisk-setup-", dir="/tmp"))
    try:
        base.chmod(0o755)
        copy = base / "vdisk"
        shutil.copytree(ROOT, copy, ignore=IGNORE, symlinks=True)
        made = subprocess.run([python3, "-m", "venv", "--without-pip", ".venv"], cwd=copy,
                              capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        assert (copy / ".venv" / "bin" / "python").exists()
        env = dict(os.environ, PATH=PLAIN_PATH)
        start = time.monotonic()
        first = subprocess.run([str(copy / "scripts" / "setup")], cwd=base, env=env,
                               capture_output=True, text=True, timeout=600,
                               stdin=subprocess.DEVNULL)
        yield SetUp(base, copy, first, time.monotonic() - start)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- the .venv -------------------------------------------------------------------------


def test_setup_rebuilds_the_venv_a_failed_python3_venv_left(set_up: SetUp) -> None:
    res = set_up.first
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines()[0] == (
        "setup: .venv does not work: it has no pip (left by a failed 'python3 -m venv'?); "
        "rebuilding it"), res.stderr
    assert ("setup: installing vdisk and its Python packages into .venv (pip, about a minute: "
            "it builds pyfuse3 from source)") in res.stderr
    assert "Traceback" not in res.stderr
    venv = set_up.copy / ".venv"
    assert venv_problem(venv) == ""
    version = subprocess.run([str(venv / "bin" / "vdisk"), "--version"], capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("vdisk "), version
    assert (venv / ".installed").read_text().strip() == functions(
        "cat pyproject.toml vdisk/fuse/fastpath.c | sha256sum", cwd=set_up.copy).stdout.split()[0]
    assert list((set_up.copy / "vdisk" / "fuse").glob("_fastpath*.so"))  # the C fast path


def test_setup_second_run_is_silent_and_quick(set_up: SetUp) -> None:
    start = time.monotonic()
    res = subprocess.run([str(set_up.copy / "scripts" / "setup")], capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL,
                         env=dict(os.environ, PATH=PLAIN_PATH))
    took = time.monotonic() - start
    assert res.returncode == 0, res.stderr
    assert res.stderr == "" and res.stdout == ""
    assert took < 10, f"a set-up that is already done took {took:.1f} s"


def test_venv_problems_are_named(set_up: SetUp, tmp_path: Path) -> None:
    python = sys.executable
    assert venv_problem(tmp_path / "none") == "there is none"
    (tmp_path / "empty").mkdir()
    assert venv_problem(tmp_path / "empty") == "it has no pyvenv.cfg"
    for name in ("nopip", "gone"):
        subprocess.run([python, "-m", "venv", "--without-pip", str(tmp_path / name)],
                       check=True, timeout=120)
    assert venv_problem(tmp_path / "nopip") == (
        "it has no pip (left by a failed 'python3 -m venv'?)")
    # The interpreter it was made from is gone (e.g. the system's python was upgraded).
    for link in (tmp_path / "gone" / "bin").glob("python*"):
        link.unlink()
        link.symlink_to(tmp_path / "removed" / "python3")
    assert venv_problem(tmp_path / "gone") == "its python does not run"
    # A working .venv copied elsewhere: its scripts still name the old folder.
    shutil.copytree(set_up.copy / ".venv", tmp_path / "moved", symlinks=True)
    assert venv_problem(set_up.copy / ".venv") == ""
    assert venv_problem(tmp_path / "moved") == (
        "its scripts do not point to its python (was the folder moved?)")


def test_setup_refuses_unknown_arguments() -> None:
    res = subprocess.run([str(SETUP), "--bogus"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr == "setup: usage: scripts/setup [--test]\n"


# --- OS packages ----------------------------------------------------------------------


def _package_of(tool: str) -> str:
    """The Debian package that holds the tool found on this machine."""
    path = demo_mod.find_tool(tool)
    assert path is not None, f"{tool} is not installed here"
    real = os.path.realpath(path)
    for candidate in dict.fromkeys((path, real, real.removeprefix("/usr"))):
        res = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if res.returncode == 0:
            return res.stdout.split(":")[0]
    raise AssertionError(f"no package holds {path}")


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="not a Debian system")
def test_packages_cover_the_tools_and_the_test_ones_stay_out_of_run() -> None:
    run, test = array("RUN_PACKAGES"), array("TEST_PACKAGES")
    for p in ("python3", "python3-venv", "python3-dev", "gcc", "libc6-dev", "pkg-config",
              "libfuse3-dev"):
        assert p in run, p
    for tool in ("mkfs.ext4", "losetup", "mount", "umount", "fusermount3", "qemu-img",
                 "qemu-io"):
        assert _package_of(tool) in run, tool
    for tool in ("qemu-storage-daemon", "fio", "socat", "nginx", "openssl"):
        assert _package_of(tool) in test and _package_of(tool) not in run, tool
    assert not set(run) & set(test)


def test_apt_progress_logs_everything_and_shows_fifths(tmp_path: Path) -> None:
    """apt-get's output with APT::Status-Fd=1, as a fresh Debian 12 prints it."""
    lines = [  # from `apt-get install -o APT::Status-Fd=1 socat` on a fresh Debian 12
        "Reading package lists...",
        "dlstatus:1:0.0000:Retrieving file 1 of 5",
        "Get:1 http://deb.debian.org/debian bookworm/main amd64 libtirpc-common all "
        "1.3.3+ds-1 [14.0 kB]",
        "dlstatus:2:5.9757:Retrieving file 2 of 5",
        "dlstatus:5:43.2350:Retrieving file 5 of 5",
        "dlstatus:5:47.8434:Retrieving file 5 of 5",
        "dlstatus:5:100.0000:Retrieving file 5 of 5",
        "debconf: delaying package configuration, since apt-utils is not installed",
        "pmstatus:dpkg-exec:0.0000:Running dpkg",
        "pmstatus:libtirpc3:14.2857:Unpacking libtirpc3 (amd64)",
        "pmstatus:libwrap0:28.5714:Preparing libwrap0 (amd64)",
        "pmstatus:socat:47.6190:Installing socat (amd64)",
        "pmstatus:libtirpc3:66.6667:Installed libtirpc3 (amd64)",
        "pmstatus:libwrap0:85.7143:Installed libwrap0 (amd64)",
        "pmstatus:socat:95.2381:Installed socat (amd64)",
    ]
    log = tmp_path / "apt.log"
    res = functions('apt_progress "$1"', str(log), input="\n".join(lines) + "\n")
    assert res.returncode == 0, res.stderr
    assert log.read_text().splitlines() == lines
    assert res.stderr.splitlines() == [
        "setup:   ... downloading, 0%",
        "setup:   ... downloading, 43%",
        "setup:   ... downloading, 100%",
        "setup:   ... installing, 0%",
        "setup:   ... installing, 28%",
        "setup:   ... installing, 47%",
        "setup:   ... installing, 66%",
        "setup:   ... installing, 85%",
    ]


# --- another user ---------------------------------------------------------------------


def _nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _home(set_up: SetUp, name: str) -> Path:
    home = set_up.base / name
    home.mkdir()
    os.chown(home, *_nobody())
    return home


def _left_in(folder: Path) -> list[str]:
    found = [f"file {p}" for p in folder.iterdir()]
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if str(folder) in line.split()[4]]
    return found


@needs_root
def test_setup_without_root_or_sudo_says_what_to_do(set_up: SetUp, tmp_path: Path) -> None:
    """A missing package, a user other than root, no sudo: a plain message, no apt-get."""
    tools = set_up.base / "tools"  # the only commands on PATH: no sudo among them
    tools.mkdir()
    for name in ("dpkg-query", "apt-get", "grep", "id"):
        found = shutil.which(name)
        assert found is not None, name
        (tools / name).symlink_to(found)
    uid, gid = _nobody()
    res = functions("install_os_packages fuse3 vdisk-no-such-package",
                    setup=set_up.copy / "scripts" / "setup", cwd=set_up.base,
                    env={"PATH": str(tools)}, user=uid, group=gid, extra_groups=[])
    assert res.returncode == 1, res.stderr
    assert res.stdout == ""
    user = pwd.getpwuid(uid).pw_name
    assert res.stderr.splitlines() == [
        "setup: missing OS packages: vdisk-no-such-package",
        "setup: installing them needs root, and sudo is not installed. As root, run:",
        "setup:     apt-get update && apt-get install --no-install-recommends "
        "vdisk-no-such-package",
        f"setup: then run this command again as {user}. (Or install sudo, as root:",
        f"setup: apt-get install sudo; adduser {user} sudo; then log in again and rerun.)",
    ]


def _run_as_nobody(set_up: SetUp, home: Path, fuse_mode: int, *command: str,
                   fuse_group: int = 0) -> subprocess.CompletedProcess[str]:
    """The command (default: scripts/run, i.e. the demo) as nobody, with a plain PATH,
    seeing a /dev/fuse of fuse_mode, owned by root and fuse_group."""
    node = home.parent / f"{home.name}.fuse"
    os.mknod(node, stat.S_IFCHR | fuse_mode, os.stat("/dev/fuse").st_rdev)
    node.chmod(fuse_mode)  # mknod's mode went through the umask
    os.chown(node, 0, fuse_group)
    uid, gid = _nobody()
    # Only the mount that holds /dev/fuse is made private ("/" may be no mount point, as
    # in a chroot), so that the bind mount stays in this namespace.
    script = ('set -e; mount --make-rprivate "$(findmnt -no TARGET -T /dev/fuse)"; '
              'mount --bind "$1" /dev/fuse; shift; exec "$@"')
    cmd = ["unshare", "--mount", "--propagation", "unchanged", "sh", "-c", script, "sh", str(node),
           "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
           "env", "-i", f"PATH={PLAIN_PATH}", f"HOME={home}", f"TMPDIR={home}",
           *(command or (str(set_up.copy / "scripts" / "run"), "demo", "--speed", "64M"))]
    try:
        return subprocess.run(cmd, cwd=home, capture_output=True, text=True, timeout=180,
                              stdin=subprocess.DEVNULL)
    finally:
        node.unlink()


@needs_root
def test_demo_as_another_user_with_fuse_access(set_up: SetUp) -> None:
    """The newcomer's case: a normal user who may use FUSE, /usr/sbin not on PATH."""
    assert set_up.first.returncode == 0, set_up.first.stderr
    home = _home(set_up, "with-fuse")
    res = _run_as_nobody(set_up, home, 0o666)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr == ""  # nothing to set up, nothing went wrong
    out = res.stdout
    assert "Traceback" not in out
    assert "Built a 64.0 MiB ext4 disk" in out  # mkfs.ext4 found in sbin
    assert "3. Skipping the loop mount (not running as root); reading the raw file" in out
    assert "Checksums verified: sha256 of the whole 64.0 MiB disk" in out
    assert "6. Stopped the daemon (SIGTERM), which unmounted mnt/. The chain now:" in out
    assert "detached" not in out and "Unmounted" not in out
    assert "Done." in out
    assert _left_in(home) == []


@needs_root
def test_demo_as_another_user_without_fuse_access_says_why(set_up: SetUp) -> None:
    assert set_up.first.returncode == 0, set_up.first.stderr
    home = _home(set_up, "without-fuse")
    res = _run_as_nobody(set_up, home, 0o600)
    assert res.returncode == 1, res.stdout + res.stderr
    user = pwd.getpwuid(_nobody()[0]).pw_name
    assert res.stderr == (
        f"vdisk: demo failed: cannot serve the disk through FUSE: /dev/fuse is crw------- "
        f"root:root, so user {user} cannot open it. Run the demo as root, or give {user} read "
        "and write access to /dev/fuse (for example a group that owns it, with mode 0660)\n")
    assert re.fullmatch(r"vdisk demo: working in \S+\n", res.stdout), res.stdout
    assert _left_in(home) == []


@needs_root
def test_demo_as_another_user_not_in_the_fuse_group_says_join_it(set_up: SetUp) -> None:
    home = _home(set_up, "not-in-group")
    group = grp.getgrnam("daemon")  # a group nobody is not in (base-passwd has it)
    res = _run_as_nobody(set_up, home, 0o660, fuse_group=group.gr_gid)
    assert res.returncode == 1, res.stdout + res.stderr
    user = pwd.getpwuid(_nobody()[0]).pw_name
    assert res.stderr == (
        f"vdisk: demo failed: cannot serve the disk through FUSE: /dev/fuse is crw-rw---- "
        f"root:daemon, so user {user} cannot open it. Run the demo as root, or add {user} to "
        f"group daemon (as root: adduser {user} daemon; log in again)\n")
    assert _left_in(home) == []


@needs_root
def test_demo_as_another_user_without_etc_mtab_says_why(set_up: SetUp) -> None:
    """fusermount3 could mount but not unmount: the demo stops before it mounts."""
    home = _home(set_up, "without-mtab")
    missing = home / "mtab"
    res = _run_as_nobody(set_up, home, 0o666, str(set_up.copy / ".venv" / "bin" / "python"),
                         "-c", "import sys; from vdisk.cli._demo import fuse_unavailable as f; "
                         "print(f(mtab=sys.argv[1]), f())", str(missing))
    assert res.returncode == 0, res.stderr
    assert res.stdout == (f"there is no {missing}, which fusermount3 needs to unmount for "
                          f"users other than root. As root: ln -s ../proc/self/mounts "
                          f"{missing} None\n")


def test_setup_links_a_missing_etc_mtab(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root makes the link")
    mtab = tmp_path / "mtab"
    res = functions('ensure_mtab "$1"', str(mtab))
    assert res.returncode == 0, res.stderr
    assert os.readlink(mtab) == "../proc/self/mounts"
    assert res.stderr == (f"setup: made {mtab} a link to ../proc/self/mounts, as systemd does: "
                          "fusermount3 needs it to unmount for users other than root\n")
    again = functions('ensure_mtab "$1"', str(mtab))
    assert again.returncode == 0 and again.stderr == ""


@needs_root
def test_setup_as_another_user_notes_a_missing_etc_mtab(set_up: SetUp) -> None:
    home = _home(set_up, "mtab-note")
    mtab = home / "mtab"
    uid, gid = _nobody()
    res = functions('ensure_mtab "$1"', str(mtab), setup=set_up.copy / "scripts" / "setup",
                    cwd=home, user=uid, group=gid, extra_groups=[])
    assert res.returncode == 0, res.stderr
    assert not os.path.lexists(mtab)
    assert res.stderr == (f"setup: note: there is no {mtab}, so users other than root cannot "
                          "unmount FUSE mounts (vdisk serve, the demo); as root: ln -s "
                          f"../proc/self/mounts {mtab}\n")


def test_pytest_keeps_only_the_folders_of_failed_tests(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
