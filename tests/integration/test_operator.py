"""Operator features of `vdisk serve`: --daemonize with a readiness pipe, --pidfile,
--config (TOML), logging (stderr, --log-file, journald's native protocol), help examples.

Daemons started here are found by their pid file and always stopped (SIGTERM, then
SIGKILL) with their mount cleared, also when a test fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.commands import qemu_img, qemu_io, vdisk, vdisk_cmd
from tests.helpers.daemon import force_unmount, is_mounted, wait_gone
from tests.helpers.locks import locked_bytes
from tests.helpers.qmp import qmp_command
from vdisk.service.logsetup import JournalHandler, setup_logging
from vdisk.service.pidfile import process_alive

MiB = 1 << 20


def _vdisk(*args: str | os.PathLike[str], timeout: float = 40) -> subprocess.CompletedProcess[str]:
    return vdisk(*args, check=False, timeout=timeout)


def _chain(tmp_path: Path) -> Path:
    """base.qcow2 (0x21 everywhere) <- top.qcow2 (0x77 in the second MiB)."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 0x21 0 4M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd=tmp_path)
    qemu_io(top, "write -P 0x77 1M 1M")
    return top


class Daemons:
    """Pid files and mounts to clean up."""

    def __init__(self) -> None:
        self.pidfiles: list[Path] = []
        self.mounts: list[Path] = []

    def track(self, pidfile: Path, mount: Path) -> None:
        self.pidfiles.append(pidfile)
        self.mounts.append(mount)

    def cleanup(self) -> None:
        for pidfile in self.pidfiles:
            try:
                pid = int(pidfile.read_text())
            except (OSError, ValueError):
                continue
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                try:
                    wait_gone(pid, 20)
                    break
                except AssertionError:
                    continue
        for mount in self.mounts:
            force_unmount(mount)


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    d = Daemons()
    try:
        yield d
    finally:
        d.cleanup()


def _paths(tmp_path: Path, name: str = "d") -> tuple[Path, Path, Path, Path]:
    return (tmp_path / f"{name}.mnt", tmp_path / f"{name}.sock", tmp_path / f"{name}.pid",
            tmp_path / f"{name}.log")


def test_daemonize_serves_logs_and_stops_on_sigterm(tmp_path: Path, daemons: Daemons) -> None:
    top = _chain(tmp_path)
    mnt, sock, pidfile, logfile = _paths(tmp_path)
    daemons.track(pidfile, mnt)
    res = _vdisk("serve", "--daemonize", "--pidfile", pidfile, "--log-file", logfile,
                 "--mount", mnt, "--qmp", sock, "--drive", f"id=d0,file={top},copy-on-read=off")
    # the parent returned: the daemon is ready, pid file written, mount live, QMP answers
    assert res.returncode == 0, res.stderr
    assert res.stderr == "" and res.stdout == ""
    pid = int(pidfile.read_text())
    assert process_alive(pid) and is_mounted(mnt) and locked_bytes(top)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"  # detached
    assert os.getsid(pid) != os.getsid(0)
    blocks = qmp_command(sock, "query-block")
    assert isinstance(blocks, list) and blocks[0]["device"] == "d0"
    qemu_img("compare", "-U", "-f", "raw", "-F", "qcow2", mnt / "d0", top)
    # a job, logged at start and end with its figures
    assert qmp_command(sock, "block-stream", device="d0") == {}
    deadline = time.monotonic() + 20
    while "job d0: completed" not in logfile.read_text():
        assert time.monotonic() < deadline, logfile.read_text()
        time.sleep(0.05)
    # SIGUSR1 reopens the log file (logrotate): new lines go to a new file
    logfile.rename(tmp_path / "d.log.1")
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not logfile.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert not is_mounted(mnt) and not pidfile.exists() and not sock.exists()
    assert locked_bytes(top) == []
    qemu_img("check", top)
    assert "backing file" not in qemu_img("info", top)  # the stream completed
    old, new = (tmp_path / "d.log.1").read_text(), logfile.read_text()
    for needed in ("INFO", f"serving d0 at {mnt}", f"QMP at {sock}",
                   f"drive d0: {top} (qcow2, {4 * MiB} bytes, 1 backing image",
                   "QMP client pid", " connected", " disconnected",
                   "job d0: stream of drive d0 started (4194304 bytes",
                   f"job d0: completed at {4 * MiB}/{4 * MiB} bytes"):
        assert needed in old, (needed, old)
    assert "WARNING" not in old and "dropped" not in old, old
    for needed in ("log file reopened", "SIGTERM received: stopping", "stopped"):
        assert needed in new, (needed, new)
    assert "Traceback" not in old + new


