"""QMP fuzzing against a real `vdisk serve` daemon.

The daemon answers every message or drops the offender; it never crashes, hangs or leaks.
A canary client asks query-version throughout and must always be answered within 1 s.
At the end, after a settle period, the daemon's RSS and open file count are back near their
start values and `quit` still stops it cleanly. Clients here use their own framing (CRLF
lines) and plain sockets, independent of control.protocol.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from control.registry import Enum, ListOf, Registry, TypeSpec
from tests.helpers.commands import qemu_img, qemu_io
from tests.helpers.daemon import Served, cleanup, start

pytestmark = pytest.mark.slow  # fuzzing: the soak tests

MAX_MESSAGE = 1 << 20  # the daemon's default message size limit
CANARY_LIMIT = 1.0  # seconds, generous
SETTLE = 2.0
RSS_SLACK = 30 << 20
IO_TIMEOUT = 10.0
DRIVES = ("d0", "d1")
STREAM_COMMANDS = ("block-stream", "block_stream")

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
    derandomize=False,
)


# --- a minimal independent client -----------------------------------------------------


class Closed(Exception):
    """The daemon closed the connection."""


class Client:
    """A blocking QMP client splitting the daemon's output on CRLF."""

    def __init__(self, path: Path, *, negotiate: bool = True, greeting: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(str(path))
        self.buf = b""
        if greeting:
            hello = self.recv()
            assert set(hello) == {"QMP"} and hello["QMP"]["capabilities"] == []
        if negotiate:
            assert self.call({"execute": "qmp_capabilities"}) == {"return": {}}

    def send(self, msg: dict[str, Any] | bytes) -> None:
        data = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
        self.sock.sendall(data + b"\n")

    def recv(self) -> dict[str, Any]:
        while b"\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed(self.buf[:200])
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        assert line.isascii() and b"\n" not in line and b"\r" not in line
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg  # type: ignore[no-any-return]

    def call(self, msg: dict[str, Any] | bytes) -> dict[str, Any]:
        self.send(msg)
        return self.recv()

    def read_to_eof(self) -> list[dict[str, Any]]:
        """Every message until the daemon closes the connection (must happen in time)."""
        out = []
        while True:
            try:
                out.append(self.recv())
            except Closed:
                return out

    def close(self) -> None:
        self.sock.close()


def error_of(reply: dict[str, Any]) -> tuple[str, str]:
    assert set(reply) <= {"error", "id"} and "error" in reply, reply
    return reply["error"]["class"], reply["error"]["desc"]


# --- the daemon, its canary, its resources --------------------------------------------


class Canary(threading.Thread):
    """Keeps asking query-version; records every round trip time."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.client = Client(path)
        self.rtts: list[float] = []
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        try:
            while not self.halt.is_set():
                t0 = time.monotonic()
                reply = self.client.call({"execute": "query-version", "id": i})
                self.rtts.append(time.monotonic() - t0)
                assert reply["id"] == i and reply["return"]["qemu"]["major"] == 7, reply
                i += 1
                self.halt.wait(0.02)
        except BaseException as e:  # noqa: BLE001 - reported by check()
            self.error = e

    def check(self) -> None:
        assert self.error is None, f"canary failed: {self.error!r}"
        assert self.is_alive() and self.rtts
        worst = max(self.rtts)
        assert worst < CANARY_LIMIT, f"canary waited {worst:.3f} s"

    def stop(self) -> None:
        self.halt.set()
        self.join(IO_TIMEOUT)
        self.client.close()


def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status value in bytes (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> str:
    return " ".join(sorted(os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")))


@dataclass
class Fuzzed:
    srv: Served
    canary: Canary
    top: Path
    rss0: int
    fds0: int
    map0: str
    fds_seen: str = ""
    _client: Client | None = None

    @property
    def path(self) -> Path:
        return self.srv.qmp_path

    def client(self) -> Client:
        """A shared negotiated connection for the property tests."""
        if self._client is None:
            self._client = Client(self.path)
        return self._client

    def alive(self) -> None:
        assert self.srv.proc.poll() is None, self.srv.stderr
        self.canary.check()


def top_map(top: Path) -> str:
    return qemu_img("map", "-U", "--output=json", top)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    d = tmp_path_factory.mktemp("fuzz")
    base, top, ro = d / "base.raw", d / "top.qcow2", d / "ro.raw"
    qemu_img("create", "-f", "raw", base, "4M")
    qemu_io(base, "write -P 0x5a 0 1M", fmt="raw")
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", top)
    qemu_img("create", "-f", "raw", ro, "1M")
    srv = start(d, [f"id=d0,file={top}", f"id=d1,file={ro},read-only=on"])
    canary: Canary | None = None
    try:
        canary = Canary(srv.qmp_path)
        canary.start()
        for _ in range(50):  # warm up before taking the baseline
            c = Client(srv.qmp_path)
            c.call({"execute": "query-commands"})
            c.call(b'{"execute": "query-version", "id": "' + b"w" * 200_000 + b'"}')
            c.close()
        with open(srv.path("d1"), "rb") as f:  # libfuse makes its splice pipe lazily
            f.read(4096)
        time.sleep(SETTLE)
        fz = Fuzzed(srv, canary, top, proc_status(srv.pid, "VmRSS"), open_fds(srv.pid),
                    top_map(top), fd_targets(srv.pid))
        yield fz
        if fz._client is not None:
            fz._client.close()
    finally:
        if canary is not None:
            canary.stop()
        cleanup(srv)


# --- clients that never read ------------------------------------------------------------


def _flood(path: Path, message: bytes, limit: int) -> str:
    """Send `message` up to `limit` times without reading; how the daemon stopped us."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(IO_TIMEOUT)
    s.connect(str(path))
    try:
        s.sendall(b'{"execute": "qmp_capabilities"}')
        for _ in range(limit):
            s.sendall(message)
        return "not dropped"
    except (BrokenPipeError, ConnectionResetError):
        return "dropped"
    except TimeoutError:
        return "blocked"
    finally:
        s.close()


def _parallel(n: int, fn: Any, *args: Any) -> list[Any]:
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        results[i] = fn(*args)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_clients_that_send_and_never_read(daemon: Fuzzed) -> None:
    """Big answers (1 MiB echoed ids) and many small ones: dropped, memory bounded."""
    hwm0 = proc_status(daemon.srv.pid, "VmHWM")
    big = json.dumps({"execute": "query-version", "id": "i" * (MAX_MESSAGE - 64)}).encode()
    assert _parallel(4, _flood, daemon.path, big, 300) == ["dropped"] * 4
    # before the outgoing queue was bounded in bytes, each such client cost ~260 MiB
    growth = proc_status(daemon.srv.pid, "VmHWM") - hwm0
    assert growth < 100 << 20, f"peak RSS grew by {growth >> 20} MiB"
    small = b'{"execute": "query-commands", "id": "flood"}' * 50
    assert _parallel(10, _flood, daemon.path, small, 100_000) == ["dropped"] * 10
    daemon.alive()


# --- deep nesting, bad UTF-8, oversized, non-finite numbers -----------------------------


def nested(depth: int, inner: bytes = b"") -> bytes:
    return b"[" * depth + inner + b"]" * depth


def test_deep_nesting(daemon: Fuzzed) -> None:
    c = Client(daemon.path)
    deep = 100_000
    for payload in [
        nested(deep),
        b'{"a":' * deep + b"1" + b"}" * deep,
        b'{"execute": "query-version", "arguments": {"x": ' + nested(deep) + b"}}",
        b'{"execute": "query-version", "id": ' + nested(deep) + b"}",
        b'{"execute": "block-stream", "arguments": {"device": "d0", "speed": '
        + nested(deep, b"1") + b"}}",
    ]:
        cls, desc = error_of(c.call(payload))
        assert cls == "GenericError" and "nesting too deep" in desc
        assert c.call({"execute": "query-version", "id": 1})["id"] == 1  # still usable
    for depth in (1, 100, 500, 900):  # what parses is echoed exactly
        value = json.loads(nested(depth))
        reply = c.call({"execute": "query-version", "id": value})
        assert reply["id"] == value
    # an unterminated deep value hits the size limit: answered, then disconnected
    c.sock.sendall(b"[" * (MAX_MESSAGE + 10))
    msgs = c.read_to_eof()
    assert [error_of(m)[0] for m in msgs] == ["GenericError"]
    assert "too large" in error_of(msgs[0])[1]
    c.close()
    assert daemon.client().call({"execute": "query-block-jobs"}) == {"return": []}
    daemon.alive()


BAD_UTF8 = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80",
            b"\xf4\x90\x80\x80", b"\x80", b"a\xfe\xfeb"]


