"""The sans-IO NBD client against a scripted server whose bytes are built here from the
NBD protocol document (NetworkBlockDevice/nbd doc/proto.md), not from the module's own
constants: magic numbers, option and reply layouts are written out as the spec gives them.
"""

from __future__ import annotations

import errno
import random
import struct

import pytest

from vdisk.engine.remote.nbd_proto import (
    Client,
    CommandFailed,
    Export,
    HandshakeDone,
    Phase,
    ProtocolError,
    ReadDone,
    Refused,
    StatusDone,
)

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
SIZE = 1 << 20


def greeting(flags: int = 3) -> bytes:
    return NBDMAGIC + IHAVEOPT + struct.pack(">H", flags)


def opt_reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", REPLY_MAGIC, option, rtype, len(data)) + data


def option(option: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def info_export(size: int = SIZE, flags: int = 0x0003) -> bytes:
    return opt_reply(7, 3, struct.pack(">HQH", 0, size, flags))


def info_block(lo: int, pref: int, hi: int) -> bytes:
    return opt_reply(7, 3, struct.pack(">HIII", 3, lo, pref, hi))


def chunk(handle: int, ctype: int, payload: bytes, done: bool = True) -> bytes:
    return struct.pack(">IHHQI", 0x668E33EF, 1 if done else 0, ctype, handle,
                       len(payload)) + payload


def data_chunk(handle: int, offset: int, data: bytes, done: bool = False) -> bytes:
    return chunk(handle, 1, struct.pack(">Q", offset) + data, done)


def hole_chunk(handle: int, offset: int, size: int, done: bool = False) -> bytes:
    return chunk(handle, 2, struct.pack(">QI", offset, size), done)


def error_chunk(handle: int, err: int, msg: bytes = b"", done: bool = True) -> bytes:
    return chunk(handle, 0x8001, struct.pack(">IH", err, len(msg)) + msg, done)


def simple(handle: int, err: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", 0x67446698, err, handle) + data


def request(handle: int, cmd: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, 0, cmd, handle, offset, length)


def feed(c: Client, data: bytes, splits: bool = False) -> list[object]:
    """Feed data in one piece, or in random pieces (down to single bytes)."""
    if not splits:
        return list(c.receive_data(data))
    rng = random.Random(len(data))
    events: list[object] = []
    pos = 0
    while pos < len(data):
        n = rng.choice((1, 2, 3, 7, 64))
        events += c.receive_data(data[pos : pos + n])
        pos += n
    return events


def structured_client(ctx: int = 7, blocks: tuple[int, int, int] | None = None,
                      size: int = SIZE, splits: bool = False) -> tuple[Client, Export]:
    c = Client("disk")
    assert feed(c, greeting(), splits) == []
    assert c.data_to_send() == struct.pack(">I", 3) + option(8)
    assert feed(c, opt_reply(8, 1), splits) == []
    query = b"base:allocation"
    assert c.data_to_send() == option(10, struct.pack(">I", 4) + b"disk" + struct.pack(
        ">II", 1, len(query)) + query)
    assert feed(c, opt_reply(10, 4, struct.pack(">I", ctx) + query) + opt_reply(10, 1),
                splits) == []
    assert c.data_to_send() == option(7, struct.pack(">I", 4) + b"disk" + struct.pack(
        ">HHH", 2, 0, 3))
    script = info_export(size) + (info_block(*blocks) if blocks else b"") + opt_reply(7, 1)
    (done,) = feed(c, script, splits)
    assert isinstance(done, HandshakeDone)
    return c, done.export


@pytest.mark.parametrize("splits", [False, True])
def test_handshake_negotiates_structured_replies_base_allocation_and_block_sizes(
        splits: bool) -> None:
    c, export = structured_client(ctx=7, blocks=(512, 4096, 1 << 20), splits=splits)
    assert export == Export(SIZE, 3, 512, 4096, 1 << 20, True, 7)
    assert c.phase is Phase.TRANSMISSION


def test_no_zeroes_is_only_asked_when_offered_and_go_falls_back_to_export_name() -> None:
    for flags, zeroes in ((1, 124), (3, 0)):
        c = Client("x", structured=False)
        feed(c, greeting(flags))
        client_flags = 1 | (2 if flags & 2 else 0)
        assert c.data_to_send() == struct.pack(">I", client_flags) + option(
            7, struct.pack(">I", 1) + b"x" + struct.pack(">HHH", 2, 0, 3))
        feed(c, opt_reply(7, 0x80000001))  # NBD_REP_ERR_UNSUP: an old server
        assert c.data_to_send() == option(1, b"x")
        (done,) = feed(c, struct.pack(">QH", 4096, 1) + bytes(zeroes), splits=True)
        assert isinstance(done, HandshakeDone)
        assert done.export == Export(4096, 1, structured=False, meta_context=None)


def test_structured_replies_refused_means_simple_replies_and_no_block_status() -> None:
    c = Client("x")
    feed(c, greeting())
    c.data_to_send()
    feed(c, opt_reply(8, 0x80000001, b"no such option"))
    assert c.data_to_send().startswith(option(7)[:12])  # straight to NBD_OPT_GO
    (done,) = feed(c, info_export(8192) + opt_reply(7, 1))
    assert isinstance(done, HandshakeDone) and not done.export.structured
    assert done.export.meta_context is None
    with pytest.raises(ValueError, match="base:allocation"):
        c.block_status(0, 4096)
    h = c.read(4096, 100)
    assert c.data_to_send() == request(h, 0, 4096, 100)
    assert feed(c, simple(h, 0, b"a" * 100), splits=True) == [ReadDone(h, b"a" * 100)]
    h = c.read(0, 10)
    assert feed(c, simple(h, errno.EIO)) == [CommandFailed(h, errno.EIO)]


def test_a_server_without_base_allocation_selects_no_context() -> None:
    c = Client("x")
    feed(c, greeting())
    feed(c, opt_reply(8, 1))
    feed(c, opt_reply(10, 4, struct.pack(">I", 1) + b"qemu:dirty-bitmap:b") +
         opt_reply(10, 1))
    (done,) = feed(c, info_export() + opt_reply(7, 1))
    assert isinstance(done, HandshakeDone) and done.export.meta_context is None


@pytest.mark.parametrize(("script", "reason"), [
    (opt_reply(7, 0x80000006), "export 'disk' does not exist on the server"),
    (opt_reply(7, 0x80000005), "requires TLS"),
    (opt_reply(7, 0x80000002, b"go away"), r"refused export 'disk' \(refused by policy\)"
                                           ": go away"),
    (opt_reply(7, 0x80000007), "shutting down"),
])
def test_refusals_of_the_export_say_why(script: bytes, reason: str) -> None:
    c = Client("disk", structured=False)
    feed(c, greeting())
    c.data_to_send()
    with pytest.raises(Refused, match=reason):
        feed(c, script)
    assert c.data_to_send() == option(2)  # NBD_OPT_ABORT: the soft disconnect


def test_refused_greetings() -> None:
    c = Client("d")
    with pytest.raises(Refused, match="oldstyle"):
        feed(c, NBDMAGIC + struct.pack(">Q", 0x00420281861253))
    c = Client("d")
    with pytest.raises(Refused, match="fixed newstyle"):
        feed(c, greeting(0))
    c = Client("d")
    with pytest.raises(ProtocolError, match="not an NBD server"):
        feed(c, b"HTTP/1.1")  # fails on the first 8 bytes, without waiting for more


def test_export_name_on_an_unknown_export_is_a_closed_connection() -> None:
    c = Client("nope", structured=False)
    feed(c, greeting())
    feed(c, opt_reply(7, 0x80000001))
    with pytest.raises(Refused, match="export 'nope'"):
        c.receive_eof()


@pytest.mark.parametrize("splits", [False, True])
def test_structured_read_assembles_data_and_hole_chunks_in_any_order(splits: bool) -> None:
    c, _ = structured_client()
    h1 = c.read(4096, 12288)
    h2 = c.read(0, 4)
    assert c.data_to_send() == request(h1, 0, 4096, 12288) + request(h2, 0, 0, 4)
    script = (data_chunk(h1, 12288, b"c" * 4096) + data_chunk(h2, 0, b"abcd", done=True)
              + hole_chunk(h1, 8192, 4096) + data_chunk(h1, 4096, b"a" * 4096)
              + chunk(h1, 0, b""))  # NBD_REPLY_TYPE_NONE with the done flag
    events = feed(c, script, splits)
    assert events == [ReadDone(h2, b"abcd"),
                      ReadDone(h1, b"a" * 4096 + bytes(4096) + b"c" * 4096)]


@pytest.mark.parametrize("splits", [False, True])
def test_a_read_into_the_callers_buffer_fills_it_holes_included(splits: bool) -> None:
    c, _ = structured_client()
    buf = memoryview(bytearray(b"\xff" * 12288))  # not zeroed: a hole must write zeroes
    h = c.read(4096, 12288, into=buf)
    c.data_to_send()
    script = (hole_chunk(h, 8192, 4096) + data_chunk(h, 12288, b"c" * 4096)
              + data_chunk(h, 4096, b"a" * 4096, done=True))
    (done,) = feed(c, script, splits)
    assert isinstance(done, ReadDone) and done.handle == h and done.data is buf
    assert bytes(buf) == b"a" * 4096 + bytes(4096) + b"c" * 4096
    with pytest.raises(ValueError):
        c.read(0, 4096, into=memoryview(bytearray(100)))


def test_a_detached_buffer_is_not_written_and_simple_replies_fill_it_too() -> None:
    c, _ = structured_client()
    buf = memoryview(bytearray(4096))
    h = c.read(0, 4096, into=buf)
    c.detach(h)  # the caller gave up (a timeout): a late reply must not land in buf
    (done,) = feed(c, data_chunk(h, 0, b"z" * 4096, done=True))
    assert bytes(buf) == bytes(4096) and done == ReadDone(h, b"z" * 4096)
    s = Client("x", structured=False)
    feed(s, greeting())
    s.data_to_send()
    (hs,) = feed(s, info_export() + opt_reply(7, 1))
    assert isinstance(hs, HandshakeDone)
    buf = memoryview(bytearray(8))
    h = s.read(0, 8, into=buf)
    (done,) = feed(s, simple(h, 0, b"12345678"))
    assert isinstance(done, ReadDone) and done.data is buf and bytes(buf) == b"12345678"


def test_block_status_extents_are_clipped_to_the_export() -> None:
    c, _ = structured_client(ctx=7, size=3 * 4096)
    h = c.block_status(4096, 8192)
    assert c.data_to_send() == request(h, 7, 4096, 8192)
    payload = struct.pack(">IIIIIII", 7, 4096, 3, 4096, 0, 65536, 3)
    assert feed(c, chunk(h, 5, payload)) == [StatusDone(h, ((4096, 3), (4096, 0)))]


def test_error_chunks_fail_the_command_with_the_servers_errno_and_message() -> None:
    c, _ = structured_client()
    h = c.read(0, 8192)
    script = data_chunk(h, 0, b"x" * 4096) + error_chunk(h, errno.EIO, b"disk on fire",
                                                          done=False)
    script += chunk(h, 0x8002, struct.pack(">IH", errno.EIO, 0) + struct.pack(">Q", 4096))
    assert feed(c, script) == [CommandFailed(h, errno.EIO, "disk on fire")]
    h = c.block_status(0, 4096)
    assert feed(c, simple(h, errno.EINVAL)) == [CommandFailed(h, errno.EINVAL)]


def test_disconnect_sends_nbd_cmd_disc() -> None:
    c, _ = structured_client()
    c.disconnect()
    assert c.data_to_send() == request(0, 2, 0, 0)
    c.receive_eof()  # the server closing after NBD_CMD_DISC is the expected end


def test_requests_outside_the_export_or_its_block_sizes_are_refused() -> None:
    c, _ = structured_client(blocks=(512, 4096, 65536))
    for offset, length in ((SIZE - 512, 1024), (-512, 512), (0, 0), (100, 512),
                           (0, 100), (0, 131072)):
        with pytest.raises(ValueError):
            c.read(offset, length)
    assert c.data_to_send() == b""


H = 1  # the first handle: the read of 8192 bytes at 4096 below
MALFORMED = {
    "bad magic": struct.pack(">I", 0x12345678),
    "unknown handle": data_chunk(99, 4096, b"x", done=True),
    "data before the request": data_chunk(H, 0, b"x" * 4096, done=True),
    "data past the request": data_chunk(H, 8192, b"x" * 8192, done=True),
    "empty data chunk": chunk(H, 1, struct.pack(">Q", 4096)),
    "empty hole": hole_chunk(H, 4096, 0, done=True),
    "hole of the wrong size": chunk(H, 2, struct.pack(">QIB", 4096, 1, 0)),
    "overlapping chunks": data_chunk(H, 4096, b"x" * 4096) + hole_chunk(H, 4096, 8192)
    + chunk(H, 0, b""),
    "a gap": data_chunk(H, 4096, b"x" * 4096, done=True),
    "simple reply to a read": simple(H, 0, b"x" * 8192),
    "block status for a read": chunk(H, 5, struct.pack(">III", 7, 8192, 0)),
    "none without done": chunk(H, 0, b"", done=False),
    "unknown chunk type": chunk(H, 9, b""),
    "error 0": error_chunk(H, 0),
    "error message longer than the chunk": chunk(H, 0x8001, struct.pack(">IH", 5, 10)),
    "error offset outside": chunk(H, 0x8002, struct.pack(">IHQ", 5, 0, 0)),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_read_replies_are_protocol_errors(name: str) -> None:
    c, _ = structured_client()
    assert c.read(4096, 8192) == H
    with pytest.raises(ProtocolError):
        feed(c, MALFORMED[name])
    with pytest.raises(ProtocolError):  # the connection stays broken
        c.receive_data(b"")


def test_a_huge_length_fails_at_the_header_instead_of_waiting_for_the_payload() -> None:
    c, _ = structured_client()
    h = c.read(0, 4096)
    with pytest.raises(ProtocolError, match="at most 4104"):
        feed(c, struct.pack(">IHHQI", 0x668E33EF, 1, 1, h, 1 << 30))
    c, _ = structured_client()
    h = c.block_status(0, 4096)
    with pytest.raises(ProtocolError, match="at most"):
        feed(c, struct.pack(">IHHQI", 0x668E33EF, 1, 5, h, 0xFFFFFFFF))


@pytest.mark.parametrize("payload", [
    struct.pack(">III", 8, 4096, 0),  # a context that was not selected
    struct.pack(">III", 7, 0, 0),  # an extent of length 0
    struct.pack(">IIIB", 7, 4096, 0, 0),  # not a whole number of extents
])
def test_malformed_block_status_replies_are_protocol_errors(payload: bytes) -> None:
    c, _ = structured_client(ctx=7)
    h = c.block_status(0, 4096)
    with pytest.raises(ProtocolError):
        feed(c, chunk(h, 5, payload))


@pytest.mark.parametrize(("script", "error"), [
    (opt_reply(7, 1), "without its size"),  # ACK before NBD_INFO_EXPORT
    (opt_reply(8, 1), "reply to option 8"),  # a reply to another option
    (struct.pack(">QIII", REPLY_MAGIC, 7, 3, 1 << 20), "too long"),  # fails on the header
    (struct.pack(">QIII", 0x1234, 7, 1, 0), "bad option reply magic"),
    (opt_reply(7, 3, struct.pack(">HQ", 0, 5)), "export info of 10 bytes"),
    (info_block(3, 4096, 65536), "bad block sizes"),
    (info_block(512, 256, 65536), "bad block sizes"),
    (opt_reply(7, 2, b"\0\0\0\0"), "unexpected reply 2"),
])
def test_malformed_handshake_replies_are_protocol_errors(script: bytes, error: str) -> None:
    c = Client("d", structured=False)
    feed(c, greeting())
    with pytest.raises(ProtocolError, match=error):
        feed(c, script)


def test_structured_chunks_without_structured_replies_are_protocol_errors() -> None:
    c = Client("d", structured=False)
    feed(c, greeting())
    feed(c, info_export() + opt_reply(7, 1))
    h = c.read(0, 4)
    with pytest.raises(ProtocolError, match="without structured replies"):
        feed(c, data_chunk(h, 0, b"abcd", done=True))


def test_end_of_file_is_an_error_in_the_middle_of_a_reply_or_with_requests_pending() -> None:
    c, _ = structured_client()
    c.receive_data(b"")
    h = c.read(0, 4096)
    with pytest.raises(ProtocolError, match="1 requests in flight"):
        c.receive_eof()
    c, _ = structured_client()
    h = c.read(0, 4096)
    feed(c, data_chunk(h, 0, b"x" * 4096, done=True)[:30])
    with pytest.raises(ProtocolError, match="middle of a message"):
        c.receive_eof()
    c = Client("d")
    feed(c, greeting()[:10])
    with pytest.raises(ProtocolError, match="greeting"):
        c.receive_eof()
    c, _ = structured_client()
    c.receive_eof()  # idle: the server may close an idle connection
    assert c.phase is Phase.CLOSED