@pytest.mark.slow
def test_daemonize_startup_errors(tmp_path: Path, daemons: Daemons) -> None:
    top = _chain(tmp_path)
    mnt, sock, pidfile, logfile = _paths(tmp_path)
    daemons.track(pidfile, mnt)
    missing = tmp_path / "nothere.qcow2"
    res = _vdisk("serve", "--daemonize", "--pidfile", pidfile, "--log-file", logfile,
                 "--mount", mnt, "--qmp", sock, "--drive", f"id=d0,file={missing}")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith("vdisk: ") and str(missing) in lines[0]
    assert not is_mounted(mnt) and not pidfile.exists() and not sock.exists()
    assert str(missing) in logfile.read_text()  # the daemon logged it too
    # an error found once the mount is live (the QMP socket): undone before reporting
    nodir = tmp_path / "nodir" / "q.sock"
    res = _vdisk("serve", "--daemonize", "--pidfile", pidfile, "--mount", mnt, "--qmp", nodir,
                 "--drive", f"id=d0,file={top}")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "nodir" in lines[0], res.stderr
    assert not is_mounted(mnt) and not pidfile.exists() and locked_bytes(top) == []
    # a daemon that is not ready in time is stopped, and the caller says so
    res = _vdisk("serve", "--daemonize", "--ready-timeout", "0.001", "--pidfile", pidfile,
                 "--mount", mnt, "--qmp", sock, "--drive", f"id=d0,file={top}")
    assert res.returncode == 1 and "was not ready after" in res.stderr, res.stderr
    wait_gone(int(res.stderr.split("(pid ")[1].split(")")[0]))
    assert not is_mounted(mnt) and locked_bytes(top) == [] and not pidfile.exists()


@pytest.mark.slow
def test_pidfile_live_refuses_stale_replaced(tmp_path: Path, daemons: Daemons) -> None:
    top = _chain(tmp_path)
    mnt, sock, pidfile, logfile = _paths(tmp_path)
    daemons.track(pidfile, mnt)
    start = ["serve", "--daemonize", "--pidfile", pidfile, "--log-file", logfile,
             "--mount", mnt, "--qmp", sock, "--drive", f"id=d0,file={top}"]
    assert _vdisk(*start).returncode == 0
    pid = int(pidfile.read_text())
    # a second daemon with the same pid file (elsewhere) is refused; the first serves on
    mnt2, sock2, _, _ = _paths(tmp_path, "other")
    res = _vdisk("serve", "--daemonize", "--pidfile", pidfile, "--mount", mnt2, "--qmp", sock2,
                 "--drive", f"id=b,file={tmp_path / 'base.qcow2'},read-only=on")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert "already running" in lines[0] and str(pid) in lines[0] and str(pidfile) in lines[0]
    assert int(pidfile.read_text()) == pid and not is_mounted(mnt2)
    assert qmp_command(sock, "quit") == {}
    wait_gone(pid)
    assert not pidfile.exists() and not is_mounted(mnt)
    # stale: a pid that is gone, then a live process that is not vdisk
    gone = subprocess.Popen(["true"])
    gone.wait()
    other = subprocess.Popen(["sleep", "30"])
    try:
        for stale in (gone.pid, other.pid):
            pidfile.write_text(f"{stale}\n")
            res = _vdisk(*start)
            assert res.returncode == 0, res.stderr
            new = int(pidfile.read_text())
            assert new not in (stale, pid) and process_alive(new)
            assert f"replaced a stale pid file (pid {stale} is not a running vdisk)" in \
                logfile.read_text()
            os.kill(new, signal.SIGTERM)
            wait_gone(new)
            assert not pidfile.exists() and not is_mounted(mnt)
    finally:
        other.kill()
        other.wait()