def test_invalid_utf8(daemon: Fuzzed) -> None:
    c = Client(daemon.path)
    for bad in BAD_UTF8:
        for msg in [
            b'{"execute": "query-version", "id": "' + bad + b'"}',
            b'{"execute": "' + bad + b'"}',
            b'{"execute": "block-stream", "arguments": {"device": "d0", "' + bad + b'": 1}}',
        ]:
            cls, desc = error_of(c.call(msg))
            assert cls == "GenericError" and "UTF-8" in desc, desc
        assert c.call({"execute": "query-version", "id": "ok"})["id"] == "ok"
    for text in ["é", "\u2603", "\U0001f600", "\uffff", "\ud800", "\x7f"]:
        reply = c.call(b'{"execute": "query-version", "id": ' + json.dumps(text).encode() + b"}")
        assert reply["id"] == text
    raw = '{"execute": "query-version", "id": "\u00e9\U0001f600"}'.encode()  # unescaped
    assert c.call(raw)["id"] == "\u00e9\U0001f600"
    c.close()
    daemon.alive()


def test_non_finite_numbers_are_refused(daemon: Fuzzed) -> None:
    """Regression: an id of 1e400 (inf once parsed) could not be echoed; the connection
    died without an answer. Now it is a parse error, and the connection goes on."""
    c = Client(daemon.path)
    for text in [b"1e400", b"-1e400", b"1E+999"]:
        for msg in [b'{"execute": "query-version", "id": ' + text + b"}",
                    b'{"execute": "nope", "id": ' + text + b"}",
                    b'{"execute": "block-job-set-speed", "arguments": {"device": "d0", '
                    b'"speed": ' + text + b"}}"]:
            cls, desc = error_of(c.call(msg))
            assert cls == "GenericError" and "out of range" in desc
    for text in [b"NaN", b"Infinity", b"-Infinity"]:
        cls, desc = error_of(c.call(b'{"execute": "query-version", "id": ' + text + b"}"))
        assert cls == "GenericError" and "JSON parse error" in desc
    assert c.call(b'{"execute": "query-version", "id": 1e308}')["id"] == 1e308
    big = int("9" * 4000)
    assert c.call({"execute": "query-version", "id": big})["id"] == big
    cls, desc = error_of(c.call(b'{"execute": "query-version", "id": ' + b"9" * 5000 + b"}"))
    assert cls == "GenericError"
    c.close()
    daemon.alive()


