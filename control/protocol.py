"""The QMP wire protocol as a sans-IO state machine (no sockets, no trio).

`Connection.receive_data(bytes)` turns raw client input into `Request` and `InputError`
items, in input order; the `send_*` methods turn answers, events and the greeting into the
bytes to write. The caller (control.server) moves the bytes and runs the commands, one
request of a client after the other, asking `Connection.admit(request)` first.

Framing: a client message is one JSON object; messages may be split across reads, several
may come in one read, with or without whitespace between them. `JSONSplitter` finds where
each top-level value ends by tracking brackets and strings, so a partial message just waits
for more input. Like QEMU, an ASCII control character other than TAB, CR and LF outside a
string (or any control character inside one) drops the partial message and is answered with
a parse error: clients use it to resynchronise.

Oversized input: a message longer than `max_message_size` bytes is answered with a
GenericError and the connection is then closed (`Connection.broken`): after a cut in the
middle of a large value there is no reliable place to resume parsing.

The server writes each message as compact ASCII JSON followed by CRLF. QEMU's extension
of 'single-quoted' strings is not supported (standard JSON only).
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from control.errors import COMMAND_NOT_FOUND, QMPError, generic

DEFAULT_MAX_MESSAGE_SIZE = 1 << 20
CAPABILITIES_COMMAND = "qmp_capabilities"


class _NoId:
    """The type of NO_ID: the request carried no "id" member (distinct from "id": null)."""

    _instance: _NoId | None = None

    def __new__(cls) -> _NoId:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_ID"

    def __bool__(self) -> bool:
        return False


NO_ID: Any = _NoId()


@dataclass(frozen=True)
class Request:
    """A well-formed command request; `arguments` is not yet checked against a schema."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: Any = NO_ID


@dataclass(frozen=True)
class InputError:
    """Bad input to answer with `error` (carrying the request's id when it could be read).

    `fatal` means the connection must be closed after the answer is written.
    """

    error: QMPError
    id: Any = NO_ID
    fatal: bool = False


@dataclass(frozen=True)
class Event:
    """An asynchronous event; the timestamp is taken when it is emitted."""

    name: str
    data: dict[str, Any]
    seconds: int
    microseconds: int


class State(enum.Enum):
    NEGOTIATION = "negotiation"  # only qmp_capabilities is allowed, no events
    COMMAND = "command"  # everything but qmp_capabilities, events are delivered


# --- framing --------------------------------------------------------------------------

_WHITESPACE = b" \t\r\n"
_CONTROL = b"\x00-\x08\x0b\x0c\x0e-\x1f"
_OUTSIDE_STRING = re.compile(rb'["{}\[\]' + _CONTROL + rb"]")
_INSIDE_STRING = re.compile(rb'["\\\x00-\x1f]')
_SCALAR_END = re.compile(rb'[ \t\r\n"{}\[\]' + _CONTROL + rb"]")


@dataclass(frozen=True)
class _Broken:
    desc: str
    fatal: bool = False


