"""The NBD client protocol as a sans-IO state machine (no sockets, no threads).

`Client(export)` speaks the fixed newstyle handshake: NBD_OPT_STRUCTURED_REPLY, then
NBD_OPT_SET_META_CONTEXT "base:allocation" (if structured replies were accepted), then
NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE (NBD_OPT_EXPORT_NAME if the server does not
know NBD_OPT_GO). In the transmission phase it sends NBD_CMD_READ, NBD_CMD_BLOCK_STATUS
and NBD_CMD_DISC, any number in flight, and matches the simple or structured replies to
them by handle.

The caller moves bytes: `data_to_send()` after every call, `receive_data(bytes)` with
whatever arrived (any split), which returns the events it completed in order, and
`receive_eof()` when the server closed. A server that breaks the protocol raises
`ProtocolError` (the connection is then useless); a server that refuses the export
raises `Refused`. Every length the server sends is checked against what was asked before
waiting for its payload, so a malformed reply fails at once instead of waiting for bytes
that never come. Facts from the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from vdisk.engine.remote.nbd_events import DEFAULT_MAX_BLOCK as DEFAULT_MAX_BLOCK
from vdisk.engine.remote.nbd_events import (
    CommandFailed as CommandFailed,
)
from vdisk.engine.remote.nbd_events import (
    Event as Event,
)
from vdisk.engine.remote.nbd_events import (
    Export as Export,
)
from vdisk.engine.remote.nbd_events import (
    HandshakeDone as HandshakeDone,
)
from vdisk.engine.remote.nbd_events import (
    NbdError as NbdError,
)
from vdisk.engine.remote.nbd_events import (
    ProtocolError as ProtocolError,
)
from vdisk.engine.remote.nbd_events import (
    ReadDone as ReadDone,
)
from vdisk.engine.remote.nbd_events import (
    Refused as Refused,
)
from vdisk.engine.remote.nbd_events import (
    StatusDone as StatusDone,
)

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253  # oldstyle negotiation
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server) and client flags
FLAG_NO_ZEROES = 1 << 1
FLAG_HAS_FLAGS = 1 << 0  # transmission flags
FLAG_READ_ONLY = 1 << 1

OPT_EXPORT_NAME, OPT_ABORT, OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 1, 2, 7, 8, 10

REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = REP_ERR | 1, REP_ERR | 2, REP_ERR | 3
REP_ERR_TLS_REQD, REP_ERR_UNKNOWN, REP_ERR_SHUTDOWN = REP_ERR | 5, REP_ERR | 6, REP_ERR | 7
_REP_ERR_NAMES = {  # the errors of the protocol, as the user reads them
    1: "unsupported option", 2: "refused by policy", 3: "invalid option",
    4: "not supported on its platform", 5: "TLS required", 6: "unknown export",
    7: "shutting down", 8: "block size required", 9: "too big",
}

INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
CMD_READ, CMD_DISC, CMD_BLOCK_STATUS = 0, 2, 7

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE = 0, 1, 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERR = 1 << 15
REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERR | 1, REPLY_TYPE_ERR | 2

STATE_HOLE, STATE_ZERO = 1 << 0, 1 << 1  # base:allocation flags
BASE_ALLOCATION = "base:allocation"

MAX_STRING = 4096  # the longest export name or message the protocol allows
MAX_OPTION_REPLY = 2 * MAX_STRING + 64  # every option reply we accept fits in this
MAX_STATUS_EXTENTS = 1 << 17  # extents in one block status chunk (1 MiB of descriptors)
MAX_LENGTH = (1 << 32) - 1

_OPT_HEADER = struct.Struct(">QII")
_OPT_REPLY_HEADER = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK_HEADER = struct.Struct(">IHHQI")




class Phase(enum.Enum):
    GREETING = "greeting"
    STRUCTURED = "structured reply option"
    META = "meta context option"
    GO = "go option"
    EXPORT_NAME = "export name option"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass
class _Pending:
    command: int
    offset: int
    length: int
    data: bytearray | memoryview | None = None  # a memoryview: the caller's buffer
    covered: list[tuple[int, int]] = field(default_factory=list)  # (start, end) received
    extents: tuple[tuple[int, int], ...] | None = None
    error: tuple[int, str] | None = None


class Client:
    """One NBD connection's protocol state, from the greeting to NBD_CMD_DISC."""

    def __init__(self, export_name: str, *, structured: bool = True,
                 meta_context: bool = True) -> None:
        name = export_name.encode()
        if len(name) > MAX_STRING:
            raise ValueError(f"export name longer than {MAX_STRING} bytes")
        self.export_name = export_name
        self._name = name
        self._want_structured = structured
        self._want_meta = meta_context
        self.phase = Phase.GREETING
        self.export: Export | None = None
        self._out, self._in, self._pos = bytearray(), bytearray(), 0
        self._no_zeroes = self._structured = False
        self._option_sent = self._flags = 0
        self._meta: int | None = None
        self._size: int | None = None
        self._blocks = (1, 4096, DEFAULT_MAX_BLOCK)
        self._pending: dict[int, _Pending] = {}
        self._next_handle = 1  # 0 is NBD_CMD_DISC's
        self._failed: ProtocolError | None = None

    # -- the caller's side ------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | memoryview) -> list[Event]:
        if self._failed is not None:
            raise self._failed
        self._in += data
        events: list[Event] = []
        try:
            while self.phase is not Phase.CLOSED and self._step(events):
                pass
        except ProtocolError as e:
            self._failed = e
            raise
        if self._pos > 65536 and self._pos * 2 > len(self._in):
            del self._in[: self._pos]
            self._pos = 0
        return events

    def receive_eof(self) -> None:
        """The server closed the connection: an error unless nothing was left to say."""
        if self._failed is not None:
            raise self._failed
        partial = len(self._in) > self._pos
        if self.phase is Phase.EXPORT_NAME and not partial:
            raise Refused(f"the server closed the connection on export "
                          f"'{self.export_name}': it does not exist or is refused")
        if self.phase is Phase.CLOSED or (self.phase is Phase.TRANSMISSION and not partial
                                          and not self._pending):
            self.phase = Phase.CLOSED
            return
        what = (" in the middle of a message" if partial else
                f" with {len(self._pending)} requests in flight" if self._pending else "")
        self._failed = ProtocolError(f"the server closed the connection during the "
                                     f"{self.phase.value}{what}")
        raise self._failed

    def read(self, offset: int, length: int, into: memoryview | None = None) -> int:
        """Queue NBD_CMD_READ; returns its handle. into: length writable bytes that the
        reply is written to as it arrives (ReadDone then holds into), until detach()."""
        export = self._transmitting()
        self._check_range(offset, length, export)
        if length > export.max_block:
            raise ValueError(f"read of {length} bytes: the server's maximum is "
                             f"{export.max_block}")
        if into is not None and len(into) != length:
            raise ValueError(f"a buffer of {len(into)} bytes for a read of {length}")
        return self._request(CMD_READ, offset, length, bytearray(length) if into is None
                             else into)

    def detach(self, handle: int) -> None:
        """The caller's buffer of a read in flight is no longer to be written to."""
        pending = self._pending.get(handle)
        if pending is not None and isinstance(pending.data, memoryview):
            pending.data = bytearray(pending.length)

    def block_status(self, offset: int, length: int) -> int:
        """Queue NBD_CMD_BLOCK_STATUS on base:allocation; returns its handle."""
        export = self._transmitting()
        if export.meta_context is None:
            raise ValueError("the server offers no base:allocation context")
        self._check_range(offset, length, export)
        return self._request(CMD_BLOCK_STATUS, offset, length, None)

    def disconnect(self) -> None:
        """Queue NBD_CMD_DISC in the transmission phase (before it, just close)."""
        if self.phase is Phase.TRANSMISSION:
            self._out += _REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0)
        self.phase = Phase.CLOSED

    def _transmitting(self) -> Export:
        if self.phase is not Phase.TRANSMISSION or self.export is None:
            raise ValueError(f"no request can be sent in the {self.phase.value} phase")
        return self.export

    @staticmethod
    def _check_range(offset: int, length: int, export: Export) -> None:
        if offset < 0 or not 0 < length <= MAX_LENGTH or offset + length > export.size:
            raise ValueError(f"bad request: {length} bytes at {offset} of {export.size}")
        if offset % export.min_block or (length % export.min_block and
                                         offset + length != export.size):
            raise ValueError(f"request of {length} bytes at {offset} is not aligned to "
                             f"the server's {export.min_block}-byte blocks")

    def _request(self, command: int, offset: int, length: int,
                 data: bytearray | memoryview | None) -> int:
        handle = self._next_handle
        self._next_handle += 1
        self._pending[handle] = _Pending(command, offset, length, data)
        self._out += _REQUEST.pack(REQUEST_MAGIC, 0, command, handle, offset, length)
        return handle

    # -- input buffer -----------------------------------------------------------------

    def _have(self, n: int) -> bool:
        return len(self._in) - self._pos >= n

    def _take(self, n: int) -> memoryview:
        view = memoryview(self._in)[self._pos : self._pos + n]
        self._pos += n
        return view

    def _step(self, events: list[Event]) -> bool:
        """Handle one complete message if there is one; False when more input is needed."""
        if self.phase is Phase.GREETING:
            return self._greeting()
        if self.phase is Phase.EXPORT_NAME:
            return self._export_name_reply(events)
        if self.phase is Phase.TRANSMISSION:
            return self._reply(events)
        return self._option_reply(events)

    # -- handshake --------------------------------------------------------------------

    def _greeting(self) -> bool:
        # each field is checked as soon as it is in, so a wrong server fails at once
        if self._have(8) and struct.unpack_from(">Q", self._in, self._pos)[0] != NBDMAGIC:
            raise ProtocolError("not an NBD server (bad greeting magic)")
        if self._have(16):
            (opt_magic,) = struct.unpack_from(">Q", self._in, self._pos + 8)
            if opt_magic == CLISERV_MAGIC:
                raise Refused("the server only speaks the oldstyle handshake (not "
                              "supported)")
            if opt_magic != IHAVEOPT:
                raise ProtocolError(f"bad newstyle magic 0x{opt_magic:x} in the greeting")
        if not self._have(18):
            return False
        (flags,) = struct.unpack_from(">H", self._in, self._pos + 16)
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise Refused("the server does not support the fixed newstyle handshake")
        self._pos += 18
        self._no_zeroes = bool(flags & FLAG_NO_ZEROES)
        client_flags = FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if self._no_zeroes else 0)
        self._out += struct.pack(">I", client_flags)
        if self._want_structured:
            self._option(Phase.STRUCTURED, OPT_STRUCTURED_REPLY, b"")
        else:
            self._send_go()
        return True

    def _option(self, phase: Phase, option: int, data: bytes) -> None:
        self.phase = phase
        self._option_sent = option
        self._out += _OPT_HEADER.pack(IHAVEOPT, option, len(data)) + data

    def _send_meta(self) -> None:
        query = BASE_ALLOCATION.encode()
        data = (struct.pack(">I", len(self._name)) + self._name + struct.pack(">I", 1)
                + struct.pack(">I", len(query)) + query)
        self._option(Phase.META, OPT_SET_META_CONTEXT, data)

    def _send_go(self) -> None:
        data = (struct.pack(">I", len(self._name)) + self._name
                + struct.pack(">HHH", 2, INFO_EXPORT, INFO_BLOCK_SIZE))
        self._option(Phase.GO, OPT_GO, data)

    def _option_reply(self, events: list[Event]) -> bool:
        if not self._have(_OPT_REPLY_HEADER.size):
            return False
        magic, option, rtype, length = _OPT_REPLY_HEADER.unpack_from(self._in, self._pos)
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic 0x{magic:x}")
        if option != self._option_sent:
            raise ProtocolError(f"reply to option {option} while option "
                                f"{self._option_sent} was sent")
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(f"option reply of {length} bytes (too long)")
        if not self._have(_OPT_REPLY_HEADER.size + length):
            return False
        self._pos += _OPT_REPLY_HEADER.size
        payload = bytes(self._take(length))
        if rtype & REP_ERR:
            self._option_error(rtype, payload.decode(errors="replace"))
        elif self.phase is Phase.STRUCTURED:
            self._structured_reply(rtype, payload)
        elif self.phase is Phase.META:
            self._meta_reply(rtype, payload)
        else:
            self._go_reply(rtype, payload, events)
        return True

    def _option_error(self, rtype: int, message: str) -> None:
        detail = f": {message}" if message else ""
        if rtype == REP_ERR_TLS_REQD:
            raise self._refuse("the server requires TLS (not supported for NBD)")
        if rtype == REP_ERR_SHUTDOWN:
            raise self._refuse("the server is shutting down")
        if self.phase in (Phase.STRUCTURED, Phase.META):
            self._send_go()  # without structured replies (or base:allocation)
        elif rtype == REP_ERR_UNKNOWN:
            raise self._refuse(f"export '{self.export_name}' does not exist on the server")
        elif rtype == REP_ERR_UNSUP:
            self.phase = Phase.EXPORT_NAME
            self._option_sent = OPT_EXPORT_NAME
            self._out += _OPT_HEADER.pack(IHAVEOPT, OPT_EXPORT_NAME, len(self._name))
            self._out += self._name
        else:
            why = _REP_ERR_NAMES.get(rtype & ~REP_ERR, f"error 0x{rtype:x}")
            raise self._refuse(f"the server refused export '{self.export_name}' ({why})"
                               f"{detail}")

    def _refuse(self, reason: str) -> Refused:
        """Queue NBD_OPT_ABORT (the soft disconnect: no option is pending now)."""
        self._out += _OPT_HEADER.pack(IHAVEOPT, OPT_ABORT, 0)
        self.phase = Phase.CLOSED
        return Refused(reason)

    def _structured_reply(self, rtype: int, payload: bytes) -> None:
        if rtype != REP_ACK or payload:
            raise ProtocolError(f"unexpected reply {rtype} to the structured reply option")
        self._structured = True
        if self._want_meta:
            self._send_meta()
        else:
            self._send_go()

    def _meta_reply(self, rtype: int, payload: bytes) -> None:
        if rtype == REP_META_CONTEXT and len(payload) >= 4:
            if payload[4:] == BASE_ALLOCATION.encode():
                (self._meta,) = struct.unpack_from(">I", payload)
        elif rtype == REP_ACK and not payload:
            self._send_go()
        else:
            raise ProtocolError(f"unexpected reply {rtype} to the meta context option")

    def _go_reply(self, rtype: int, payload: bytes, events: list[Event]) -> None:
        if rtype == REP_INFO:
            self._info(payload)
        elif rtype == REP_ACK and not payload:
            if self._size is None:
                raise ProtocolError("the server accepted the export without its size")
            self._enter_transmission(events)
        else:
            raise ProtocolError(f"unexpected reply {rtype} to the go option")

    def _info(self, payload: bytes) -> None:
        (itype,) = struct.unpack_from(">H", payload.ljust(2, b"\xff"))
        if itype == INFO_EXPORT:
            if len(payload) != 12:
                raise ProtocolError(f"export info of {len(payload)} bytes (not 12)")
            self._size, self._flags = struct.unpack_from(">QH", payload, 2)
        elif itype == INFO_BLOCK_SIZE:
            if len(payload) != 14:
                raise ProtocolError(f"block size info of {len(payload)} bytes (not 14)")
            lo, pref, hi = struct.unpack_from(">III", payload, 2)
            if not (0 < lo <= 65536 and lo & (lo - 1) == 0 == pref & (pref - 1) and pref >= lo
                    and hi >= lo and (hi % lo == 0 or hi == MAX_LENGTH)):
                raise ProtocolError(f"bad block sizes: minimum {lo}, preferred {pref}, "
                                    f"maximum {hi}")
            self._blocks = (lo, pref, hi // lo * lo)
        # other information (name, description) is not needed

    def _export_name_reply(self, events: list[Event]) -> bool:
        need = 10 if self._no_zeroes else 134
        if not self._have(need):
            return False
        self._size, self._flags = struct.unpack_from(">QH", self._in, self._pos)
        self._pos += need
        self._structured = False  # NBD_OPT_GO is older than every option we asked for
        self._meta = None
        self._enter_transmission(events)
        return True

    def _enter_transmission(self, events: list[Event]) -> None:
        assert self._size is not None
        lo, pref, hi = self._blocks
        self.export = Export(self._size, self._flags, lo, pref, min(hi, DEFAULT_MAX_BLOCK),
                             self._structured, self._meta if self._structured else None)
        self.phase = Phase.TRANSMISSION
        events.append(HandshakeDone(self.export))

    # -- transmission -----------------------------------------------------------------

    def _reply(self, events: list[Event]) -> bool:
        if not self._have(4):
            return False
        (magic,) = struct.unpack_from(">I", self._in, self._pos)
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple_reply(events)
        if magic == STRUCTURED_REPLY_MAGIC:
            if not self._structured:
                raise ProtocolError("structured reply chunk without structured replies")
            return self._chunk(events)
        raise ProtocolError(f"bad reply magic 0x{magic:08x}")

    def _lookup(self, handle: int) -> _Pending:
        if (pending := self._pending.get(handle)) is None:
            raise ProtocolError(f"reply for unknown handle {handle}")
        return pending

    def _simple_reply(self, events: list[Event]) -> bool:
        if not self._have(_SIMPLE_REPLY.size):
            return False
        _, error, handle = _SIMPLE_REPLY.unpack_from(self._in, self._pos)
        pending = self._lookup(handle)
        if pending.command == CMD_READ and self._structured:
            raise ProtocolError("simple reply to a read after structured replies were "
                                "negotiated")
        if error:
            self._pos += _SIMPLE_REPLY.size
            del self._pending[handle]
            events.append(CommandFailed(handle, error))
            return True
        if pending.command != CMD_READ:
            raise ProtocolError("simple reply without error to a block status request")
        if not self._have(_SIMPLE_REPLY.size + pending.length):
            return False
        self._pos += _SIMPLE_REPLY.size
        del self._pending[handle]
        data = pending.data
        if isinstance(data, memoryview):  # the caller's buffer
            data[:] = self._take(pending.length)
            events.append(ReadDone(handle, data))
        else:
            events.append(ReadDone(handle, bytes(self._take(pending.length))))
        return True

    def _chunk(self, events: list[Event]) -> bool:
        if not self._have(_CHUNK_HEADER.size):
            return False
        _, flags, ctype, handle, length = _CHUNK_HEADER.unpack_from(self._in, self._pos)
        pending = self._lookup(handle)
        limit = self._chunk_limit(ctype, pending)
        if length > limit:
            raise ProtocolError(f"reply chunk of type {ctype} with {length} bytes of "
                                f"payload (at most {limit} expected)")
        if not self._have(_CHUNK_HEADER.size + length):
            return False
        self._pos += _CHUNK_HEADER.size
        self._chunk_payload(ctype, pending, self._take(length))
        if flags & REPLY_FLAG_DONE:
            del self._pending[handle]
            events.append(self._finish(handle, pending))
        elif ctype == REPLY_TYPE_NONE:
            raise ProtocolError("reply chunk of type none without the done flag")
        return True

    @staticmethod
    def _chunk_limit(ctype: int, pending: _Pending) -> int:
        if ctype == REPLY_TYPE_OFFSET_DATA and pending.command == CMD_READ:
            return 8 + pending.length
        if ctype == REPLY_TYPE_OFFSET_HOLE:
            return 12
        if ctype == REPLY_TYPE_BLOCK_STATUS:
            return 4 + 8 * MAX_STATUS_EXTENTS
        if ctype & REPLY_TYPE_ERR:
            return 14 + MAX_STRING
        return 0

    def _chunk_payload(self, ctype: int, pending: _Pending, payload: memoryview) -> None:
        if ctype == REPLY_TYPE_NONE:
            return
        if ctype in (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE):
            if pending.command != CMD_READ or pending.data is None:
                raise ProtocolError(f"read data chunk in the reply to command "
                                    f"{pending.command}")
            if ctype == REPLY_TYPE_OFFSET_DATA:
                if len(payload) < 9:
                    raise ProtocolError("data chunk without data")
                size = len(payload) - 8
            elif len(payload) != 12:
                raise ProtocolError(f"hole chunk of {len(payload)} bytes (not 12)")
            else:
                (size,) = struct.unpack_from(">I", payload, 8)
            (offset,) = struct.unpack_from(">Q", payload)
            start = offset - pending.offset
            if size == 0 or start < 0 or start + size > pending.length:
                raise ProtocolError(f"read chunk of {size} bytes at {offset} outside the "
                                    f"request ({pending.length} bytes at {pending.offset})")
            if ctype == REPLY_TYPE_OFFSET_DATA:
                pending.data[start : start + size] = payload[8:]
            elif isinstance(pending.data, memoryview):  # a hole: the caller's buffer is not
                # zeroed, as a fresh one is
                pending.data[start : start + size] = bytes(size)
            pending.covered.append((start, start + size))
        elif ctype == REPLY_TYPE_BLOCK_STATUS:
            self._status_chunk(pending, payload)
        elif ctype & REPLY_TYPE_ERR:
            self._error_chunk(ctype, pending, payload)
        else:
            raise ProtocolError(f"unknown reply chunk type {ctype}")

    def _status_chunk(self, pending: _Pending, payload: memoryview) -> None:
        if pending.command != CMD_BLOCK_STATUS:
            raise ProtocolError("block status chunk in the reply to a read")
        if len(payload) < 12 or (len(payload) - 4) % 8:
            raise ProtocolError(f"block status chunk of {len(payload)} bytes")
        (context,) = struct.unpack_from(">I", payload)
        if context != self._meta:
            raise ProtocolError(f"block status for context {context}, which was not "
                                "selected")
        if pending.extents is not None:
            raise ProtocolError("two block status chunks for one context")
        extents, pos, end = [], pending.offset, self.export.size if self.export else 0
        for i in range(4, len(payload), 8):
            length, flags = struct.unpack_from(">II", payload, i)
            if length == 0:
                raise ProtocolError("block status extent of length 0")
            if pos < end:
                extents.append((min(length, end - pos), flags))
            pos += length
        pending.extents = tuple(extents)

    def _error_chunk(self, ctype: int, pending: _Pending, payload: memoryview) -> None:
        if len(payload) < 6:
            raise ProtocolError(f"error chunk of {len(payload)} bytes")
        error, msg_len = struct.unpack_from(">IH", payload)
        rest = len(payload) - 6 - msg_len
        if error == 0 or rest < 0:
            raise ProtocolError(f"malformed error chunk (error {error}, message of "
                                f"{msg_len} bytes in {len(payload)})")
        if ctype == REPLY_TYPE_ERROR and rest != 0:
            raise ProtocolError("error chunk longer than its message")
        if ctype == REPLY_TYPE_ERROR_OFFSET:
            (offset,) = struct.unpack_from(">Q", payload, 6 + msg_len) if rest == 8 else (-1,)
            if not pending.offset <= offset < pending.offset + pending.length:
                raise ProtocolError("error offset chunk without an offset in the request")
        if pending.error is None:
            pending.error = (error, bytes(payload[6 : 6 + msg_len]).decode(errors="replace"))

    def _finish(self, handle: int, pending: _Pending) -> Event:
        if pending.error is not None:
            return CommandFailed(handle, *pending.error)
        if pending.command == CMD_BLOCK_STATUS:
            if pending.extents is None:
                raise ProtocolError("block status reply without extents")
            return StatusDone(handle, pending.extents)
        assert pending.data is not None
        at = 0
        for start, end in sorted(pending.covered):
            if start != at:
                what = "overlap" if start < at else "leave a gap"
                raise ProtocolError(f"the chunks of a read reply {what} at byte {at}")
            at = end
        if at != pending.length:
            raise ProtocolError(f"read reply covers {at} of {pending.length} bytes")
        data = pending.data
        return ReadDone(handle, data if isinstance(data, memoryview) else bytes(data))