def test_oversized_messages(daemon: Fuzzed) -> None:
    prefix, suffix = b'{"execute": "query-version", "id": "', b'"}'
    pad = MAX_MESSAGE - len(prefix) - len(suffix)
    c = Client(daemon.path)
    reply = c.call(prefix + b"x" * pad + suffix)  # exactly at the limit: served
    assert reply["id"] == "x" * pad
    c.sock.sendall(prefix + b"x" * (pad + 1) + suffix + b"\n")
    msgs = c.read_to_eof()
    assert len(msgs) == 1 and "too large" in error_of(msgs[0])[1]
    c.close()
    for payload in [b"1" * (2 * MAX_MESSAGE), b'"' + b"s" * (2 * MAX_MESSAGE),
                    b'{"a": "' + b"\\n" * MAX_MESSAGE]:
        c = Client(daemon.path, negotiate=False)
        try:
            c.sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may close before reading everything
        msgs = c.read_to_eof()
        assert len(msgs) == 1 and "too large" in error_of(msgs[0])[1]
        c.close()
    c = Client(daemon.path)  # endless whitespace between messages costs nothing
    for _ in range(40):
        c.sock.sendall(b" \r\n\t" * 65536)
    assert c.call({"execute": "query-version", "id": "ws"})["id"] == "ws"
    c.close()
    daemon.alive()


# --- hundreds of clients vanishing mid-message ------------------------------------------


PARTIALS = [
    b"",
    b'{"execute": "qmp_capabilities"}{"execute": "query-ver',
    b'{"execute": "query-version", "id": "' + b"p" * 600_000,
    b'{"execute": "block-stream", "arguments": {"device": "d0", "speed": 1',
    b'{"execute": "query-version", "id": "\xe2\x82',
    b"[" * 50_000,
    b'{"execute": "qmp_capabilities"}\n' + b'{"execute": "query-commands"}' * 200,
]


