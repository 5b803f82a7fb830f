"""README.md's quick start works as written: its ```sh blocks run, in order, in one shell.

The blocks run in a temporary folder with the venv's bin first on PATH (what
`. .venv/bin/activate` does), with nothing substituted. Other fenced blocks (```console)
are the set-up commands and the VM line; they are checked for the commands they name.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.daemon import force_unmount, is_mounted, wait_gone
from tests.helpers.leftovers import loops_under, mounts_under

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
TIMEOUT = 35
INSTALLED = "/opt/vdisk/.venv/bin/vdisk"  # where docs/vdisk@.service expects vdisk

needs_root_and_loop = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/loop-control"),
    reason="the quick start mounts through a loop device (root)",
)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(README.read_text()) if kind == lang]


def _procs_in(folder: Path) -> list[int]:
    """Processes whose working directory is inside folder (the backgrounded vdisk serve)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if cwd == str(folder) or cwd.startswith(f"{folder}/"):
                found.append(int(pid))
    return found


def _daemons_in(folder: Path) -> list[int]:
    """Live processes named by pid files in folder (the daemonized vdisk serve)."""
    from vdisk.service.pidfile import process_alive, read_pid

    pids = (read_pid(str(p)) for p in folder.rglob("*.pid"))
    return [pid for pid in pids if pid is not None and pid > 0 and process_alive(pid)]


def _cleanup(folder: Path) -> None:
    """Whatever a failed run left: mounts (innermost first), loop devices, the daemon."""
    for point in sorted(mounts_under(folder), key=len, reverse=True):
        if point.endswith("/fs"):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    for loop in loops_under(folder):
        subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
    for pid in _procs_in(folder) + _daemons_in(folder):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    while (_procs_in(folder) or _daemons_in(folder)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for point in mounts_under(folder):
        subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True, check=False)


def test_readme_has_a_quick_start() -> None:
    sh = "".join(blocks("sh"))
    for needed in ("vdisk create", "vdisk serve", "losetup", "mount ", "block-stream",
                   "vdisk jobs", "socat - UNIX-CONNECT:", "qmp-shell", " quit"):
        assert needed in sh, needed
    console = "".join(blocks("console"))
    assert "scripts/run" in console and "scripts/test" in console
    assert "-drive file=mnt/disk0,format=raw" in console
    assert "The test command is `scripts/test`." in README.read_text()
    for name in ("run", "test", "setup"):
        assert os.access(ROOT / "scripts" / name, os.X_OK), name
    for link in re.findall(r"\]\((docs/[^)]+)\)", README.read_text()):
        doc, _, anchor = link.partition("#")
        assert (ROOT / doc).is_file(), doc
        if anchor:  # GitHub's heading slugs
            headings = re.findall(r"^#+ (.+)$", (ROOT / doc).read_text(), flags=re.M)
            slugs = {re.sub(r"[^\w -]", "", h).strip().lower().replace(" ", "-") for h in headings}
            assert anchor in slugs, link


@pytest.mark.slow
@pytest.mark.root
@needs_root_and_loop
def test_readme_quick_start_runs(tmp_path: Path) -> None:
    script = "set -euo pipefail\n" + "\n".join(blocks("sh"))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    try:
        res = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, text=True,
                             capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    finally:
        _cleanup(tmp_path)
    out = res.stdout
    assert res.returncode == 0, f"stdout:\n{out}\nstderr:\n{res.stderr}"
    assert "backing file: base.raw" in out  # the chain before
    assert "Images are identical." in out  # mnt/disk0 reads like the chain
    assert "hello from the base image" in out  # the file system through the loop device
    assert '"return":[]' in out.replace(" ", "")  # socat's raw QMP answer
    assert "completed at 67108864/67108864 bytes" in out  # vdisk jobs --watch
    final_info = out.rsplit("image: top.qcow2", 1)[1]
    assert "backing file" not in final_info.split("No errors")[0]  # flattened
    assert out.count("No errors were found on the image.") == 2  # vdisk check, qemu-img check
    try:
        work = tmp_path / "vdisk-try"
        assert not mounts_under(tmp_path) and not loops_under(tmp_path) and not _procs_in(tmp_path)
        assert not (work / "vdisk.pid").exists()  # removed by the daemon as it stopped
        log = (work / "vdisk.log").read_text()
        for line in ("serving disk0", "job disk0: completed", "stopping: host-qmp-quit",
                     "stopped"):
            assert line in log, (line, log)
        assert "WARNING" not in log and "Traceback" not in log, log
        cmp = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                              str(work / "top.qcow2"), str(work / "base.raw")],
                             capture_output=True, text=True, check=False)
        assert cmp.returncode == 1, cmp.stdout + cmp.stderr  # new.txt was written on top
    finally:
        _cleanup(tmp_path)


