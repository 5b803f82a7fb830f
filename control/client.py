"""A small async (trio) QMP client: connect, negotiate, execute, read events."""

from __future__ import annotations

import collections
import itertools
import json
import os
import socket
from typing import Any

import trio

from control.errors import QMPError
from control.protocol import JSONSplitter, decode_message
from vdisk.errors import VdiskError

MAX_SERVER_MESSAGE = 64 << 20


class QMPConnectionError(VdiskError):
    """The socket could not be reached, or the server broke the protocol or hung up."""


class QMPClient:
    """One QMP connection. Use `await QMPClient.connect(path)` (negotiates by default)."""

    def __init__(self, stream: trio.abc.Stream, name: str = "QMP socket") -> None:
        self._stream = stream
        self._name = name
        self._splitter = JSONSplitter(MAX_SERVER_MESSAGE)
        self._messages: collections.deque[dict[str, Any]] = collections.deque()
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        self._ids = itertools.count(1)
        self.greeting: dict[str, Any] = {}

    @classmethod
    async def connect(cls, path: str, *, negotiate: bool = True) -> QMPClient:
        try:
            stream = await trio.open_unix_socket(path)
        except OSError as e:
            raise QMPConnectionError(f"{path}: {e.strerror or e}") from e
        client = cls(stream, path)
        try:
            greeting = await client._read_message()
            if not isinstance(greeting.get("QMP"), dict):
                raise QMPConnectionError(f"{path}: not a QMP server (no greeting)")
            client.greeting = greeting
            if negotiate:
                await client.execute("qmp_capabilities")
        except BaseException:
            await client.aclose()
            raise
        return client

    async def __aenter__(self) -> QMPClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def _read_message(self) -> dict[str, Any]:
        while not self._messages:
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise QMPConnectionError(f"{self._name}: connection lost") from e
            if not data:
                raise QMPConnectionError(f"{self._name}: the server closed the connection")
            for piece in self._splitter.feed(data):
                if not isinstance(piece, bytes):
                    raise QMPConnectionError(f"{self._name}: bad data from server: {piece.desc}")
                try:
                    msg = decode_message(piece)
                except QMPError as e:
                    raise QMPConnectionError(f"{self._name}: bad data: {e.desc}") from None
                if not isinstance(msg, dict):
                    raise QMPConnectionError(f"{self._name}: server sent a non-object")
                self._messages.append(msg)
        return self._messages.popleft()

    async def send_raw(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, ensure_ascii=True, separators=(",", ":")) + "\r\n"
        try:
            await self._stream.send_all(data.encode("ascii"))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise QMPConnectionError(f"{self._name}: connection lost") from e

    async def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a command; return its "return" value or raise QMPError(class, desc).

        Events read meanwhile are kept for `next_event`.
        """
        req_id = f"vdisk-{next(self._ids)}"
        message: dict[str, Any] = {"execute": name, "id": req_id}
        if arguments:
            message["arguments"] = arguments
        await self.send_raw(message)
        while True:
            msg = await self._read_message()
            if "event" in msg:
                self._events.append(msg)
                continue
            if msg.get("id") != req_id:
                continue  # an answer to someone else's id: not ours (spec: drop it)
            if "error" in msg:
                err = msg["error"]
                raise QMPError(str(err.get("class", "?")), str(err.get("desc", "")))
            return msg.get("return")

    async def next_event(self) -> dict[str, Any]:
        """The next event (already received ones first)."""
        while not self._events:
            msg = await self._read_message()
            if "event" in msg:
                self._events.append(msg)
        return self._events.popleft()

    def pending_events(self) -> list[dict[str, Any]]:
        """Events already received, without waiting; clears them."""
        events = list(self._events)
        self._events.clear()
        return events


def qmp_listening(path: str | os.PathLike[str], timeout: float = 5.0) -> bool:
    """True once a server accepts a connection on the UNIX socket at path and sends its
    greeting (a stale socket file left by a killed daemon refuses). The greeting is read so
    that the server does not log a lost connection."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
        sock.recv(4096)
    except OSError:
        return False
    finally:
        sock.close()
    return True