def _vanish(path: Path, i: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(IO_TIMEOUT)
    s.connect(str(path))
    if i % 3 == 0:
        s.recv(10)  # part of the greeting
    try:
        s.sendall(PARTIALS[i % len(PARTIALS)])
        if i % 5 == 0:
            s.shutdown(socket.SHUT_WR)
    except OSError as e:
        assert e.errno in (errno.EPIPE, errno.ECONNRESET)
    return s


def test_clients_vanishing_mid_message(daemon: Fuzzed) -> None:
    for wave in range(3):
        socks = [_vanish(daemon.path, wave * 100 + i) for i in range(100)]
        for i, s in enumerate(socks):
            if i % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            s.close()
        daemon.alive()
    c = Client(daemon.path)
    assert c.call({"execute": "query-block-jobs"}) == {"return": []}
    c.close()


def test_out_of_file_descriptors(daemon: Fuzzed) -> None:
    """Connections beyond the daemon's fd limit wait (accept retries); served clients and
    the drives go on, and new clients are served again once others leave."""
    pid = daemon.srv.pid
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid) + 10, old[1]))
    socks = []
    try:
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(daemon.path))
            socks.append(s)
        time.sleep(0.5)
        daemon.alive()
        with open(daemon.srv.path("d1"), "rb") as f:  # d1: no copy-on-read
            assert f.read(4096) == bytes(4096)
    finally:
        for s in socks:
            s.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
    c = Client(daemon.path)
    assert c.call({"execute": "query-block-jobs"}) == {"return": []}
    c.close()
    assert "accept failed" in daemon.srv.stderr
    daemon.alive()


# --- hypothesis: random JSON values, random arguments, random bytes ----------------------

scalars = (st.none() | st.booleans() | st.integers()
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=16,
)


def daemon_registry() -> Registry:
    """The registry `vdisk serve` builds (checked against query-commands)."""
    from vdisk.service.daemon import Daemon, ServeConfig

    return Daemon(ServeConfig(mount="mnt", qmp="qmp.sock", drives=())).registry


REGISTRY = daemon_registry()
FUZZ_NAMES = [n for n in REGISTRY.names() if n != "quit"]


@FUZZ
@given(value=json_values)
def test_random_json_messages(daemon: Fuzzed, value: Any) -> None:
    assume(not (isinstance(value, dict) and value.get("execute") == "quit"))
    reply = daemon.client().call(json.dumps(value).encode())
    cls, _ = error_of(reply)
    assert cls in ("GenericError", "CommandNotFound")
    if isinstance(value, dict) and "id" in value:
        assert reply["id"] == value["id"]
    else:
        assert "id" not in reply


@FUZZ
@given(data=st.data(), req_id=json_values)
def test_random_arguments_to_real_commands(daemon: Fuzzed, data: st.DataObject,
                                           req_id: Any) -> None:
    name = data.draw(st.sampled_from(FUZZ_NAMES))
    command = REGISTRY.lookup(name)
    assert command is not None
    keys = st.sampled_from([p.name for p in command.params] + ["bogus"]) | st.text(max_size=8)
    args = data.draw(st.dictionaries(keys, json_values, max_size=4))
    assume(not (name in STREAM_COMMANDS and args.get("device") in DRIVES))
    reply = daemon.client().call({"execute": name, "arguments": args, "id": req_id})
    assert reply["id"] == req_id
    assert set(reply) == {"return", "id"} or error_of(reply)


fragments = st.lists(st.sampled_from([
    b"{", b"}", b"[", b"]", b'"', b"\\", b":", b",", b" ", b"\n", b"\r", b"\t", b"\x00",
    b"\x1b", b"\xff", b"\xc3", b"\xa9", b"1", b"-", b"e", b"1e400", b"NaN", b"null", b"true",
    b'"execute"', b'"arguments"', b'"id"', b'"exec-oob"', b'"query-version"',
    b'"query-block"', b'"device"', b'"d0"', b'{"execute":"qmp_capabilities"}',
    b'{"execute":"query-block-jobs","id":7}', b"\\u0000", b"\\ud800", b"\\x",
]), max_size=60).map(b"".join)


@FUZZ
@given(payload=st.binary(max_size=2048) | fragments)
def test_random_bytes(daemon: Fuzzed, payload: bytes) -> None:
    """Any bytes, then EOF: only well-formed answers come back, then the daemon hangs up."""
    c = Client(daemon.path, negotiate=False)
    try:
        c.sock.sendall(payload)
        c.sock.shutdown(socket.SHUT_WR)
        for msg in c.read_to_eof():
            assert set(msg) <= {"return", "error", "id"} and ("return" in msg or error_of(msg))
    finally:
        c.close()


# --- wrong types for every argument of every command ------------------------------------

SAMPLES: dict[str, Any] = {
    "null": None, "boolean": True, "integer": 7, "float": 1.5, "string": "s",
    "array": [], "object": {},
}


