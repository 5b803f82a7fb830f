"""QMP for tests and scripts: a session over qemu.qmp's legacy (synchronous) client that
collects events, a one-shot command, and pipelined commands over a plain socket."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

CMD_TIMEOUT = 60.0  # seconds a command's answer may take


class QMP:
    """A long-lived negotiated session; events it reads are kept in `events` until a
    wait takes them."""

    def __init__(self, sock: str | os.PathLike[str], timeout: float | None = CMD_TIMEOUT
                 ) -> None:
        self.q = QEMUMonitorProtocol(os.fspath(sock))
        self.q.settimeout(timeout)
        self.q.connect()
        self.events: list[dict[str, Any]] = []

    def cmd(self, name: str, **args: Any) -> dict[str, Any]:
        """The raw answer ({'return': ...} or {'error': ...})."""
        return self.q.cmd_raw(name, args)  # type: ignore[return-value]

    def ok(self, name: str, **args: Any) -> Any:
        """The command's return value; AssertionError if it failed."""
        r = self.cmd(name, **args)
        assert "return" in r, (name, args, r)
        return r["return"]

    def err(self, name: str, **args: Any) -> tuple[str, str]:
        """(class, desc) of the command's error; AssertionError if it succeeded."""
        r = self.cmd(name, **args)
        assert "error" in r, (name, args, r)
        return r["error"]["class"], r["error"]["desc"]

    def jobs(self) -> list[dict[str, Any]]:
        return self.ok("query-block-jobs")  # type: ignore[no-any-return]

    def job(self, device: str) -> dict[str, Any] | None:
        return next((j for j in self.jobs() if j["device"] == device), None)

    def poll_events(self) -> list[dict[str, Any]]:
        """Read the events that arrived (without waiting); they are also kept."""
        new = self.q.get_events(wait=False)
        self.events.extend(new)
        return new

    def next_event(self, *names: str, timeout: float, device: str | None = None
                   ) -> dict[str, Any] | None:
        """The first event (kept or new) named one of names (and for device, if given),
        taken out of `events`; None if none comes within timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] in names and (device is None or ev["data"].get("device") == device):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                ev = self.q.pull_event(wait=min(left, 0.5))
            except Exception:  # asyncio.TimeoutError
                ev = None
            if ev is not None:
                self.events.append(ev)

    def wait_event(self, *names: str, timeout: float = 60.0, device: str | None = None
                   ) -> dict[str, Any]:
        """Like next_event, but AssertionError if none comes in time."""
        ev = self.next_event(*names, timeout=timeout, device=device)
        if ev is None:
            raise AssertionError(f"no {names} within {timeout}s; have {self.events}")
        return ev

    def close(self) -> None:
        try:
            self.q.close()
        except Exception:  # the server may be gone already
            pass


@contextmanager
def qmp_session(sock: str | os.PathLike[str]) -> Iterator[QMP]:
    s = QMP(sock)
    try:
        yield s
    finally:
        s.close()


def qmp_command(sock: str | os.PathLike[str], command: str, **args: Any) -> Any:
    """Run one command on a fresh connection; its return value (qemu.qmp raises on an
    error answer). The server may close first after `quit`."""
    client = QEMUMonitorProtocol(os.fspath(sock))
    client.settimeout(CMD_TIMEOUT)
    client.connect()
    try:
        return client.cmd(command, **args)
    finally:
        try:
            client.close()
        except EOFError:  # the server closed first (expected after 'quit')
            if command != "quit":
                raise


def pipelined(sock: str | os.PathLike[str], *commands: dict[str, Any]) -> list[dict[str, Any]]:
    """Negotiate, then send commands in one write; their answers, in order."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.fspath(sock))
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
