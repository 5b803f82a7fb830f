"""Logging for `vdisk serve`: stderr (default), a file, or journald's native protocol.

stderr and file lines carry a timestamp, the pid and the level. The file is opened in
append mode and reopened by `Logs.reopen()` (the daemon calls it on SIGUSR1, for
logrotate). The journald handler sends one datagram per record to
/run/systemd/journal/socket (KEY=value lines; values with a newline use the binary
form: KEY, newline, 64-bit little-endian length, value, newline).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from dataclasses import dataclass, field
from typing import TextIO

from vdisk.errors import VdiskError

LEVELS = ("debug", "info", "warning", "error")
DESTINATIONS = ("stderr", "journald")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
LOGGERS = ("vdisk", "control", "pyfuse3")
FORMAT = "%(asctime)s.%(msecs)03d vdisk[%(process)d] %(levelname)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
MAX_DATAGRAM_MESSAGE = 48 << 10  # longer messages are cut (no memfd passing)

# syslog priorities (journald's PRIORITY field)
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}

log = logging.getLogger("vdisk.log")


def journal_field(key: str, value: str) -> bytes:
    """One field of the journald native protocol."""
    data = value.encode("utf-8", "replace")
    name = key.encode("ascii")
    if b"\n" in data:
        return name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name + b"=" + data + b"\n"


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels in between round down)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class JournalHandler(logging.Handler):
    """Send records to journald over its native datagram protocol."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = "vdisk") -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def payload(self, record: logging.LogRecord) -> bytes:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        if len(message) > MAX_DATAGRAM_MESSAGE:
            message = message[:MAX_DATAGRAM_MESSAGE] + " [truncated]"
        fields = [
            ("MESSAGE", message),
            ("PRIORITY", str(priority(record.levelno))),
            ("SYSLOG_IDENTIFIER", self.identifier),
            ("LOGGER", record.name),
            ("CODE_FILE", record.pathname),
            ("CODE_LINE", str(record.lineno)),
            ("CODE_FUNC", record.funcName),
        ]
        return b"".join(journal_field(k, v) for k, v in fields)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.sendto(self.payload(record), self.path)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


class ReopenableFileHandler(logging.StreamHandler[TextIO]):
    """Append to a file; reopen() starts a new file at the same path (after logrotate)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        super().__init__(self._open())

    def _open(self) -> TextIO:
        try:
            return open(self.path, "a", encoding="utf-8", errors="replace", buffering=1)
        except OSError as e:
            raise VdiskError(f"{self.path}: cannot open the log file: {e.strerror}") from None

    def reopen(self) -> None:
        self.acquire()
        try:
            new = self._open()
            old, self.stream = self.stream, new
            old.close()
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            self.stream.close()
        finally:
            self.release()
        super().close()


@dataclass
class Logs:
    """The configured logging; `file` is set when logging to a file."""

    handler: logging.Handler
    file: ReopenableFileHandler | None = None
    notes: list[str] = field(default_factory=list)
    redirect_std: bool = False  # stdout/stderr point at the log file (a daemon's)

    def reopen(self) -> None:
        """Reopen the log file (SIGUSR1); also re-point stdout/stderr if they were on it."""
        if self.file is None:
            return
        self.file.reopen()
        if self.redirect_std:
            for fd in (1, 2):
                os.dup2(self.file.stream.fileno(), fd)
        log.info("log file reopened")

    def fileno(self) -> int | None:
        """The log file's descriptor (for a daemon's stdout/stderr), if logging to a file."""
        return self.file.stream.fileno() if self.file is not None else None


def setup_logging(level: str = "info", dest: str = "stderr", file: str | None = None,
                  journal_socket: str = JOURNAL_SOCKET) -> Logs:
    """Route the vdisk, control and pyfuse3 loggers to one handler; returns it."""
    notes = []
    file_handler = None
    handler: logging.Handler
    if file is not None:
        handler = file_handler = ReopenableFileHandler(file)
    elif dest == "journald" and os.path.exists(journal_socket):
        handler = JournalHandler(journal_socket)
    else:
        if dest == "journald":
            notes.append(f"{journal_socket} does not exist: logging to stderr instead of journald")
        handler = logging.StreamHandler(sys.stderr)
    if not isinstance(handler, JournalHandler):
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in logger.handlers:
            if old is not handler:
                old.close()
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(level.upper() if name != "pyfuse3" or level == "debug" else "WARNING")
    for note in notes:
        log.warning("%s", note)
    return Logs(handler, file_handler, notes)