def matches(value: Any, spec: TypeSpec) -> bool:
    """An independent statement of the schema types (see control.registry's docstring)."""
    if isinstance(spec, Enum):
        return isinstance(value, str) and value in spec.values
    if isinstance(spec, ListOf):
        return isinstance(value, list) and all(matches(v, spec.item) for v in value)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return {
        "any": True, "str": isinstance(value, str), "int": is_int and -2**63 <= value < 2**63,
        "bool": isinstance(value, bool), "number": is_int or isinstance(value, float),
        "list": isinstance(value, list), "dict": isinstance(value, dict),
    }[spec]


def wrong_values(spec: TypeSpec) -> list[Any]:
    values = [v for v in SAMPLES.values() if not matches(v, spec)]
    if isinstance(spec, Enum):
        values.append("not-a-choice")
    if isinstance(spec, ListOf):
        values += [[v] for v in SAMPLES.values() if not matches(v, spec.item)]
    if spec == "int":  # QAPI ints are int64; a huge speed once failed the job at run time
        values += [2**63, -(2**63) - 1, 10**400]
    return values


def valid_value(name: str, spec: TypeSpec) -> Any:
    if isinstance(spec, Enum):
        return spec.values[0]
    if isinstance(spec, ListOf):
        return []
    if name == "device":
        return "d0"  # a real drive: a refusal must come from the checks, not the lookup
    return {"str": "x", "int": 0, "bool": False, "number": 0, "list": [], "dict": {},
            "any": None}[spec]


def argument_cases(registry: Registry) -> Iterator[tuple[str, dict[str, Any], str, str]]:
    """(command, arguments, parameter named in the error, what is wrong)."""
    for name in registry.names():
        command = registry.lookup(name)
        assert command is not None
        required = {p.name: valid_value(p.name, p.type) for p in command.params
                    if not p.optional}
        for p in command.params:
            for bad in wrong_values(p.type):
                yield name, {**required, p.name: bad}, p.name, f"wrong type {bad!r}"
            if not p.optional:
                args = {k: v for k, v in required.items() if k != p.name}
                yield name, args, p.name, "missing"
        yield name, {**required, "bogus-param": 1}, "bogus-param", "unexpected"


def test_wrong_arguments_for_every_command(daemon: Fuzzed) -> None:
    c = Client(daemon.path)
    served = [x["name"] for x in c.call({"execute": "query-commands"})["return"]]
    assert served == REGISTRY.names()
    negotiating = Client(daemon.path, negotiate=False)
    count = 0
    for name, args, param, what in argument_cases(REGISTRY):
        client = negotiating if name == "qmp_capabilities" else c
        reply = client.call({"execute": name, "arguments": args, "id": count})
        assert reply["id"] == count
        cls, desc = error_of(reply)
        assert cls == "GenericError" and f"'{param}" in desc, (name, args, what, desc)
        count += 1
    assert count > 100
    # nothing happened: no job, still negotiating, the image untouched, still serving
    assert c.call({"execute": "query-block-jobs"}) == {"return": []}
    assert negotiating.call({"execute": "query-version"})["error"]["class"] == "CommandNotFound"
    assert top_map(daemon.top) == daemon.map0
    c.close()
    negotiating.close()
    daemon.alive()


# --- last: nothing leaked, and the daemon still stops cleanly ---------------------------


def test_zz_no_leak_then_clean_quit(daemon: Fuzzed) -> None:
    if daemon._client is not None:
        daemon._client.close()
        daemon._client = None
    time.sleep(SETTLE)
    daemon.alive()
    pid = daemon.srv.pid
    rss = proc_status(pid, "VmRSS")
    rtts = daemon.canary.rtts
    print(f"canary: {len(rtts)} round trips, max {max(rtts) * 1000:.1f} ms; "
          f"RSS {daemon.rss0 >> 20} -> {rss >> 20} MiB")
    assert rss - daemon.rss0 < RSS_SLACK, f"RSS {daemon.rss0 >> 20} -> {rss >> 20} MiB"
    assert open_fds(pid) == daemon.fds0, f"{daemon.fds_seen}\n{fd_targets(pid)}"
    assert c_quit(daemon.path) == {"return": {}}
    assert daemon.srv.wait() == 0
    log = daemon.srv.stderr
    assert "Traceback" not in log and "internal error" not in log, log[-2000:]


def c_quit(path: Path) -> dict[str, Any]:
    c = Client(path)
    try:
        return c.call({"execute": "quit"})
    finally:
        c.close()
