"""Helpers for the block stream tests: chains built with qemu-img/qemu-io, a QMP session."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from vdisk.service.mounts import force_unmount, is_mounted

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


HERE = Path(__file__).resolve().parent


def run(*cmd: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def create(path: Path, size: int | str, backing: Path | str | None = None,
           backing_fmt: str = "qcow2", fmt: str = "qcow2", opts: str = "") -> Path:
    args: list[str | Path] = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt]
    if opts:
        args += ["-o", opts]
    run(*args, path, str(size))
    return path


def qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    out = run(*args, path)
    assert "error" not in out.stdout.lower() and "fail" not in out.stdout.lower(), out.stdout


def image_map(path: Path) -> list[dict[str, Any]]:
    return json.loads(run("qemu-img", "map", "-U", "--output=json", path).stdout)


def info(path: Path) -> dict[str, Any]:
    return json.loads(run("qemu-img", "info", "-U", "--output=json", path).stdout)


def check_clean(path: Path) -> None:
    out = run("qemu-img", "check", "-U", path, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "leak" not in out.stdout, out.stdout


def to_raw(path: Path, dest: Path) -> Path:
    run("qemu-img", "convert", "-U", "-O", "raw", path, dest)
    return dest


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def three_layers(d: Path, size: int = 64 * MiB) -> tuple[Path, Path, Path]:
    """base <- mid <- top with data in every layer; mid zeroes a range over base data;
    top has unaligned writes (one over mid data, one over unallocated space)."""
    base = create(d / "base.qcow2", size)
    qemu_io(base, "write -P 0x11 0 16M", "write -P 0x12 40M 4M", f"write -P 0x13 {size - MiB} 1M")
    mid = create(d / "mid.qcow2", size, "base.qcow2")
    qemu_io(mid, "write -P 0x21 8M 4M", "write -z 1M 1M", "write -P 0x22 20M 4M",
            "write -z 41M 64K")
    top = create(d / "top.qcow2", size, "mid.qcow2")
    qemu_io(top, "write -P 0x31 3146962 100000", "write -P 0x32 22020173 5000",
            "write -P 0x33 52428877 4097")
    return base, mid, top


def depth_of(entries: list[dict[str, Any]], offset: int) -> tuple[int, bool, bool]:
    """(depth, data, zero) of the map entry covering offset."""
    for e in entries:
        if e["start"] <= offset < e["start"] + e["length"]:
            return e["depth"], e["data"], e["zero"]
    raise AssertionError(f"offset {offset} not in map")


class QMP:
    """A long-lived qemu.qmp legacy session that collects events."""

    def __init__(self, sock: Path) -> None:
        self.q = QEMUMonitorProtocol(str(sock))
        self.q.connect()
        self.events: list[dict[str, Any]] = []

    def cmd(self, name: str, **args: Any) -> dict[str, Any]:
        """The raw answer ({'return': ...} or {'error': ...})."""
        return self.q.cmd_raw(name, args)  # type: ignore[return-value]

    def ok(self, name: str, **args: Any) -> Any:
        r = self.cmd(name, **args)
        assert "return" in r, (name, args, r)
        return r["return"]

    def err(self, name: str, **args: Any) -> tuple[str, str]:
        r = self.cmd(name, **args)
        assert "error" in r, (name, args, r)
        return r["error"]["class"], r["error"]["desc"]

    def jobs(self) -> list[dict[str, Any]]:
        return self.ok("query-block-jobs")  # type: ignore[no-any-return]

    def job(self, device: str) -> dict[str, Any] | None:
        return next((j for j in self.jobs() if j["device"] == device), None)

    def wait_event(self, *names: str, timeout: float = 60.0, device: str | None = None
                   ) -> dict[str, Any]:
        """The first event (kept or new) named one of names (and for device, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] in names and (device is None or ev["data"].get("device") == device):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {names} within {timeout}s; have {self.events}")
            try:
                ev = self.q.pull_event(wait=min(left, 1.0))
            except Exception:  # asyncio.TimeoutError
                ev = None
            if ev is not None:
                self.events.append(ev)

    def close(self) -> None:
        try:
            self.q.close()
        except Exception:  # the daemon may be gone already
            pass


@contextmanager
def qmp_session(sock: Path) -> Iterator[QMP]:
    s = QMP(sock)
    try:
        yield s
    finally:
        s.close()


def wait_until(pred: Any, timeout: float = 30.0, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(step)


@contextmanager
def faulty_file(tmp_path: Path, src: Path, bad: tuple[int, int]) -> Iterator[Path]:
    """A FUSE file (tests/helpers/faulty_fs.py) with src's bytes whose reads fail with EIO in bad."""
    mnt = tmp_path / "faulty"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, str(HERE / "faulty_fs.py"), str(src), str(mnt),
                             str(bad[0]), str(bad[1])], stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: is_mounted(mnt) and (mnt / "disk").exists(), timeout=20)
        yield mnt / "disk"
    finally:
        force_unmount(mnt)
        proc.terminate()
        proc.wait(timeout=20)


def pipelined(sock: Path, *commands: dict[str, Any]) -> list[dict[str, Any]]:
    """Negotiate, then send commands in one write; their answers, in order."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        f = s.makefile("rwb")

        def answer() -> dict[str, Any]:
            while True:
                msg = json.loads(f.readline())
                if "event" not in msg:
                    return msg  # type: ignore[no-any-return]

        answer()  # greeting
        f.write(b'{"execute": "qmp_capabilities"}\r\n')
        f.flush()
        answer()
        f.write(b"".join(json.dumps(c).encode() + b"\r\n" for c in commands))
        f.flush()
        return [answer() for _ in commands]
