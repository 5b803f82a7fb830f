"""Detach `vdisk serve --daemonize` from its caller, with a readiness pipe.

Called before trio starts and before any image is opened. The caller forks; the child
starts a new session (setsid) and forks again, so the daemon is no session leader and
can never get a controlling terminal. The intermediate child reports the daemon's pid
over a pipe ("PID n") before it exits; the daemon then reports "OK" once the mount is live and QMP answers, or "ERR message" if start-up failed.
The caller waits for that (at most `timeout` seconds; on timeout it stops the daemon
with SIGTERM) and exits 0 or with the daemon's one-line error.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

from vdisk.errors import VdiskError

READY_TIMEOUT = 60.0


class Readiness:
    """The daemon's end of the readiness pipe."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def _send(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            pass  # the caller is gone (killed): nothing to tell

    def ready(self) -> None:
        self._send("OK")
        self.close()

    def failed(self, message: str) -> None:
        self._send(f"ERR {message}")
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def pending(self) -> bool:
        return self.fd is not None


def _read_reports(fd: int, timeout: float) -> tuple[list[str], bool]:
    """Lines from the pipe until EOF or "OK"/"ERR"; (lines, timed_out)."""
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return buf.decode("utf-8", "replace").splitlines(), True
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        buf += chunk
        lines = buf.decode("utf-8", "replace").splitlines()
        if not chunk or any(line == "OK" or line.startswith("ERR ") for line in lines):
            return lines, False


def _wait_for_daemon(fd: int, child: int, timeout: float) -> None:
    """The caller's side: return once the daemon is ready, else raise VdiskError."""
    try:
        try:
            os.waitpid(child, 0)  # the intermediate child exits at once, "PID n" written
        except ChildProcessError:
            pass
        lines, timed_out = _read_reports(fd, timeout)
    finally:
        os.close(fd)
    pid = next((int(x[4:]) for x in lines if x.startswith("PID ") and x[4:].isdigit()), None)
    for line in lines:
        if line == "OK":
            return
        if line.startswith("ERR "):
            raise VdiskError(line[4:])
    if timed_out:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        raise VdiskError(
            f"the daemon (pid {pid}) was not ready after {timeout:g} s; stopped it (see its log)"
        )
    raise VdiskError("the daemon exited during start-up without a report (see its log)")


def daemonize(stdio_fd: int | None, timeout: float = READY_TIMEOUT) -> Readiness | None:
    """Fork off the daemon. Returns None in the caller (once the daemon is ready; raises
    VdiskError with its error otherwise) and a Readiness in the daemon, which runs
    detached: new session, cwd /, stdin /dev/null, stdout/stderr on stdio_fd (the log
    file) or /dev/null."""
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    child = os.fork()
    if child:
        os.close(wfd)
        _wait_for_daemon(rfd, child, timeout)
        return None
    try:
        os.close(rfd)
        os.setsid()
        daemon = os.fork()
        if daemon:
            os.write(wfd, f"PID {daemon}\n".encode())
            os._exit(0)
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        out = stdio_fd if stdio_fd is not None else devnull
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(devnull)
        return Readiness(wfd)
    except BaseException:
        os._exit(1)  # never return into the caller's code from a half-made child