CONFIG = """\
mount = "cfg.mnt"
qmp = "cfg.sock"
log-level = "debug"
log-file = "cfg.log"
allow-other = false

[[drive]]
id = "top"
file = "top.qcow2"
format = "qcow2"
copy-on-read = false

[[drive]]
id = "base"
file = "base.qcow2"
read-only = true
"""


@pytest.mark.slow
def test_config_file_serves_its_drives(tmp_path: Path, daemons: Daemons) -> None:
    top = _chain(tmp_path)
    raw = tmp_path / "extra.raw"
    qemu_img("create", "-f", "raw", raw, "1M")
    conf = tmp_path / "vdisk.toml"
    conf.write_text(CONFIG)
    mnt, pidfile = tmp_path / "cfg.mnt", tmp_path / "cfg.pid"
    daemons.track(pidfile, mnt)
    # relative paths in the file are relative to its directory (not the cwd, ROOT);
    # --drive adds a drive
    res = _vdisk("serve", "--config", conf, "--daemonize", "--pidfile", pidfile,
                 "--drive", f"id=extra,file={raw},format=raw")
    assert res.returncode == 0, res.stderr
    pid = int(pidfile.read_text())
    blocks = qmp_command(tmp_path / "cfg.sock", "query-block")
    assert isinstance(blocks, list)
    by_id = {b["device"]: b for b in blocks}
    assert set(by_id) == {"top", "base", "extra"}
    assert by_id["base"]["inserted"]["ro"] and not by_id["top"]["inserted"]["ro"]
    assert by_id["top"]["inserted"]["file"] == str(top)
    qemu_img("compare", "-U", "-f", "raw", "-F", "qcow2", mnt / "top", top)
    qemu_img("compare", "-U", "-f", "raw", "-F", "qcow2", mnt / "base", tmp_path / "base.qcow2")
    assert (mnt / "extra").stat().st_size == MiB
    log = (tmp_path / "cfg.log").read_text()
    assert "DEBUG" in log and "copy-on-read off" in log, log  # log-level from the file
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert not is_mounted(mnt) and not pidfile.exists()
    log = (tmp_path / "cfg.log").read_text()
    # the command line overrides the file: mount and log file elsewhere, in the foreground
    mnt2 = tmp_path / "cli.mnt"
    daemons.track(pidfile, mnt2)
    proc = subprocess.Popen(vdisk_cmd("serve", "--config", str(conf), "--mount", str(mnt2),
                                      "--log-level", "warning", "--pidfile", str(pidfile)),
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert int(pidfile.read_text()) == proc.pid and is_mounted(mnt2)
        assert not is_mounted(mnt)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err == "", err
    assert not is_mounted(mnt2) and not pidfile.exists()
    assert (tmp_path / "cfg.log").read_text() == log  # --log-level warning: nothing to say


@pytest.mark.parametrize(("text", "needles"), [
    ('mount = "m"\nqmp = "q"\ncolour = "red"\n', ["colour", "unknown key"]),
    ('mount = 5\n', ["mount", "expected a string", "int"]),
    ('allow-other = "yes"\n', ["allow-other", "expected true or false"]),
    ('log-level = "loud"\n', ["log-level", "'loud'"]),
    ('[[drive]]\nfile = "x.qcow2"\n', ["[[drive]] #1", "id", "missing"]),
    ('[[drive]]\nid = "a"\nfile = "a"\n[[drive]]\nid = "b"\n', ["[[drive]] #2", "file",
                                                                  "missing"]),
    ('[[drive]]\nid = "a"\nfile = "a"\ncopy-on-read = "on"\n', ["copy-on-read",
                                                                "expected true or false"]),
    ('[[drive]]\nid = "a"\nfile = "a"\nsize = 3\n', ["[[drive]] #1", "size", "unknown key"]),
    ('[[drive]]\nid = "a/b"\nfile = "a"\n', ["id", "file name"]),
    ('[drive]\nid = "a"\n', ["drive", "expected an array"]),
    ('mount = "m\n', ["not valid TOML", "line 1"]),
])
def test_config_errors_are_one_line(tmp_path: Path, text: str, needles: list[str]) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    res = _vdisk("serve", "--config", conf, "--mount", tmp_path / "m", "--qmp", tmp_path / "q")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"vdisk: {conf}: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "m").exists()


def test_config_missing_file_and_no_drives(tmp_path: Path) -> None:
    res = _vdisk("serve", "--config", tmp_path / "none.toml")
    assert res.returncode == 1 and res.stderr.strip() == \
        f"vdisk: {tmp_path / 'none.toml'}: cannot read the config file: No such file or directory"
    conf = tmp_path / "empty.toml"
    conf.write_text('mount = "m"\n')
    res = _vdisk("serve", "--config", conf)
    assert res.returncode == 1 and "at least one --drive" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def _parse_journal(payload: bytes) -> dict[str, str]:
    """An independent decoder of journald's native datagram format."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(payload):
        nl = payload.index(b"\n", i)
        line = payload[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", payload[nl + 1:nl + 9])
            value = payload[nl + 9:nl + 9 + size]
            assert payload[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
        assert key.decode().replace("_", "").isalnum() and key.upper() == key
        fields[key.decode()] = value.decode()
    return fields


def test_journald_handler_sends_native_datagrams(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    handler = JournalHandler(path)
    logger = logging.getLogger("vdisk.test-journal")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.warning("drive %s: %d bytes", "d0", 42)
        one = _parse_journal(server.recv(65536))
        assert one["MESSAGE"] == "drive d0: 42 bytes"
        assert one["PRIORITY"] == "4" and one["SYSLOG_IDENTIFIER"] == "vdisk"
        assert one["LOGGER"] == "vdisk.test-journal" and one["CODE_FUNC"].startswith("test_")
        logger.error("two\nlines = with equals")
        two = _parse_journal(server.recv(65536))
        assert two["MESSAGE"] == "two\nlines = with equals" and two["PRIORITY"] == "3"
        logger.debug("quiet")
        assert _parse_journal(server.recv(65536))["PRIORITY"] == "7"
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
        three = _parse_journal(server.recv(65536))
        assert three["MESSAGE"].startswith("failed\nTraceback") and "ValueError: boom" in \
            three["MESSAGE"]
    finally:
        handler.close()
        server.close()
        logger.handlers.clear()


def test_journald_falls_back_to_stderr_with_a_note(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    logs = setup_logging("info", "journald", journal_socket=str(tmp_path / "absent.sock"))
    try:
        assert isinstance(logs.handler, logging.StreamHandler)
        assert logs.notes and "absent.sock" in logs.notes[0]
    finally:
        for name in ("vdisk", "control", "pyfuse3"):
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_help_texts_have_examples() -> None:
    from vdisk.cli import build_parser

    parser = build_parser()
    assert "examples:" in parser.format_help() and "vdisk serve --daemonize" in \
        parser.format_help()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = sub.choices
    assert {"serve", "qmp", "jobs", "info", "map", "check", "create", "stream"} <= set(commands)
    for name, p in commands.items():
        text = p.format_help()
        assert "examples:" in text and f"vdisk {name}" in text.split("examples:")[1], name
    serve_help = commands["serve"].format_help()
    for option in ("--daemonize", "--pidfile", "--config", "--log-file", "--log {stderr,journald}",
                   "--log-level"):
        assert option in serve_help, option