class JSONSplitter:
    """Cuts a byte stream into the bytes of complete top-level JSON values.

    `feed(data)` returns, in order, `bytes` for each complete value and `_Broken` for each
    lexical problem. It never decodes UTF-8 or parses: bytes >= 0x80 cannot be mistaken for
    the ASCII brackets and quotes it tracks.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0  # next byte to scan
        self._start = -1  # start of the value being collected, -1 between values
        self._kind = ""  # "container", "string" or "scalar"
        self._depth = 0
        self._in_string = False
        self.broken = False

    def _reset_value(self) -> None:
        self._start = -1
        self._kind = ""
        self._depth = 0
        self._in_string = False

    def _complete(self, end: int, out: list[bytes | _Broken]) -> None:
        chunk = bytes(self._buf[self._start : end])
        self._pos = end
        self._reset_value()
        if len(chunk) > self.max_size:
            self._fail_oversize(out)
        else:
            out.append(chunk)

    def _fail_oversize(self, out: list[bytes | _Broken]) -> None:
        out.append(
            _Broken(f"Message too large: the limit is {self.max_size} bytes", fatal=True)
        )
        self.broken = True
        self._buf.clear()
        self._pos = 0
        self._reset_value()

    def _control_char(self, at: int, out: list[bytes | _Broken]) -> None:
        code = self._buf[at]
        out.append(_Broken(f"JSON parse error, invalid control character 0x{code:02x}"))
        self._pos = at + 1
        self._reset_value()

    def feed(self, data: bytes | bytearray) -> list[bytes | _Broken]:
        out: list[bytes | _Broken] = []
        if self.broken:
            return out
        self._buf += data
        buf = self._buf
        while not self.broken:
            n = len(buf)
            if self._start < 0:
                pos = self._pos
                while pos < n and buf[pos] in _WHITESPACE:
                    pos += 1
                self._pos = pos
                if pos == n:
                    break
                c = buf[pos]
                if c < 0x20:
                    self._control_char(pos, out)
                    continue
                self._start = pos
                self._pos = pos + 1
                if c in b"{[":
                    self._kind, self._depth = "container", 1
                elif c == 0x22:  # '"'
                    self._kind, self._in_string = "string", True
                elif c in b"}]":
                    out.append(_Broken(f"JSON parse error, stray '{chr(c)}'"))
                    self._reset_value()
                    continue
                else:
                    self._kind, self._pos = "scalar", pos
            if self._kind == "scalar":
                m = _SCALAR_END.search(buf, self._pos)
                if m is None:
                    self._pos = n
                    break
                self._complete(m.start(), out)
                continue
            if not self._scan_container(out):
                break
        if not self.broken:
            if self._start < 0:
                del buf[: self._pos]
                self._pos = 0
            else:
                if self._start > 0:
                    del buf[: self._start]
                    self._pos -= self._start
                    self._start = 0
                if len(buf) > self.max_size:
                    self._fail_oversize(out)
        return out

    def _scan_container(self, out: list[bytes | _Broken]) -> bool:
        """Scan a string or container; True when it ended (or was dropped), False: need more."""
        buf = self._buf
        n = len(buf)
        while True:
            if self._in_string:
                m = _INSIDE_STRING.search(buf, self._pos)
                if m is None:
                    self._pos = n
                    return False
                at = m.start()
                c = buf[at]
                if c == 0x5C:  # backslash: skip the escaped byte
                    if at + 1 >= n:
                        self._pos = at
                        return False
                    self._pos = at + 2
                    continue
                if c == 0x22:
                    self._in_string = False
                    self._pos = at + 1
                    if self._kind == "string":
                        self._complete(at + 1, out)
                        return True
                    continue
                self._control_char(at, out)
                return True
            m = _OUTSIDE_STRING.search(buf, self._pos)
            if m is None:
                self._pos = n
                return False
            at = m.start()
            c = buf[at]
            self._pos = at + 1
            if c == 0x22:
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    self._complete(at + 1, out)
                    return True
            else:
                self._control_char(at, out)
                return True


# --- decoding and checking requests ---------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid literal '{name}'")


def _finite_float(text: str) -> float:
    """A JSON number as float; one too large for a double (1e400) is refused, since it
    could not be written back (e.g. as an echoed id)."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


class _DuplicateKey(ValueError):
    """An object names a key twice (QEMU's parser refuses it)."""


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey("duplicate key")
    return obj


