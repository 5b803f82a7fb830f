"""NBD servers for the tests: qemu-nbd and nbdkit as subprocesses, stopped by stop().

    srv = qemu_nbd(image, "raw", sock=tmp_path / "nbd.sock")   # ready once it listens
    ...
    srv.stop()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.helpers.polling import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def unix_listening(path: Path) -> bool:
    """A server accepts connections on the UNIX socket path (not just: the file exists;
    a killed server leaves its socket behind)."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


class Server:
    """A server process, stopped (and waited for) by stop()."""

    def __init__(self, argv: list[str], ready: Callable[[], bool], log: Path,
                 pidfile: Path | None = None) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        self.pidfile = pidfile
        deadline = time.monotonic() + 20
        while not ready():
            if pidfile is None and self.proc.poll() is not None:
                raise AssertionError(f"{argv[0]} exited: {log.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{argv[0]} not ready: {log.read_text()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        if self.pidfile is not None:  # a daemon (nbd-server forks)
            return int(self.pidfile.read_text())
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM) -> None:
        pid = self.pid
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"{self.proc.args[0]} ignored SIGTERM") from None
        if self.pidfile is not None:
            wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10)


def qemu_nbd(path: Path, fmt: str, *, sock: Path | None = None, port: int | None = None,
             export: str = "exp") -> Server:
    where = ["-k", str(sock)] if sock else ["-b", "127.0.0.1", "-p", str(port)]
    argv = ["qemu-nbd", "-f", fmt, "-r", "-t", "--shared=8", "-x", export, *where, str(path)]
    if sock:
        sock.unlink(missing_ok=True)  # left by a qemu-nbd killed before
    ready = (lambda: unix_listening(sock)) if sock else (lambda: listening(port or 0))
    return Server(argv, ready, path.with_suffix(".qemu-nbd.log"))


def nbdkit(path: Path, tmp: Path, *args: str) -> tuple[Server, Path]:
    sock, pidfile = tmp / "nbdkit.sock", tmp / "nbdkit.pid"
    pidfile.unlink(missing_ok=True)  # the ready sign: written once nbdkit listens
    sock.unlink(missing_ok=True)  # left by an nbdkit stopped before
    argv = ["nbdkit", "-f", "-U", str(sock), "-P", str(pidfile), *args]
    argv[argv.index("PATH")] = f"file={path}"
    return Server(argv, pidfile.exists, tmp / "nbdkit.log"), sock
