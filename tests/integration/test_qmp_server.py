"""The QMP server over real sockets: raw-socket protocol tests, qemu.qmp clients, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import trio

from control.blockinfo import block_info
from control.builtin import make_registry, version_info
from control.errors import QMPError
from control.events import EventBus
from control.registry import Context, Registry
from control.server import ServerConfig, serve_qmp
from tests.helpers.commands import qemu_img, qemu_info, qemu_io, vdisk
from vdisk.cli.qmp import parse_arguments
from vdisk.engine.chain import close_chain, open_chain
from vdisk.errors import VdiskError

# --- fixtures and helpers -------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for sockets (UNIX socket paths are limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="vqmp", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class FakeDrive:
    def __init__(self, device: str, top: Any, read_only: bool) -> None:
        self.device, self.top, self.read_only = device, top, read_only

    def query_block(self) -> dict[str, Any]:
        return block_info(self.device, self.top, self.read_only)


class FakeBackend:
    def __init__(self, drives: dict[str, FakeDrive] | None = None) -> None:
        self._drives = drives or {}
        self.quit_requests = 0

    def drives(self) -> dict[str, FakeDrive]:
        return self._drives

    def request_quit(self) -> None:
        self.quit_requests += 1


@dataclass
class Running:
    path: str
    registry: Registry
    backend: FakeBackend
    bus: EventBus


@asynccontextmanager
async def serving(
    path: str,
    registry: Registry | None = None,
    backend: FakeBackend | None = None,
    config: ServerConfig | None = None,
) -> AsyncIterator[Running]:
    run = Running(path, registry or make_registry(), backend or FakeBackend(), EventBus())
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(serve_qmp, path, run.registry, run.backend, run.bus, config=config)
        )
        try:
            yield run
        finally:
            nursery.cancel_scope.cancel()


class LineClient:
    """A raw client with its own framing (split on CRLF), independent of control.protocol."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def open(cls, path: str) -> LineClient:
        return cls(await trio.open_unix_socket(path))

    async def send(self, msg: dict[str, Any] | bytes) -> None:
        data = msg if isinstance(msg, bytes) else json.dumps(msg).encode() + b"\n"
        await self.stream.send_all(data)

    async def line(self, timeout: float = 5) -> bytes:
        with trio.fail_after(timeout):
            while b"\r\n" not in self.buf:
                data = await self.stream.receive_some(65536)
                assert data, "server closed the connection"
                self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        assert b"\n" not in line and b"\r" not in line
        return line

    async def recv(self, timeout: float = 5) -> dict[str, Any]:
        line = await self.line(timeout)
        assert line.isascii()
        return json.loads(line)

    async def call(self, msg: dict[str, Any] | bytes, timeout: float = 5) -> dict[str, Any]:
        await self.send(msg)
        return await self.recv(timeout)

    async def negotiate(self) -> dict[str, Any]:
        greeting = await self.recv()
        assert await self.call({"execute": "qmp_capabilities"}) == {"return": {}}
        return greeting

    async def expect_eof(self, timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return

    async def aclose(self) -> None:
        await self.stream.aclose()


def sock_path(d: str) -> str:
    return os.path.join(d, "qmp.sock")


# --- greeting, framing, negotiation ---------------------------------------------------


async def test_greeting_framing_and_negotiation(sockdir: str) -> None:
    async with serving(sock_path(sockdir)):
        c = await LineClient.open(sock_path(sockdir))
        raw = await c.line()
        greeting = json.loads(raw)
        assert json.dumps(greeting, separators=(",", ":")) == raw.decode()  # compact
        major, minor, micro = (greeting["QMP"]["version"]["qemu"][k] for k in ("major", "minor", "micro"))
        assert all(isinstance(v, int) for v in (major, minor, micro))
        assert greeting["QMP"]["version"]["package"].startswith("vdisk ")
        assert greeting["QMP"]["capabilities"] == []
        reply = await c.call({"execute": "query-version", "id": "pre"})
        assert reply == {
            "error": {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
            },
            "id": "pre",
        }
        reply = await c.call({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
        assert reply["error"]["class"] == "GenericError"
        assert await c.call({"execute": "qmp_capabilities", "id": 1}) == {"return": {}, "id": 1}
        reply = await c.call({"execute": "qmp_capabilities", "id": 2})
        assert reply["error"] == {
            "class": "CommandNotFound",
            "desc": "Capabilities negotiation is already complete, command ignored",
        }
        version = await c.call({"execute": "query-version", "id": 3})
        assert version == {"return": greeting["QMP"]["version"], "id": 3}
        await c.aclose()


async def test_ids_echoed_and_output_ascii(sockdir: str) -> None:
    async with serving(sock_path(sockdir)):
        c = await LineClient.open(sock_path(sockdir))
        await c.negotiate()
        for req_id in [0, 2**70, -1.25, "\u00e9\U0001f600", None, True, [1, [2]], {"a": {}}]:
            await c.send({"execute": "query-version", "id": req_id})
            line = await c.line()
            assert line.isascii()
            assert json.loads(line)["id"] == req_id
        await c.aclose()


async def test_events_only_after_negotiation(sockdir: str) -> None:
    async with serving(sock_path(sockdir)) as srv:
        c = await LineClient.open(sock_path(sockdir))
        await c.recv()
        srv.bus.emit("BEFORE", {"n": 0})
        await trio.sleep(0.05)
        assert await c.call({"execute": "qmp_capabilities", "id": 1}) == {"return": {}, "id": 1}
        ev = srv.bus.emit("AFTER", {"n": 1})
        msg = await c.recv()
        assert msg == {
            "event": "AFTER",
            "data": {"n": 1},
            "timestamp": {"seconds": ev.seconds, "microseconds": ev.microseconds},
        }
        assert await c.call({"execute": "query-version", "id": 2}) == {
            "return": version_info(),
            "id": 2,
        }
        await c.aclose()


async def test_malformed_split_joined_and_bad_utf8(sockdir: str) -> None:
    async with serving(sock_path(sockdir)):
        c = await LineClient.open(sock_path(sockdir))
        await c.negotiate()
        reply = await c.call(b'{"execute": }\r\n')
        assert set(reply) == {"error"} and reply["error"]["class"] == "GenericError"
        assert reply["error"]["desc"].startswith("JSON parse error")
        assert await c.call({"execute": "query-version", "id": 1}) == {
            "return": version_info(),
            "id": 1,
        }
        reply = await c.call(b"[1, 2]")
        assert reply["error"] == {"class": "GenericError", "desc": "QMP input must be a JSON object"}
        reply = await c.call(b'{"execute": "query-\xff"}')
        assert reply["error"]["class"] == "GenericError"
        # one message in pieces, then three in one write without separators
        data = json.dumps({"execute": "query-version", "id": "split"}).encode()
        for i in range(len(data)):
            await c.send(data[i : i + 1])
            await trio.sleep(0)
        assert (await c.recv())["id"] == "split"
        await c.send(b"".join(json.dumps({"execute": "query-version", "id": i}).encode()
                              for i in range(3)))
        assert [(await c.recv())["id"] for _ in range(3)] == [0, 1, 2]
        reply = await c.call({"execute": "query-version", "arguments": {"x": 1}, "id": 9})
        assert reply == {
            "error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"},
            "id": 9,
        }
        reply = await c.call({"execute": "query-version", "bogus": 1, "id": 10})
        assert reply["error"]["class"] == "GenericError" and reply["id"] == 10
        reply = await c.call({"execute": "no-such-command", "id": 11})
        assert reply["error"]["class"] == "CommandNotFound" and reply["id"] == 11
        await c.aclose()


async def test_oversized_input_answered_then_disconnected(sockdir: str) -> None:
    config = ServerConfig(max_message_size=64 * 1024)
    async with serving(sock_path(sockdir), config=config):
        c = await LineClient.open(sock_path(sockdir))
        other = await LineClient.open(sock_path(sockdir))
        await c.negotiate()
        await other.negotiate()
        await c.send(b'{"execute": "query-version", "arguments": {"pad": "' + b"x" * 200_000)
        reply = await c.recv()
        assert set(reply) == {"error"} and reply["error"]["class"] == "GenericError"
        assert "too large" in reply["error"]["desc"]
        await c.expect_eof()
        assert (await other.call({"execute": "query-version", "id": 1}))["id"] == 1
        await other.aclose()
        await c.aclose()


# --- concurrency and isolation --------------------------------------------------------


async def test_fifty_clients_at_once(sockdir: str) -> None:
    n = 50
    async with serving(sock_path(sockdir)) as srv:
        ready = 0
        all_ready = trio.Event()
        received: list[str] = []

        async def client(i: int) -> None:
            nonlocal ready
            c = await LineClient.open(sock_path(sockdir))
            await c.negotiate()
            assert (await c.call({"execute": "query-version", "id": i}))["id"] == i
            reply = await c.call({"execute": "query-commands", "id": -i})
            assert {"name": "query-block"} in reply["return"]
            ready += 1
            if ready == n:
                all_ready.set()
            ev = await c.recv(timeout=10)
            received.append(ev["event"])
            await c.aclose()

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(client, i)
            with trio.fail_after(20):
                await all_ready.wait()
            assert srv.bus.subscriber_count == n
            srv.bus.emit("ALL", {})
        assert received == ["ALL"] * n


async def test_slow_command_does_not_block_other_clients(sockdir: str) -> None:
    registry = make_registry()
    release = trio.Event()

    async def wait_cmd(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return {"waited": True}

    registry.add("x-wait", None, wait_cmd)
    async with serving(sock_path(sockdir), registry=registry):
        a = await LineClient.open(sock_path(sockdir))
        b = await LineClient.open(sock_path(sockdir))
        await a.negotiate()
        await b.negotiate()
        await a.send(b'{"execute": "x-wait", "id": 1}{"execute": "query-version", "id": 2}')
        for i in range(3):
            assert (await b.call({"execute": "query-version", "id": i}, timeout=1))["id"] == i
        release.set()
        assert await a.recv() == {"return": {"waited": True}, "id": 1}  # in order
        assert (await a.recv())["id"] == 2
        await a.aclose()
        await b.aclose()


async def test_flooding_client_that_never_reads(
    sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(sock_path(sockdir)):
        flood = await LineClient.open(sock_path(sockdir))
        other = await LineClient.open(sock_path(sockdir))
        await flood.negotiate()
        await other.negotiate()
        request = json.dumps({"execute": "query-commands", "id": "f"}).encode()

        async def flooder() -> None:
            try:
                for _ in range(200):
                    await flood.stream.send_all(request * 100)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # dropped by the server: expected

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flooder)
            for i in range(20):
                reply = await other.call({"execute": "query-version", "id": i}, timeout=1)
                assert reply["id"] == i
                await trio.sleep(0.02)
        # The flooder was dropped (its outgoing queue filled): reading ends in EOF.
        await flood.expect_eof(timeout=20)
        assert "outgoing queue full" in caplog.text
        assert (await other.call({"execute": "query-version", "id": "end"}, timeout=1))["id"]
        await flood.aclose()
        await other.aclose()


async def test_event_reader_that_never_reads_is_dropped(
    sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(sock_path(sockdir)) as srv:
        lazy = await LineClient.open(sock_path(sockdir))
        busy = await LineClient.open(sock_path(sockdir))
        await lazy.negotiate()
        await busy.negotiate()
        got = 0
        for burst in range(60):
            for i in range(100):
                srv.bus.emit("TICK", {"burst": burst, "i": i, "pad": "p" * 100})
            for _ in range(100):
                msg = await busy.recv(timeout=2)
                assert msg["event"] == "TICK" and msg["data"]["burst"] == burst
                got += 1
        assert got == 6000
        assert srv.bus.subscriber_count == 1  # lazy was dropped, busy still subscribed
        await lazy.expect_eof(timeout=20)
        assert "dropped" in caplog.text
        await lazy.aclose()
        await busy.aclose()


async def test_handler_failure_and_quit(sockdir: str) -> None:
    registry = make_registry()

    async def broken(ctx: Context, args: dict[str, Any]) -> None:
        raise RuntimeError("kaput")

    registry.add("x-broken", None, broken)
    async with serving(sock_path(sockdir), registry=registry) as srv:
        c = await LineClient.open(sock_path(sockdir))
        await c.negotiate()
        reply = await c.call({"execute": "x-broken", "id": 1})
        assert reply["error"]["class"] == "GenericError" and "kaput" in reply["error"]["desc"]
        assert await c.call({"execute": "quit", "id": 2}) == {"return": {}, "id": 2}
        with trio.fail_after(5):
            while srv.backend.quit_requests == 0:
                await trio.sleep(0.01)
        assert srv.backend.quit_requests == 1
        await c.aclose()


async def test_shutdown_flushes_queued_output_then_closes(
    sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = sock_path(sockdir)
    bus = EventBus()
    # queues big enough that the stuck client is not dropped before the stop
    config = ServerConfig(close_grace=0.5, outgoing_queue=10_000, event_buffer=10_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(serve_qmp, path, make_registry(), FakeBackend(), bus, config=config)
        )
        reader = await LineClient.open(path)
        stuck = await LineClient.open(path)
        await reader.negotiate()
        await stuck.negotiate()
        # stuck never reads: fill its socket buffer and part of its queue
        for i in range(2000):
            bus.emit("FILL", {"i": i, "pad": "q" * 200})
            if i % 100 == 99:
                for _ in range(100):
                    await reader.recv()
        assert "dropped" not in caplog.text
        bus.emit("SHUTDOWN", {"guest": False})
        start = trio.current_time()
        nursery.cancel_scope.cancel()  # no checkpoint between the emit and the cancel
    # the stuck client got its grace period, and no more
    assert 0.4 < trio.current_time() - start < 5
    assert not os.path.exists(path)
    msg = await reader.recv()
    assert msg["event"] == "SHUTDOWN"  # emitted just before the stop, still delivered
    await reader.expect_eof()
    await reader.aclose()
    await stuck.aclose()


# --- the socket file ------------------------------------------------------------------


async def test_socket_file_mode_stale_live_and_cleanup(sockdir: str) -> None:
    path = sock_path(sockdir)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # leaves a socket file nobody listens on
    old = os.umask(0)
    try:
        async with serving(path):
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            with pytest.raises(VdiskError, match="another server is listening"):
                await serve_qmp(path, make_registry(), FakeBackend(), EventBus())
            c = await LineClient.open(path)  # the first server still works
            await c.negotiate()
            await c.aclose()
    finally:
        os.umask(old)
    assert not os.path.exists(path)  # removed on exit
    with open(path, "w") as f:
        f.write("not a socket")
    with pytest.raises(VdiskError, match="not a socket"):
        await serve_qmp(path, make_registry(), FakeBackend(), EventBus())
    assert os.path.isfile(path)


async def test_other_uid_is_refused(sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    os.chmod(sockdir, 0o755)
    path = sock_path(sockdir)
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.settimeout(5)\n"
        "s.connect(sys.argv[1])\n"
        "data = b''\n"
        "while True:\n"
        "    chunk = s.recv(4096)\n"
        "    if not chunk: break\n"
        "    data += chunk\n"
        "print(repr(data))\n"
    )
    async with serving(path):
        os.chmod(path, 0o666)  # let the kernel allow the connect: only SO_PEERCRED refuses
        proc = await trio.to_thread.run_sync(
            partial(
                subprocess.run, ["/usr/bin/python3", "-c", code, path],
                capture_output=True, text=True, user=65534, group=65534, timeout=20,
            )
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "b''"  # closed without a greeting
        assert "refused client" in caplog.text and "uid 65534" in caplog.text
        c = await LineClient.open(path)
        await c.negotiate()
        await c.aclose()


# --- qemu.qmp clients and the CLI, with real images ------------------------------------


@pytest.fixture
def images(sockdir: str) -> dict[str, str]:
    d = sockdir
    base, mid, top = (os.path.join(d, n) for n in ("base.raw", "mid.qcow2", "top.qcow2"))
    qemu_img("create", "-q", "-f", "raw", base, "4M")
    qemu_io(base, "write -P 0x11 0 64k", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid)
    qemu_io(mid, "write -P 0x22 64k 64k", fmt="qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, "8M")
    return {"base": base, "mid": mid, "top": top}


class ThreadServer:
    """serve_qmp in a trio run on a background thread, for the (sync/asyncio) qemu.qmp clients."""

    def __init__(self, path: str, backend: FakeBackend, registry: Registry | None = None) -> None:
        self.path = path
        self.backend = backend
        self.registry = registry or make_registry()
        self.bus = EventBus()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(
                        serve_qmp, self.path, self.registry, self.backend, self.bus
                    )
                    self._ready.set()
        except BaseException as e:
            self._error = e
            self._ready.set()

    def emit(self, name: str, data: dict[str, Any]) -> None:
        trio.from_thread.run_sync(self.bus.emit, name, data, trio_token=self._token)

    def __enter__(self) -> ThreadServer:
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._scope is not None
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)


def check_image_chain(image: dict[str, Any], oracle: list[dict[str, Any]]) -> None:
    """The nested ImageInfo equals `qemu-img info --backing-chain` layer by layer."""
    for layer in oracle:
        for key in ("filename", "format", "virtual-size", "cluster-size"):
            assert image.get(key) == layer.get(key), (key, image, layer)
        assert image.get("backing-filename") == layer.get("backing-filename")
        nested = image.get("backing-image")
        if layer is oracle[-1]:
            assert nested is None
        else:
            assert isinstance(nested, dict)
            image = nested


def test_qemu_qmp_legacy_client(sockdir: str, images: dict[str, str]) -> None:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    top = open_chain(images["top"], read_only=True)
    base = open_chain(images["base"], read_only=True)
    try:
        backend = FakeBackend({"drive0": FakeDrive("drive0", top, False),
                               "drive1": FakeDrive("drive1", base, True)})
        with ThreadServer(sock_path(sockdir), backend):
            qmp = QEMUMonitorProtocol(sock_path(sockdir))
            try:
                greeting = qmp.connect(negotiate=True)
                assert greeting["QMP"]["version"] == version_info()
                names = {c["name"] for c in qmp.cmd("query-commands")}
                assert {"qmp_capabilities", "query-commands", "query-version", "quit",
                        "query-block"} <= names
                assert qmp.cmd("query-version") == version_info()
                blocks = qmp.cmd("query-block")
                assert [b["device"] for b in blocks] == ["drive0", "drive1"]
                b0, b1 = blocks
                for b in blocks:
                    assert b["locked"] is False and b["removable"] is False
                    assert "tray_open" not in b
                ins = b0["inserted"]
                assert ins["file"] == images["top"] and ins["drv"] == "qcow2"
                assert ins["ro"] is False
                assert ins["backing_file"] == images["mid"]  # as QEMU: the opened file
                assert ins["backing_file_depth"] == 2
                oracle = qemu_info(images["top"], "-U", "--backing-chain")
                check_image_chain(ins["image"], oracle)
                ins1 = b1["inserted"]
                assert ins1["file"] == images["base"] and ins1["drv"] == "raw"
                assert ins1["ro"] is True and ins1["backing_file_depth"] == 0
                assert "backing_file" not in ins1
                oracle = qemu_info(images["base"], "-U")
                check_image_chain(ins1["image"], [oracle])
                reply = qmp.cmd_obj({"execute": "query-block", "arguments": {"x": 1}})
                assert reply["error"]["desc"] == "Parameter 'x' is unexpected"
                assert qmp.cmd("quit") == {}
            finally:
                qmp.close()
        assert backend.quit_requests == 1
    finally:
        close_chain(top)
        close_chain(base)


def test_qemu_qmp_async_clients_get_events(sockdir: str) -> None:
    from qemu.qmp import QMPClient
    from qemu.qmp.qmp_client import ExecuteError

    with ThreadServer(sock_path(sockdir), FakeBackend()) as server:

        async def scenario() -> None:
            a, b = QMPClient("a"), QMPClient("b")
            await a.connect(sock_path(sockdir))
            await b.connect(sock_path(sockdir))
            try:
                assert await a.execute("query-version") == version_info()
                with pytest.raises(ExecuteError) as ei:
                    await a.execute("query-version", {"nope": True})
                assert ei.value.error_class == "GenericError"
                with a.listener() as la, b.listener() as lb:
                    server.emit("VDISK_TEST", {"n": 1})
                    server.emit("VDISK_TEST", {"n": 2})
                    for listener in (la, lb):
                        for n in (1, 2):
                            ev = await asyncio.wait_for(listener.get(), 5)
                            assert ev["event"] == "VDISK_TEST" and ev["data"] == {"n": n}
                            ts = ev["timestamp"]
                            assert isinstance(ts["seconds"], int) and ts["seconds"] > 1.6e9
                            assert 0 <= ts["microseconds"] < 1_000_000
                assert await b.execute("query-block") == []
            finally:
                await a.disconnect()
                await b.disconnect()

        asyncio.run(scenario())


# --- the CLI --------------------------------------------------------------------------


def test_parse_arguments() -> None:
    assert parse_arguments(["a=5", "b=drive0", "c=true", "d=[1,\"x\"]", "e=", "f=a=b"]) == {
        "a": 5, "b": "drive0", "c": True, "d": [1, "x"], "e": "", "f": "a=b",
    }
    with pytest.raises(VdiskError):
        parse_arguments(["novalue"])
    with pytest.raises(VdiskError):
        parse_arguments(["a=1", "a=2"])


@pytest.mark.slow
def test_cli(sockdir: str) -> None:
    registry = make_registry()

    async def echo(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        return args

    async def fail(ctx: Context, args: dict[str, Any]) -> None:
        raise QMPError("DeviceNotFound", "Device 'x' not found")

    async def emit(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        ctx.events.emit("OTHER", {})
        ctx.events.emit("X_DONE", {"k": args["k"]})
        return {}

    registry.add("x-echo", {"*a": "any", "*b": "any"}, echo)
    registry.add("x-fail", None, fail)
    registry.add("x-emit", {"k": "int"}, emit)
    path = sock_path(sockdir)
    with ThreadServer(path, FakeBackend(), registry):
        out = vdisk("qmp", path, "query-version", check=False, timeout=30)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == version_info()
        out = vdisk("qmp", "--compact", path, "x-echo", "a=5", "b=drive0", check=False, timeout=30)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"a": 5, "b": "drive0"}
        out = vdisk("qmp", "--compact", "--wait-event", "X_DONE", path, "x-emit", "k=7",
                    check=False, timeout=30)
        assert out.returncode == 0, out.stderr
        ret, event = (json.loads(line) for line in out.stdout.splitlines())
        assert ret == {} and event["event"] == "X_DONE" and event["data"] == {"k": 7}
        out = vdisk("qmp", "--wait-event", "NEVER", "--timeout", "0.5", path, "x-emit", "k=1",
                    check=False, timeout=30)
        assert out.returncode == 1
        assert out.stderr == f"vdisk: {path}: timed out waiting for event NEVER\n"
        out = vdisk("qmp", path, "x-fail", check=False, timeout=30)
        assert out.returncode == 1
        assert out.stderr == "vdisk: DeviceNotFound: Device 'x' not found\n"
        out = vdisk("qmp", path, "query-version", "speed=1", check=False, timeout=30)
        assert out.returncode == 1
        assert out.stderr == "vdisk: GenericError: Parameter 'speed' is unexpected\n"
    out = vdisk("qmp", path, "query-version", check=False, timeout=30)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"vdisk: {path}: ")
