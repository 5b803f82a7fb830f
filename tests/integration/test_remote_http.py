"""HttpSource against a real nginx that the tests start on 127.0.0.1: range reads, the
keep-alive pool under several threads, redirects, auth and cookies, HTTPS verified
against a CA made here, the start-up errors, and retries across a server restart."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.nginx import PASSWORD, USER, Nginx, make_ca
from vdisk.engine.remote import open_source
from vdisk.engine.remote.http import POOL_SIZE, HttpSource
from vdisk.engine.remote.url import SourceSpec, parse
from vdisk.errors import ImageError

SIZE = 3 * 1024 * 1024 + 777  # not a multiple of anything


@pytest.fixture
def data(tmp_path: Path) -> bytes:
    d = tmp_path / "root"
    d.mkdir()
    blob = os.urandom(SIZE)
    (d / "base.raw").write_bytes(blob)
    return blob


@pytest.fixture
def server(tmp_path: Path, data: bytes) -> Iterator[Nginx]:
    with Nginx(tmp_path, tmp_path / "root") as n:
        yield n


def _open(url: str, **kw: object) -> HttpSource:
    spec = parse(url)
    if kw:
        spec = SourceSpec(**{**spec.__dict__, **kw})
    src = open_source(spec, connect_timeout=2.0)
    assert isinstance(src, HttpSource)
    return src


def test_range_reads_match_the_file(server: Nginx, data: bytes) -> None:
    src = _open(server.url("img/base.raw"))
    try:
        assert src.size == SIZE and src.url == server.url("img/base.raw")
        for off, n in [(0, 512), (1, 1), (65536, 1 << 20), (SIZE - 100, 100),
                       (SIZE - 10, 4096), (12345, 70000)]:
            got = src.pread(n, off)
            want = data[off:off + n]
            assert got == want + bytes(n - len(want))
        assert src.pread(4096, SIZE + 4096) == bytes(4096)  # past the end: zeroes, no request
        assert src.block_status(0, 4096) is None
    finally:
        src.close()


def test_small_reads_are_served_from_readahead(server: Nginx, data: bytes) -> None:
    src = _open(server.url("img/base.raw"))
    try:
        before = src.requests
        for off in range(1 << 20, (1 << 20) + (128 << 10), 4096):  # 32 small reads
            assert src.pread(4096, off) == data[off:off + 4096]
        assert src.requests - before == 1  # readahead (256 KiB) covered all of them
    finally:
        src.close()


def test_threads_share_the_keepalive_pool(server: Nginx, data: bytes) -> None:
    src = _open(server.url("img/base.raw"), readahead=0)
    bad: list[str] = []

    def reader(seed: int) -> None:
        for i in range(40):
            off = (seed * 7919 + i * 65537) % (SIZE - 8192)
            if src.pread(8192, off) != data[off:off + 8192]:
                bad.append(f"{seed}:{off}")

    try:
        threads = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        src.close()
    assert bad == []
    lines = server.requests()
    assert len(lines) >= 200  # (the open's first 64 KiB served a few reads)
    # kept alive: at most POOL_SIZE connections carried them ($connection: nginx's serial)
    assert len({line.split()[0] for line in lines}) <= POOL_SIZE


def test_redirect_is_followed(server: Nginx, data: bytes) -> None:
    src = _open(server.url("moved/base.raw"))
    try:
        assert src.pread(1000, 5000) == data[5000:6000]
    finally:
        src.close()


def test_basic_auth_from_the_url_and_no_credentials_in_errors(server: Nginx, data: bytes,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ImageError) as e:
        _open(server.url("auth/base.raw"))
    assert "HTTP 401" in str(e.value)
    with pytest.raises(ImageError) as e:
        _open(server.url("auth/base.raw", f"{USER}:wrong-{PASSWORD}"))
    assert "HTTP 401" in str(e.value) and PASSWORD not in str(e.value)
    src = _open(server.url("auth/base.raw", f"{USER}:{PASSWORD}"))
    try:
        assert src.url == server.url("auth/base.raw")
        assert src.pread(4096, 8192) == data[8192:12288]
    finally:
        src.close()
    assert PASSWORD not in caplog.text


def test_cookie(server: Nginx, data: bytes) -> None:
    with pytest.raises(ImageError, match="HTTP 403"):
        _open(server.url("cookie/base.raw"))
    src = _open(server.url("cookie/base.raw"), cookie="sid=42")
    try:
        assert src.pread(10, 0) == data[:10]
    finally:
        src.close()


@pytest.mark.parametrize(("path", "reason"), [
    ("img/missing.raw", "HTTP 404 Not Found"),
    ("norange/base.raw", "does not support range requests"),
])
def test_startup_errors(server: Nginx, path: str, reason: str) -> None:
    with pytest.raises(ImageError) as e:
        _open(server.url(path))
    assert e.value.path == server.url(path) and reason in e.value.reason


def test_refused_and_silent_hosts(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageError, match="cannot connect: .*[Cc]onnection refused"):
        _open(f"http://127.0.0.1:{port}/x")
    with socket.socket() as silent:  # accepts (in the kernel), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        t = time.monotonic()
        with pytest.raises(ImageError, match="does not answer"):
            open_source(parse(f"http://127.0.0.1:{silent.getsockname()[1]}/x"),
                        connect_timeout=0.5)
        assert time.monotonic() - t < 3


@pytest.mark.slow
def test_https_verifies_against_the_ca_file(tmp_path: Path, data: bytes) -> None:
    ca, cert, key = make_ca(tmp_path / "pki")
    with Nginx(tmp_path, tmp_path / "root", tls=(cert, key)) as n:
        url = n.url("img/base.raw")
        with pytest.raises(ImageError) as e:
            _open(url)  # the system store does not know our CA
        assert "certificate does not verify" in e.value.reason and e.value.path == url
        src = _open(url, ca_file=str(ca))
        try:
            assert src.pread(65536, 100000) == data[100000:165536]
        finally:
            src.close()


@pytest.mark.slow
def test_sslverify_off_is_logged(tmp_path: Path, data: bytes,
                                 caplog: pytest.LogCaptureFixture) -> None:
    _, cert, key = make_ca(tmp_path / "pki")
    with Nginx(tmp_path, tmp_path / "root", tls=(cert, key)) as n:
        src = _open(n.url("img/base.raw"), sslverify=False)
        try:
            assert src.pread(100, 0) == data[:100]
        finally:
            src.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("verification is off" in r.getMessage() for r in warnings)


def test_5xx_is_retried_then_fails_with_eio(server: Nginx) -> None:
    src = _open(server.url("flaky/base.raw"), timeout=1.0)
    try:
        before = len(server.requests())
        t = time.monotonic()
        with pytest.raises(OSError) as e:
            src.pread(4096, 1 << 20)
        spent = time.monotonic() - t
        assert e.value.errno == errno.EIO
        assert e.value.strerror.startswith(server.url("flaky/base.raw") + ": HTTP 503")
        assert 0.5 < spent < 3.0
        assert len(server.requests()) - before >= 3  # retried with backoff
    finally:
        src.close()


@pytest.mark.slow
def test_a_read_survives_a_server_restart(server: Nginx, data: bytes) -> None:
    src = _open(server.url("img/base.raw"), timeout=10.0, readahead=0)
    try:
        assert src.pread(100, 0) == data[:100]  # a kept-alive connection now exists
        server.stop()
        threading.Timer(0.7, server.start).start()
        t = time.monotonic()
        assert src.pread(1 << 20, 1 << 20) == data[1 << 20:2 << 20]
        assert time.monotonic() - t >= 0.6
    finally:
        src.close()


def test_a_dead_server_fails_within_the_deadline(server: Nginx) -> None:
    src = _open(server.url("img/base.raw"), timeout=1.0, readahead=0)
    try:
        server.stop()
        t = time.monotonic()
        with pytest.raises(OSError) as e:
            src.pread(4096, 1 << 20)  # (not within the first 64 KiB: the open read them)
        assert e.value.errno in (errno.EIO, errno.ETIMEDOUT)
        assert server.url("img/base.raw") in str(e.value) and "gave up" in str(e.value)
        assert time.monotonic() - t < 2.5
    finally:
        src.close()


def _random_reads(src: HttpSource, data: bytes, seed: int, count: int) -> list[str]:
    """count random ranges (some past the end) through pread and pread_into: the bad ones."""
    import random

    rnd = random.Random(seed)
    bad: list[str] = []
    for i in range(count):
        n = rnd.choice([1, 511, 4096, 65536 + 3, 300_000, 1 << 20, (2 << 20) + 5])
        off = rnd.randrange(0, SIZE + 4096)
        want = data[off:off + n]
        want += bytes(n - len(want))
        if i % 2:
            got = src.pread(n, off)
        else:
            buf = bytearray(b"\xaa" * n)
            src.pread_into(memoryview(buf), off)
            got = bytes(buf)
        if got != want:
            bad.append(f"{seed}:{off}+{n}")
    return bad


def _in_threads(src: HttpSource, data: bytes, threads: int, count: int) -> list[str]:
    bad: list[str] = []

    def reader(seed: int) -> None:
        bad.extend(_random_reads(src, data, seed, count))

    workers = [threading.Thread(target=reader, args=(s,)) for s in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return bad


def test_random_ranges_in_threads_equal_the_file(server: Nginx, data: bytes) -> None:
    src = _open(server.url("img/base.raw"))
    try:
        assert _in_threads(src, data, threads=12, count=40) == []
    finally:
        src.close()
    lines = server.requests()
    assert all(" 206 " in line for line in lines)
    # the reads went over at most POOL_SIZE kept-alive connections (plus the open's)
    assert len({line.split()[0] for line in lines}) <= POOL_SIZE + 1 < len(lines)


class _CutRelay:
    """A TCP relay in front of nginx: once armed, the next connection passes `cut` bytes
    of the server's answer, sets `paused`, and is dropped when `go` is set (what a client
    sees when the server dies in the middle of a body). Other connections pass whole."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut: int | None = None
        self.paused, self.go = threading.Event(), threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            cut, self.cut = self.cut, None
            threading.Thread(target=self._serve, args=(client, cut), daemon=True).start()

    def _serve(self, client: socket.socket, cut: int | None) -> None:
        try:
            up = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pipe, args=(client, up, None), daemon=True).start()
        self._pipe(up, client, cut)

    def _pipe(self, src: socket.socket, dst: socket.socket, cut: int | None) -> None:
        sent = 0
        try:
            while cut is None or sent < cut:
                chunk = src.recv(65536 if cut is None else min(65536, cut - sent))
                if not chunk:
                    break
                dst.sendall(chunk)
                sent += len(chunk)
            if cut is not None:
                self.paused.set()
                self.go.wait(10)
        except OSError:
            pass
        finally:  # shut down first: the other direction's thread holds them in recv
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.slow
def test_a_server_restart_in_the_middle_of_a_body_is_retried(server: Nginx,
                                                             data: bytes) -> None:
    relay = _CutRelay(server.port)
    src = _open(f"http://127.0.0.1:{relay.port}/img/base.raw", timeout=10.0, readahead=0)

    def restart() -> None:
        relay.paused.wait(10)
        server.stop()  # nginx dies with the body half sent
        relay.go.set()
        time.sleep(0.5)
        server.start()

    try:
        relay.cut = 300_000  # the answer's head and part of its body
        helper = threading.Thread(target=restart)
        helper.start()
        t = time.monotonic()
        buf = bytearray(2 << 20)
        src.pread_into(memoryview(buf), 1 << 20)
        helper.join()
        assert relay.paused.is_set() and time.monotonic() - t >= 0.4
        assert bytes(buf) == data[1 << 20:3 << 20]
        assert src.requests >= 2
    finally:
        src.close()
        relay.close()


@pytest.mark.slow
def test_https_reads_in_threads_over_the_pool(tmp_path: Path, data: bytes) -> None:
    ca, cert, key = make_ca(tmp_path / "pki")
    with Nginx(tmp_path, tmp_path / "root", tls=(cert, key)) as n:
        src = _open(n.url("moved/base.raw"), ca_file=str(ca))  # redirected, then TLS reads
        try:
            assert _in_threads(src, data, threads=6, count=15) == []
        finally:
            src.close()
        lines = n.requests()
    assert sum(" 206 " in line for line in lines) >= 60
    assert len({line.split()[0] for line in lines}) <= POOL_SIZE + 1