def decode_message(chunk: bytes) -> Any:
    """Parse one JSON value from UTF-8 bytes; raises QMPError (GenericError) if invalid."""
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError as e:
        raise generic(f"JSON parse error, invalid UTF-8 sequence at byte {e.start}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          object_pairs_hook=_object_without_duplicates)
    except json.JSONDecodeError as e:
        msg = e.msg[:1].lower() + e.msg[1:]
        raise generic(f"JSON parse error, {msg} at byte {e.pos}") from None
    except ValueError as e:
        raise generic(f"JSON parse error, {e}") from None
    except RecursionError:
        raise generic("JSON parse error, nesting too deep") from None


_TOP_LEVEL_KEYS = ("execute", "arguments", "id")


def parse_request(value: Any) -> Request | InputError:
    """Check the shape of one parsed message: {"execute": str, "arguments"?: {}, "id"?: any}."""
    if not isinstance(value, dict):
        return InputError(generic("QMP input must be a JSON object"))
    req_id = value.get("id", NO_ID)
    if "exec-oob" in value:
        return InputError(
            generic("Out-of-band execution is not supported: capability 'oob' is not enabled"),
            req_id,
        )
    for key in value:
        if key not in _TOP_LEVEL_KEYS:
            return InputError(generic(f"QMP input member '{key}' is unexpected"), req_id)
    if "execute" not in value:
        return InputError(generic("QMP input lacks member 'execute'"), req_id)
    name = value["execute"]
    if not isinstance(name, str):
        return InputError(generic("QMP input member 'execute' must be a string"), req_id)
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return InputError(generic("QMP input member 'arguments' must be an object"), req_id)
    return Request(name, arguments, req_id)


def encode(message: dict[str, Any]) -> bytes:
    """One server message: compact ASCII JSON and CRLF."""
    text = json.dumps(message, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.encode("ascii") + b"\r\n"


def _with_id(message: dict[str, Any], req_id: Any) -> dict[str, Any]:
    if req_id is not NO_ID:
        message["id"] = req_id
    return message


# --- the connection state machine -----------------------------------------------------


class Connection:
    """One client's protocol state: input framing, negotiation mode and output encoding."""

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.state = State.NEGOTIATION
        self._splitter = JSONSplitter(max_message_size)

    @property
    def broken(self) -> bool:
        """True after a fatal input error: answer it, then close the connection."""
        return self._splitter.broken

    @property
    def negotiated(self) -> bool:
        return self.state is State.COMMAND

    def receive_data(self, data: bytes) -> list[Request | InputError]:
        """Requests and input errors found in `data` (plus what earlier calls left pending)."""
        items: list[Request | InputError] = []
        for piece in self._splitter.feed(data):
            if isinstance(piece, _Broken):
                items.append(InputError(generic(piece.desc), fatal=piece.fatal))
                continue
            try:
                value = decode_message(piece)
            except QMPError as e:
                items.append(InputError(e))
                continue
            items.append(parse_request(value))
        return items

    def admit(self, request: Request) -> QMPError | None:
        """The error that refuses `request` in the current mode, or None to run it."""
        if self.state is State.NEGOTIATION and request.name != CAPABILITIES_COMMAND:
            return QMPError(
                COMMAND_NOT_FOUND, "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        if self.state is State.COMMAND and request.name == CAPABILITIES_COMMAND:
            return QMPError(
                COMMAND_NOT_FOUND, "Capabilities negotiation is already complete, command ignored"
            )
        return None

    def send_greeting(self, version: dict[str, Any], capabilities: list[str]) -> bytes:
        return encode({"QMP": {"version": version, "capabilities": list(capabilities)}})

    def send_return(self, request: Request, value: Any) -> bytes:
        """The success answer; a successful qmp_capabilities enters command mode."""
        try:
            data = encode(_with_id({"return": value}, request.id))
        except (TypeError, ValueError) as e:
            return self.send_error(generic(f"Internal error: bad result ({e})"), request.id)
        if request.name == CAPABILITIES_COMMAND and self.state is State.NEGOTIATION:
            self.state = State.COMMAND
        return data

    def send_error(self, error: QMPError, req_id: Any = NO_ID) -> bytes:
        return encode(_with_id({"error": error.to_json()}, req_id))

    def send_event(self, event: Event) -> bytes | None:
        """The event's bytes, or None while negotiating (events are not delivered then)."""
        if self.state is not State.COMMAND:
            return None
        return encode(
            {
                "event": event.name,
                "data": event.data,
                "timestamp": {"seconds": event.seconds, "microseconds": event.microseconds},
            }
        )
