"""What the NBD client state machine (nbd_proto) tells its caller: errors and events."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BLOCK = 32 << 20  # the largest request when the server does not say


class NbdError(Exception):
    """Base of the errors of this module."""


class ProtocolError(NbdError):
    """The server broke the protocol, or closed the connection in the middle of it."""


class Refused(NbdError):
    """The server refused the handshake; the message says why, for the user."""


@dataclass(frozen=True)
class Export:
    """What the handshake learnt about the export."""

    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = DEFAULT_MAX_BLOCK
    structured: bool = False
    meta_context: int | None = None  # the id of base:allocation, if it was selected


@dataclass(frozen=True)
class HandshakeDone:
    export: Export


@dataclass(frozen=True)
class ReadDone:
    handle: int
    data: bytes | memoryview  # the caller's buffer, if the read was given one


@dataclass(frozen=True)
class StatusDone:
    """The base:allocation extents from the request's offset: (length, NBD_STATE_*)."""

    handle: int
    extents: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class CommandFailed:
    """The server answered the request with an error (an errno value of the protocol)."""

    handle: int
    error: int
    message: str = ""


Event = HandshakeDone | ReadDone | StatusDone | CommandFailed
