"""Sans-IO tests of the QMP core: framing, parsing, negotiation, schemas, events, blockinfo."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from control.builtin import make_registry, version_info
from control.errors import QMPError
from control.events import EventBus
from control.protocol import NO_ID, Connection, Event, InputError, JSONSplitter, Request
from control.registry import (
    Context,
    Enum,
    ListOf,
    Registry,
    parse_schema,
    validate_arguments,
)


def feed_all(conn: Connection, *chunks: bytes) -> list[Request | InputError]:
    out: list[Request | InputError] = []
    for c in chunks:
        out.extend(conn.receive_data(c))
    return out


def wire(data: bytes) -> dict[str, Any]:
    """Decode one server message, checking the framing: ASCII, compact, CRLF."""
    assert data.endswith(b"\r\n") and data.count(b"\r\n") == 1
    text = data[:-2].decode("ascii")
    value = json.loads(text)
    assert json.dumps(value, separators=(",", ":")) == text  # compact, nothing else
    return value


# --- framing --------------------------------------------------------------------------

MSGS = [
    {"execute": "a", "id": 1},
    {"execute": "b", "arguments": {"s": "}{][\"\\", "n": [1, {"x": []}]}},
    {"execute": "c", "id": "x\u00e9\u4e2d\U0001f600"},
]


@pytest.mark.parametrize("sep", [b"", b"\n", b"\r\n", b" \t\r\n "])
def test_joined_messages_in_one_read(sep: bytes) -> None:
    data = sep.join(json.dumps(m, ensure_ascii=False).encode() for m in MSGS) + sep
    got = Connection().receive_data(data)
    assert got == [Request(m["execute"], m.get("arguments", {}), m.get("id", NO_ID)) for m in MSGS]


def test_split_byte_by_byte() -> None:
    data = b"".join(json.dumps(m, ensure_ascii=False).encode() for m in MSGS)
    conn = Connection()
    got = feed_all(conn, *(data[i : i + 1] for i in range(len(data))))
    assert [r.name for r in got if isinstance(r, Request)] == ["a", "b", "c"]
    assert got[2].id == MSGS[2]["id"]  # type: ignore[union-attr]


def test_every_split_point() -> None:
    data = json.dumps(MSGS[1]).encode() + b"\r\n" + json.dumps(MSGS[0]).encode()
    for cut in range(len(data) + 1):
        got = feed_all(Connection(), data[:cut], data[cut:])
        assert [r.name for r in got] == ["b", "a"], cut  # type: ignore[union-attr]


def test_escaped_quote_split_after_backslash() -> None:
    conn = Connection()
    assert conn.receive_data(b'{"execute": "x\\') == []
    assert conn.receive_data(b'"}') == []  # the quote was escaped: still inside the string
    got = conn.receive_data(b'"}')
    assert got == [Request('x"}', {}, NO_ID)]


def test_incomplete_waits() -> None:
    conn = Connection()
    assert conn.receive_data(b'{"execute": "a", "arguments": {"x": [1, 2') == []
    assert conn.receive_data(b"]}}") == [Request("a", {"x": [1, 2]}, NO_ID)]


# --- parse errors ---------------------------------------------------------------------


def only_error(items: list[Request | InputError]) -> InputError:
    assert len(items) == 1 and isinstance(items[0], InputError), items
    return items[0]


def test_malformed_json_then_valid() -> None:
    conn = Connection()
    items = conn.receive_data(b'{"execute": }\r\n{"execute": "ok", "id": 5}')
    assert isinstance(items[0], InputError)
    assert items[0].error.cls == "GenericError"
    assert items[0].error.desc.startswith("JSON parse error, ")
    assert items[0].id is NO_ID and not items[0].fatal
    assert items[1] == Request("ok", {}, 5)


@pytest.mark.parametrize("value", [b"42", b'"str"', b"[1, 2]", b"null", b"true", b"1.5"])
def test_non_object(value: bytes) -> None:
    conn = Connection()
    err = only_error(conn.receive_data(value + b"\n"))
    assert err.error == QMPError("GenericError", "QMP input must be a JSON object")
    assert conn.receive_data(b'{"execute": "x"}') == [Request("x", {}, NO_ID)]


@pytest.mark.parametrize(
    "data", [b'{"execute": "\xff"}', b'{"execute": "\xc3"}', b'{"execute": "\xed\xa0\x80"}', b"\xfe"]
)
def test_invalid_utf8(data: bytes) -> None:
    conn = Connection()
    err = only_error(conn.receive_data(data + b"\n"))
    assert err.error.cls == "GenericError" and "UTF-8" in err.error.desc
    assert conn.receive_data(b'{"execute": "x", "id": 1}') == [Request("x", {}, 1)]


def test_control_character_resets_partial_input() -> None:
    conn = Connection()
    assert conn.receive_data(b'{"execute": "lost", "argu') == []
    err = only_error(conn.receive_data(b"\x01"))
    assert err.error.cls == "GenericError"
    assert conn.receive_data(b'{"execute": "x"}') == [Request("x", {}, NO_ID)]


def test_nan_and_stray_brace_rejected() -> None:
    conn = Connection()
    items = conn.receive_data(b'{"execute": "x", "id": NaN} } {"execute": "y"}')
    assert [type(i) for i in items] == [InputError, InputError, Request]


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    conn = Connection()
    err = only_error(conn.receive_data(b"[" * 200_000 + b"]" * 200_000))
    assert err.error.cls == "GenericError"


def test_oversized_is_fatal() -> None:
    conn = Connection(max_message_size=1000)
    assert conn.receive_data(b'{"execute": "ok"}') == [Request("ok", {}, NO_ID)]
    items = conn.receive_data(b'{"execute": "x", "arguments": {"pad": "' + b"a" * 600)
    assert items == []
    err = only_error(conn.receive_data(b"a" * 600))
    assert err.fatal and err.error.cls == "GenericError" and "1000" in err.error.desc
    assert conn.broken
    assert conn.receive_data(b'{"execute": "ok"}') == []


def test_oversized_complete_message_in_one_read() -> None:
    conn = Connection(max_message_size=100)
    err = only_error(conn.receive_data(b'{"execute": "x", "id": "' + b"b" * 200 + b'"}'))
    assert err.fatal and conn.broken


def test_message_at_the_limit_is_accepted() -> None:
    msg = b'{"execute": "x", "id": "' + b"c" * 100 + b'"}'
    conn = Connection(max_message_size=len(msg))
    assert conn.receive_data(msg) == [Request("x", {}, "c" * 100)]


def test_splitter_handles_large_input_in_pieces() -> None:
    sp = JSONSplitter(max_size=10 << 20)
    msg = json.dumps({"execute": "x", "arguments": {"a": ["y" * 50] * 20000}}).encode()
    out: list[Any] = []
    for i in range(0, len(msg), 4096):
        out += sp.feed(msg[i : i + 4096])
    assert out == [msg]


# --- request shape and ids ------------------------------------------------------------

IDS = [0, -1, 2**70, 1.5, "s", "", None, True, False, [], [1, "a", None], {}, {"k": [{}]}]


@pytest.mark.parametrize("req_id", IDS, ids=repr)
def test_id_echoed_for_any_json_value(req_id: Any) -> None:
    conn = Connection()
    (req,) = conn.receive_data(json.dumps({"execute": "qmp_capabilities", "id": req_id}).encode())
    assert isinstance(req, Request) and req.id == req_id and type(req.id) is type(req_id)
    assert wire(conn.send_return(req, {})) == {"return": {}, "id": req_id}
    (req2,) = conn.receive_data(json.dumps({"execute": "x", "id": req_id}).encode())
    out = wire(conn.send_error(QMPError("GenericError", "no"), req2.id))  # type: ignore[union-attr]
    assert out == {"error": {"class": "GenericError", "desc": "no"}, "id": req_id}


def test_no_id_means_no_id_member() -> None:
    conn = Connection()
    (req,) = conn.receive_data(b'{"execute": "qmp_capabilities"}')
    assert wire(conn.send_return(req, {})) == {"return": {}}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "msg, desc",
    [
        ({"id": 3}, "QMP input lacks member 'execute'"),
        ({"execute": 1, "id": 3}, "QMP input member 'execute' must be a string"),
        ({"execute": "x", "arguments": [], "id": 3}, "QMP input member 'arguments' must be an object"),
        ({"execute": "x", "arguments": None, "id": 3}, "QMP input member 'arguments' must be an object"),
        ({"execute": "x", "foo": 1, "id": 3}, "QMP input member 'foo' is unexpected"),
    ],
)
def test_bad_request_shape(msg: dict[str, Any], desc: str) -> None:
    err = only_error(Connection().receive_data(json.dumps(msg).encode()))
    assert err.error == QMPError("GenericError", desc)
    assert err.id == 3


def test_exec_oob_not_supported() -> None:
    err = only_error(Connection().receive_data(b'{"exec-oob": "x", "id": "o"}'))
    assert err.error.cls == "GenericError" and "oob" in err.error.desc and err.id == "o"


def test_server_output_is_ascii() -> None:
    conn = Connection()
    req = Request("qmp_capabilities", {}, "\u00e9\U0001f600")
    data = conn.send_return(req, {"s": "\u4e2d"})
    assert data.isascii() and b"\\u00e9" in data
    assert wire(data) == {"return": {"s": "\u4e2d"}, "id": "\u00e9\U0001f600"}


def test_unserializable_result_becomes_error() -> None:
    conn = Connection()
    out = wire(conn.send_return(Request("x", {}, 1), {"bad": object()}))
    assert out["error"]["class"] == "GenericError" and out["id"] == 1


# --- negotiation ----------------------------------------------------------------------


def test_negotiation_states() -> None:
    conn = Connection()
    greeting = wire(conn.send_greeting(version_info(), []))
    assert greeting == {"QMP": {"version": version_info(), "capabilities": []}}
    ev = Event("E", {"a": 1}, 10, 20)
    assert conn.send_event(ev) is None  # no events before negotiation
    other = Request("query-version", {}, 1)
    err = conn.admit(other)
    assert err == QMPError(
        "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"
    )
    caps = Request("qmp_capabilities", {}, 2)
    assert conn.admit(caps) is None
    conn.send_error(QMPError("GenericError", "x"), 2)  # a failed qmp_capabilities
    assert not conn.negotiated and conn.send_event(ev) is None
    conn.send_return(caps, {})
    assert conn.negotiated
    assert conn.admit(other) is None
    assert conn.admit(caps) == QMPError(
        "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
    )
    data = conn.send_event(ev)
    assert data is not None
    assert wire(data) == {
        "event": "E",
        "data": {"a": 1},
        "timestamp": {"seconds": 10, "microseconds": 20},
    }


# --- argument schemas -----------------------------------------------------------------

SCHEMA = {
    "s": "str",
    "*i": "int",
    "*b": "bool",
    "*n": "number",
    "*l": "list",
    "*d": "dict",
    "*e": Enum("report", "stop"),
    "*ls": ListOf("str"),
    "*a": "any",
}
GOOD: dict[str, list[Any]] = {
    "s": ["", "x"],
    "i": [0, -5, 2**63 - 1, -(2**63)],
    "b": [True, False],
    "n": [0, 1.5, -2],
    "l": [[], [1, "x"]],
    "d": [{}, {"k": 1}],
    "e": ["report", "stop"],
    "ls": [[], ["a", "b"]],
    "a": [None, 1, "x", [], {}],
}
# QEMU 7.2's wording (checked against qemu-storage-daemon in
# tests/integration/test_qmp_errors.py): "Invalid parameter type for 'x', expected: T".
BAD: dict[str, list[tuple[Any, str]]] = {
    "s": [(1, "string"), (None, "string"), ([], "string")],
    "i": [(True, "integer"), (1.0, "integer"), ("1", "integer"), (None, "integer"),
          (2**63, "integer"), (-(2**63) - 1, "integer")],
    "b": [(1, "boolean"), ("true", "boolean"), (None, "boolean")],
    "n": [(True, "number"), ("1", "number")],
    "l": [({}, "array"), ("x", "array")],
    "d": [([], "object"), (1, "object")],
    "e": [("ignore", "does not accept value 'ignore'"), (1, "string")],
    "ls": [(["a", 1], None), ("a", "array")],
}


@pytest.mark.parametrize("name", list(GOOD))
def test_schema_accepts(name: str) -> None:
    params = parse_schema(SCHEMA)
    for value in GOOD[name]:
        args = {"s": "x", name: value}
        assert validate_arguments(params, args) == args


@pytest.mark.parametrize("name", list(BAD))
def test_schema_rejects_with_parameter_name(name: str) -> None:
    params = parse_schema(SCHEMA)
    for value, why in BAD[name]:
        args = {"s": "x", name: value} if name != "s" else {"s": value}
        with pytest.raises(QMPError) as ei:
            validate_arguments(params, args)
        assert ei.value.cls == "GenericError"
        if why is None:  # a list element: named with its index
            assert ei.value.desc == f"Invalid parameter type for '{name}[1]', expected: string"
        elif why.startswith("does not"):
            assert ei.value.desc == f"Parameter '{name}' {why}"
        else:
            assert ei.value.desc == f"Invalid parameter type for '{name}', expected: {why}"


def test_schema_missing_and_unexpected() -> None:
    params = parse_schema(SCHEMA)
    with pytest.raises(QMPError, match="Parameter 's' is missing"):
        validate_arguments(params, {"i": 1})
    with pytest.raises(QMPError, match="Parameter 'foo' is unexpected"):
        validate_arguments(params, {"s": "x", "foo": 1})
    assert validate_arguments(params, {"s": "x"}) == {"s": "x"}


def test_schema_rejects_unknown_type_names() -> None:
    with pytest.raises(ValueError):
        parse_schema({"x": "integer"})


# --- registry -------------------------------------------------------------------------


class _Backend:
    def __init__(self) -> None:
        self.quits = 0

    def drives(self) -> dict[str, Any]:
        return {}

    def request_quit(self) -> None:
        self.quits += 1


def ctx_for(registry: Registry) -> Context:
    return Context(_Backend(), EventBus(), registry)


async def test_registry_runs_validates_and_aliases() -> None:
    reg = make_registry()
    calls: list[dict[str, Any]] = []

    @reg.command("set-speed", {"device": "str", "speed": "int"}, aliases=["set_speed"])
    async def set_speed(ctx: Context, args: dict[str, Any]) -> None:
        calls.append(args)

    assert "set-speed" in reg and "set_speed" in reg
    ctx = ctx_for(reg)
    assert await reg.execute(ctx, "set_speed", {"device": "d", "speed": 5}) == {}
    with pytest.raises(QMPError, match="Invalid parameter type for 'speed', expected: integer"):
        await reg.execute(ctx, "set-speed", {"device": "d", "speed": "5"})
    with pytest.raises(QMPError, match="Parameter 'device' is missing"):
        await reg.execute(ctx, "set-speed", {"speed": 5})
    assert calls == [{"device": "d", "speed": 5}]  # refused calls had no effect
    with pytest.raises(QMPError) as ei:
        await reg.execute(ctx, "nope", {})
    assert ei.value == QMPError("CommandNotFound", "The command nope has not been found")
    names = [c["name"] for c in await reg.execute(ctx, "query-commands", {})]
    assert names == [
        "qmp_capabilities", "query-commands", "query-version", "quit", "query-block",
        "set-speed", "set_speed",
    ]
    with pytest.raises(ValueError):
        reg.add("set_speed", None, set_speed)


async def test_handler_exceptions_become_generic_errors() -> None:
    reg = Registry()

    async def boom(ctx: Context, args: dict[str, Any]) -> None:
        raise RuntimeError("kaput")

    async def oserr(ctx: Context, args: dict[str, Any]) -> None:
        raise FileNotFoundError(2, "No such file or directory", "/x")

    reg.add("boom", None, boom)
    reg.add("oserr", None, oserr)
    with pytest.raises(QMPError, match="kaput"):
        await reg.execute(ctx_for(reg), "boom", {})
    with pytest.raises(QMPError, match="/x: No such file"):
        await reg.execute(ctx_for(reg), "oserr", {})


async def test_builtin_capabilities_and_quit() -> None:
    reg = make_registry()
    ctx = ctx_for(reg)
    assert await reg.execute(ctx, "qmp_capabilities", {"enable": []}) == {}
    with pytest.raises(QMPError, match="Capability 'oob' is not available"):
        await reg.execute(ctx, "qmp_capabilities", {"enable": ["oob"]})
    with pytest.raises(QMPError, match=r"Invalid parameter type for 'enable\[0\]', expected: string"):
        await reg.execute(ctx, "qmp_capabilities", {"enable": [1]})
    assert await reg.execute(ctx, "quit", {}) == {}
    assert ctx.backend.quits == 0  # type: ignore[attr-defined]
    for hook in ctx.after_reply:  # the server runs these once the answer is written
        hook()
    assert ctx.backend.quits == 1  # type: ignore[attr-defined]


# --- events ---------------------------------------------------------------------------


async def test_event_bus_fanout_timestamps_and_overflow() -> None:
    bus = EventBus(clock_ns=lambda: 1_700_000_000_123_456_789)
    with bus.subscribe(4) as fast, bus.subscribe(2) as slow:
        ev = bus.emit("E", {"x": 1})
        assert (ev.seconds, ev.microseconds) == (1_700_000_000, 123_456)
        assert fast.receive_nowait() == ev
        bus.emit("F")
        assert bus.subscriber_count == 2
        bus.emit("G")  # slow now holds E, F: G overflows it and drops it
        assert bus.subscriber_count == 1
        assert [fast.receive_nowait().name for _ in range(2)] == ["F", "G"]
        assert slow.receive_nowait().name == "E"
        assert slow.receive_nowait().name == "F"
        with pytest.raises(trio.EndOfChannel):
            slow.receive_nowait()
    assert bus.subscriber_count == 0
    bus.emit("H")  # nobody listening: fine


def test_event_bus_real_clock() -> None:
    import time

    bus = EventBus()
    before = time.time()
    ev = bus.emit("E")
    assert before - 1 <= ev.seconds + ev.microseconds / 1e6 <= time.time() + 1
    assert 0 <= ev.microseconds < 1_000_000 and ev.data == {}


async def test_event_data_is_copied_and_must_be_json() -> None:
    bus = EventBus()
    data: dict[str, Any] = {"list": [1]}
    with bus.subscribe() as recv:
        bus.emit("E", data)
        data["list"].append(2)
        assert recv.receive_nowait().data == {"list": [1]}
        with pytest.raises(ValueError, match="event BAD"):
            bus.emit("BAD", {"x": object()})
        with pytest.raises(trio.WouldBlock):
            recv.receive_nowait()


# --- property: framing is independent of how the stream is cut ------------------------

_json_scalars = st.none() | st.booleans() | st.integers() | st.text(
    alphabet=st.sampled_from('ab{}[]"\\:, \u00e9\U0001f600\t\n')
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=4),
    max_leaves=20,
)
_requests = st.builds(
    lambda name, args, req_id: {"execute": name, "arguments": args, "id": req_id},
    st.text(max_size=8),
    st.dictionaries(st.text(max_size=5), _json_values, max_size=4),
    _json_values,
)


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(
    msgs=st.lists(_requests, min_size=1, max_size=5),
    seps=st.lists(st.sampled_from(["", " ", "\n", "\r\n", "\t"]), min_size=5, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=6),
    ascii_only=st.booleans(),
)
def test_any_cut_gives_the_same_requests(
    msgs: list[dict[str, Any]], seps: list[str], cuts: list[int], ascii_only: bool
) -> None:
    data = b"".join(
        json.dumps(m, ensure_ascii=ascii_only).encode() + seps[i].encode()
        for i, m in enumerate(msgs)
    )
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    got = feed_all(Connection(), *pieces)
    assert got == [Request(m["execute"], m["arguments"], m["id"]) for m in msgs]
