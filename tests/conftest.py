"""Session-wide set-up and checks of the whole suite.

* The loop guard is on for the session, in "raise" mode: in this process
  (vdisk.block.loop_guard.install) and, through VDISK_LOOP_GUARD and
  VDISK_LOOP_GUARD_LOG in the environment, in every daemon the tests start. Each time it
  fires, it appends the stack to the session's log file.
* Every process the suite starts carries VDISK_TEST_SESSION=<token> in its environment
  (tests.helpers.leftovers), so that it can be told from other runs on the machine.
* A test errors (at its teardown) if, once its own fixtures are torn down, it left
  behind what was not there when it started:
  - a mount at or below the session's temporary directories (pytest's basetemp), or a
    fuse.vdisk mount of one of the session's daemons elsewhere;
  - a loop device on a file there;
  - a daemon (vdisk, qemu-storage-daemon, qemu-nbd, qemu-io, the faulty FUSE file,
    torture or bench) started by the session;
  what it left is cleaned up. A module's fixtures (a daemon shared by its tests) count
  at the end of the session.
* At the end of the session it fails (an error at the teardown of the last test) if
  anything of the above is left (cleaned up too), if a test left something, or if the
  loop guard's log is not empty (it is printed).
* Tests marked `root` are skipped when not running as root.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import leftovers
from vdisk.block import loop_guard

TOKEN = uuid.uuid4().hex
SESSION_DIR = Path(tempfile.gettempdir())  # set in pytest_configure
_roots: list[Path] = []  # where the session's files are: mounts and loops there are ours
_left_by: dict[str, str] = {}  # what a test left behind -> the test
GRACE = 5.0  # seconds a test's daemons get to finish exiting after it


def guard_log() -> Path:
    return SESSION_DIR / "loop-guard.log"


def pytest_configure(config: pytest.Config) -> None:
    global SESSION_DIR
    SESSION_DIR = Path(tempfile.mkdtemp(prefix="vdisk-tests-"))
    guard_log().touch()
    os.environ[leftovers.SESSION_ENV] = TOKEN
    os.environ[loop_guard.ENV_MODE] = "raise"
    os.environ[loop_guard.ENV_LOG] = str(guard_log())
    loop_guard.install("raise")


def pytest_unconfigure(config: pytest.Config) -> None:
    if not leftovers.mounts_under(SESSION_DIR) and not guard_log().read_text().strip():
        shutil.rmtree(SESSION_DIR, ignore_errors=True)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"loop guard: raise, log {guard_log()}"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (marked root)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def _found() -> dict[str, str]:
    """What is left now: key ('mount P', 'loop D', 'pid N') -> description."""
    found: dict[str, str] = {}
    mounts = leftovers.mounts()
    for m in mounts:
        if any(leftovers.under(m.point, r) for r in _roots):
            found[f"mount {m.point}"] = f"mount {m.point} ({m.fstype})"
    for dev, back in leftovers.loops():
        if any(leftovers.under(back, r) for r in _roots):
            found[f"loop {dev}"] = f"loop device {dev} on {back}"
    for pid, cmd in leftovers.session_processes(TOKEN):
        found[f"pid {pid}"] = f"process {pid}: {cmd}"
        args = cmd.split()
        for m in mounts:  # a daemon's mount outside the session's directories
            if m.fstype == "fuse.vdisk" and m.point in args:
                found[f"mount {m.point}"] = f"mount {m.point} ({m.fstype}) of pid {pid}"
    return found


def _clean(found: dict[str, str]) -> None:
    """Stop the daemons, then detach the mounts and loop devices of found."""
    leftovers.kill_all([int(k.split()[1]) for k in found if k.startswith("pid ")])
    leftovers.unmount_all([k.split(" ", 1)[1] for k in found if k.startswith("mount ")])
    leftovers.detach_loops([k.split(" ", 1)[1] for k in found if k.startswith("loop ")])


@pytest.fixture(autouse=True)
def each_test_leaves_nothing_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """What a test leaves (a daemon, a mount, a loop device that was not there when it
    started, after its own fixtures are torn down) is cleaned up, and the test errors."""
    before = set(_found())
    yield
    deadline = time.monotonic() + GRACE
    while (new := {k: v for k, v in _found().items() if k not in before}) and \
            time.monotonic() < deadline:
        time.sleep(0.1)  # a daemon told to stop may still be on its way out
    if new:
        _clean(new)
        _left_by.update(dict.fromkeys(new.values(), request.node.nodeid))
        pytest.fail("left behind (now cleaned up):\n  " + "\n  ".join(new.values()),
                    pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def session_leaves_nothing_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The session-end check (see the module docstring)."""
    _roots.extend([tmp_path_factory.getbasetemp(), SESSION_DIR])
    yield
    problems = []
    if _left_by:
        problems.append("tests left these behind (cleaned up after each):")
        problems += [f"  {what}  [{test}]" for what, test in _left_by.items()]
    found = _found()
    if found:
        _clean(found)
        problems.append("the session left these behind (now cleaned up):")
        problems += [f"  {what}" for what in found.values()]
    log = guard_log().read_text(errors="replace")
    if log.strip():
        problems.append(f"the loop guard fired (a blocking call on the event-loop thread); "
                        f"{guard_log()}:\n{log}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
