"""Commands: run() for any tool, and the qemu-img, qemu-io and vdisk command lines.

qemu-img and qemu-io are the suite's oracles: images are made and checked with them, not
with the code under test. Every command gets /dev/null as stdin and a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, TypeVar

from tests.helpers import ROOT

Arg = str | os.PathLike[str] | int
Path_ = str | os.PathLike[str]
P = TypeVar("P", bound=Path_)
TIMEOUT = 300.0


class CommandFailed(AssertionError):
    """A command failed (non-zero exit, or qemu-io reporting an error); the message has
    its output. An AssertionError, so that a test fails with it."""

    def __init__(self, cmd: list[str], res: subprocess.CompletedProcess[str],
                 why: str = "") -> None:
        self.cmd = cmd
        self.returncode = res.returncode
        self.stdout = res.stdout
        self.stderr = res.stderr
        why = why or f"failed ({res.returncode})"
        super().__init__(f"{' '.join(cmd)} {why}: {res.stderr.strip()} {res.stdout.strip()}")


def run(*cmd: Arg, check: bool = True, cwd: Path_ | None = None,
        timeout: float | None = TIMEOUT, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run cmd, output captured as text; with check, CommandFailed unless it exits 0."""
    args = [str(c) for c in cmd]
    res = subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                         env=env, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise CommandFailed(args, res)
    return res


# -- qemu-img and qemu-io ---------------------------------------------------------------


def qemu_img(*args: Arg, cwd: Path_ | None = None, timeout: float | None = TIMEOUT) -> str:
    """qemu-img ARGS; its stdout."""
    return run("qemu-img", *args, cwd=cwd, timeout=timeout).stdout


def qemu_io(path: Path_, *cmds: str, fmt: str | None = None, cwd: Path_ | None = None) -> str:
    """qemu-io -c CMD... on path (format probed unless fmt); its stdout. Fails if qemu-io
    exits non-zero or reports an error or a failed pattern check."""
    args: list[Arg] = ["qemu-io"] + (["-f", fmt] if fmt else [])
    for c in cmds:
        args += ["-c", c]
    res = run(*args, path, cwd=cwd)
    if "error" in res.stdout.lower() or "fail" in res.stdout.lower():
        raise CommandFailed([str(a) for a in (*args, path)], res, "reported an error")
    return res.stdout


def qemu_info(path: Path_, *extra: str, cwd: Path_ | None = None) -> Any:
    """qemu-img info --output=json [EXTRA] path, parsed (a list with --backing-chain)."""
    return json.loads(qemu_img("info", "--output=json", *extra, path, cwd=cwd))


def qemu_map(path: Path_, *extra: str, cwd: Path_ | None = None) -> list[dict[str, Any]]:
    """qemu-img map --output=json [EXTRA] path, parsed."""
    entries: list[dict[str, Any]] = json.loads(qemu_img("map", "--output=json", *extra, path,
                                                         cwd=cwd))
    return entries


def qemu_check(path: Path_, *extra: str) -> tuple[int, dict[str, Any]]:
    """qemu-img check --output=json [EXTRA] path: (exit status, the parsed report).
    Exit status 0: clean; 2: corrupt; 3: leaks only."""
    res = run("qemu-img", "check", "--output=json", *extra, path, check=False)
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else {}


def assert_clean(path: Path_, *extra: str, leaks_ok: bool = False) -> None:
    """qemu-img check finds no corruption, and no leak unless leaks_ok."""
    rc, out = qemu_check(path, *extra)
    assert rc in ((0, 3) if leaks_ok else (0,)), (rc, out)
    assert out.get("corruptions", 0) == 0, out
    if not leaks_ok:
        assert out.get("leaks", 0) == 0, out


def check_clean(path: Path_) -> None:
    """No corruption and no leak, checked without taking the image's locks (-U)."""
    assert_clean(path, "-U")


def to_raw(path: Path_, dest: P, *extra: str) -> P:
    """The guest view of an image (and its chain) as a raw file, by qemu-img convert."""
    qemu_img("convert", "-U", *extra, "-O", "raw", path, dest)
    return dest


def guest_view(path: Path_, scratch: Path_, *extra: str) -> bytes:
    """The guest view of an image (and its chain) as qemu-img convert -O raw gives it,
    through a temporary file in the directory scratch. extra: more convert options
    (-l snapshot.name=s1)."""
    out = os.path.join(scratch, f"conv-{os.getpid()}-{abs(hash(os.fspath(path)))}.raw")
    to_raw(path, out, *extra)
    try:
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


# -- vdisk --------------------------------------------------------------------------------


def vdisk_cmd(*args: Arg) -> list[str]:
    """The command line of `vdisk ARGS` (python -m vdisk, with this interpreter)."""
    return [sys.executable, "-m", "vdisk", *map(str, args)]


def vdisk(*args: Arg, check: bool = True, cwd: Path_ | None = ROOT,
          timeout: float | None = 120.0, env: dict[str, str] | None = None,
          ) -> subprocess.CompletedProcess[str]:
    """Run `vdisk ARGS` to completion; with check, CommandFailed unless it exits 0."""
    return run(*vdisk_cmd(*args), check=check, cwd=cwd, timeout=timeout, env=env)