def _qmp_sections() -> dict[str, str]:
    """docs/QMP.md's '### `name`' sections by name."""
    text = (ROOT / "docs" / "QMP.md").read_text()
    parts = re.split(r"^### `([^`]+)`\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1].split("\n## ")[0] for i in range(1, len(parts), 2)}


def test_qmp_doc_names_every_registered_command_and_argument() -> None:
    from vdisk.service.daemon import Daemon, ServeConfig

    registry = Daemon(ServeConfig(mount="mnt", qmp="qmp.sock", drives=())).registry
    sections = _qmp_sections()
    events = {"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR", "SHUTDOWN",
              "JOB_STATUS_CHANGE", "BLOCK_JOB_PENDING"}
    for name in registry.names():
        assert name in sections, f"docs/QMP.md lacks a section for {name}"
        command = registry.lookup(name)
        assert command is not None
        for param in command.params:
            assert f"`{param.name}`" in sections[name], f"{name}: argument {param.name}"
    assert set(sections) - set(registry.names()) == events  # nothing unregistered
    emitters = ("vdisk/block/job.py", "vdisk/block/stream.py", "vdisk/service/daemon.py")
    sources = "".join((ROOT / path).read_text() for path in emitters)
    for event in events:
        assert f'"{event}"' in sources, event


def _unit_lines(instance: str, run_dir: Path, conf: Path) -> dict[str, str]:
    """docs/vdisk@.service's settings, with %i replaced, the documented paths swapped for
    test ones (run directory, config file, install path of vdisk) and '-' prefixes
    dropped."""
    lines: dict[str, str] = {}
    for line in (ROOT / "docs" / "vdisk@.service").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            value = value.removeprefix("-").replace("%i", instance)
            value = value.replace(f"/run/vdisk/{instance}", str(run_dir))
            value = value.replace(f"/etc/vdisk/{instance}.toml", str(conf))
            lines[key] = value.replace(INSTALLED, str(Path(sys.executable).parent / "vdisk"))
    return lines


def _systemd_words(command: str, env: dict[str, str]) -> list[str]:
    """systemd's expansion: ${VAR} inside a word, $VAR alone is split into words."""
    import shlex

    words: list[str] = []
    for word in shlex.split(command):
        if re.fullmatch(r"\$\w+", word):
            words += env.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return words


def _toml_from_unit_comment() -> str:
    """The example /etc/vdisk/vm1.toml in the unit's header comment."""
    text = (ROOT / "docs" / "vdisk@.service").read_text()
    return "".join(f"{m}\n" for m in re.findall(r"^#       (\S.*)$", text, flags=re.M))


@pytest.mark.slow
def test_systemd_unit_serves_stops_and_clears_a_crash(tmp_path: Path) -> None:
    """The unit's commands, run as systemd would (its documented paths swapped for tmp):
    Type=forking, so ExecStart returns once serving, and PIDFile= names the daemon."""
    toml = _toml_from_unit_comment()
    assert 'file = "/srv/images/vm1.qcow2"' in toml
    image = tmp_path / "vm1.qcow2"
    conf = tmp_path / "vm1.toml"
    conf.write_text(toml.replace("/srv/images/vm1.qcow2", str(image)))
    subprocess.run([sys.executable, "-m", "vdisk", "create", "-f", "qcow2", str(image), "8M"],
                   check=True, capture_output=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    unit = _unit_lines("vm1", run_dir, conf)
    assert unit["Type"] == "forking" and unit["ConditionPathExists"] == str(conf)
    env = {**os.environ, "RUNTIME_DIRECTORY": str(run_dir)}
    start = _systemd_words(unit["ExecStart"], env)
    stop_post = _systemd_words(unit["ExecStopPost"], env)
    pidfile = Path(unit["PIDFile"])
    mnt = run_dir / "mnt"
    pid = 0
    try:
        for crash in (True, False):  # the second start finds the crash's stale pid file
            res = subprocess.run(start, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            pid = int(pidfile.read_text())
            assert stat.S_ISSOCK((run_dir / "qmp.sock").stat().st_mode)
            assert (mnt / "vm1").stat().st_size == 8 << 20
            os.kill(pid, signal.SIGKILL if crash else signal.SIGTERM)
            wait_gone(pid)
            assert is_mounted(mnt) == crash  # a clean stop unmounts; a crash leaves it dead
            assert pidfile.exists() == crash  # a clean stop removes it
            subprocess.run(stop_post, env=env, check=True, timeout=20)
            assert not is_mounted(mnt)
    finally:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        force_unmount(mnt)
