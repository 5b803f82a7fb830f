"""query-blockstats and the Prometheus endpoint (`serve --metrics`): the counts are those
of a known workload sent through FUSE with O_DIRECT (one FUSE request per call), the
shape is qemu-storage-daemon 7.2's, and a real HTTP client scrapes the endpoint."""

from __future__ import annotations

import http.client
import mmap
import os
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.chains import make_chain
from tests.helpers.daemon import run_serve, serving
from tests.helpers.qmp import qmp_session
from tests.helpers.qsd import needs_qsd, qsd_chain

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def workload(path: Path) -> dict[str, int]:
    """5 reads of 4 KiB, 3 writes of 8 KiB (the last ending at 6M+8K), a punch-hole of
    64 KiB, an fsync, all O_DIRECT; the counts query-blockstats must show."""
    buf = mmap.mmap(-1, 8192)  # page-aligned, as O_DIRECT wants
    buf.write(b"\x42" * 8192)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        for i in range(5):
            assert os.preadv(fd, [memoryview(buf)[:4096]], i * 65536) == 4096
        for off in (0, 2 << 20, 6 << 20):
            assert os.pwritev(fd, [buf], off) == 8192
        libc_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1 << 20, 65536)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"rd_operations": 5, "rd_bytes": 5 * 4096, "wr_operations": 3,
            "wr_bytes": 3 * 8192, "unmap_operations": 1, "unmap_bytes": 65536,
            "flush_operations": 1, "wr_highest_offset": (6 << 20) + 8192}


def libc_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, mode, offset, length) != 0:
        raise OSError(ctypes.get_errno(), "fallocate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keyset(entry: dict[str, Any]) -> Any:
    """The keys of a BlockStats entry, nested ones too (idle_time_ns left out: QEMU has it
    only once a request was done)."""
    out = {}
    for k, v in entry.items():
        if k == "idle_time_ns":
            continue
        out[k] = keyset(v) if isinstance(v, dict) else type(v).__name__
    return out


def test_counts_of_a_known_workload(tmp_path: Path) -> None:
    chain = make_chain(tmp_path)
    with serving(tmp_path, f"id=d0,file={chain['top']},node-name=top") as srv, \
            qmp_session(srv.qmp_path) as q:
        start = q.ok("query-blockstats")[0]["stats"]
        assert all(start[k] == 0 for k in ("rd_operations", "wr_operations",
                                           "flush_operations", "unmap_operations"))
        assert "idle_time_ns" not in start
        t0 = time.monotonic_ns()
        want = workload(srv.path("d0"))
        wall = time.monotonic_ns() - t0
        [entry] = q.ok("query-blockstats")
        time.sleep(0.05)
        later = q.ok("query-blockstats")[0]["stats"]
    stats = entry["stats"]
    assert {k: stats[k] for k in want} == want
    for kind in ("rd", "wr", "flush", "unmap"):
        assert 0 < stats[f"{kind}_total_time_ns"] < wall
    assert later["idle_time_ns"] >= stats["idle_time_ns"] + 40_000_000
    assert entry["device"] == "d0" and entry["node-name"] == "top"
    assert entry["parent"]["node-name"] == "#d0.0.file"
    assert entry["backing"]["node-name"] == "#d0.1"
    assert entry["backing"]["backing"]["node-name"] == "#d0.2"
    assert "backing" not in entry["backing"]["backing"]


@needs_qsd
def test_shape_like_qsd(tmp_path: Path) -> None:
    """query-nodes=true lists the same nodes with the same keys as qemu-storage-daemon;
    a drive's entry has the keys of a node's plus device (QEMU's BlockStats)."""
    chain = make_chain(tmp_path)
    with qsd_chain(tmp_path, chain["top"]) as sock, qmp_session(sock) as q:
        want = q.ok("query-blockstats", **{"query-nodes": True})
        assert q.ok("query-blockstats") == []  # qsd has no drives, only nodes
    with serving(tmp_path, f"id=d0,file={chain['top']},node-name=top") as srv, \
            qmp_session(srv.qmp_path) as q:
        workload(srv.path("d0"))
        got = q.ok("query-blockstats", **{"query-nodes": True})
        [drive] = q.ok("query-blockstats")
    assert [keyset(e) for e in got] == [keyset(e) for e in want]
    top = next(e for e in got if e["node-name"] == "top")
    node_keys = keyset(top)
    assert set(keyset(drive)) == set(node_keys) | {"device", "backing"}
    assert keyset(drive["stats"]) == node_keys["stats"]
    # the nodes count nothing themselves, as in QEMU; the top keeps wr_highest_offset
    assert all(e["stats"]["rd_operations"] == 0 for e in got)
    assert top["stats"]["wr_highest_offset"] == drive["stats"]["wr_highest_offset"] > 0


def scrape_tcp(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return str(r.read().decode())


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(self.unix_path)


def scrape_unix(path: Path) -> str:
    conn = UnixHTTPConnection(str(path))
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        assert r.status == 200
        return r.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels["drive"]): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_metrics_endpoint(tmp_path: Path, kind: str) -> None:
    chain = make_chain(tmp_path)
    port = free_port()
    addr = f"127.0.0.1:{port}" if kind == "tcp" else str(tmp_path / "metrics.sock")
    with serving(tmp_path, f"id=d0,file={chain['top']}", extra=["--metrics", addr]) as srv, \
            qmp_session(srv.qmp_path) as q:
        scrape = (lambda: scrape_tcp(port)) if kind == "tcp" else (
            lambda: scrape_unix(tmp_path / "metrics.sock"))
        assert samples(scrape())[("vdisk_read_operations_total", "d0")] == 0
        workload(srv.path("d0"))
        got = samples(scrape())
        stats = q.ok("query-blockstats")[0]["stats"]
        if kind == "unix":
            assert (tmp_path / "metrics.sock").stat().st_mode & 0o777 == 0o600
    for name, key in [("vdisk_read_bytes_total", "rd_bytes"),
                      ("vdisk_written_bytes_total", "wr_bytes"),
                      ("vdisk_discarded_bytes_total", "unmap_bytes"),
                      ("vdisk_read_operations_total", "rd_operations"),
                      ("vdisk_write_operations_total", "wr_operations"),
                      ("vdisk_flush_operations_total", "flush_operations"),
                      ("vdisk_discard_operations_total", "unmap_operations"),
                      ("vdisk_write_highest_offset_bytes", "wr_highest_offset")]:
        assert got[(name, "d0")] == stats[key], name
    assert got[("vdisk_read_seconds_total", "d0")] == pytest.approx(
        stats["rd_total_time_ns"] / 1e9)
    assert stats["rd_operations"] == 5
    assert not (tmp_path / "metrics.sock").exists()  # removed on stop


def test_metrics_never_block_the_loop(tmp_path: Path) -> None:
    """A client that connects and sends half a request holds nothing up: QMP answers and
    another scrape is served meanwhile."""
    chain = make_chain(tmp_path)
    port = free_port()
    with serving(tmp_path, f"id=d0,file={chain['top']}",
                 extra=["--metrics", f"127.0.0.1:{port}"]) as srv:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stuck:
            stuck.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line yet
            t0 = time.monotonic()
            assert srv.qmp("query-version")["qemu"]["major"] == 7
            assert "vdisk_read_bytes_total" in scrape_tcp(port)
            assert time.monotonic() - t0 < 5
            stuck.sendall(b"\r\n")
            assert stuck.recv(100).startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize("addr, message", [
    ("nohost", "--metrics nohost: expected HOST:PORT"),
    ("127.0.0.1:99999", "--metrics 127.0.0.1:99999: expected HOST:PORT"),
])
def test_bad_metrics_address(tmp_path: Path, addr: str, message: str) -> None:
    chain = make_chain(tmp_path)
    res = run_serve(tmp_path, ["--mount", str(tmp_path / "mnt"), "--qmp",
                               str(tmp_path / "q.sock"), "--metrics", addr,
                               "--drive", f"id=d0,file={chain['top']}"])
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"vdisk: {message} (e.g. 127.0.0.1:9101) "
                                               "or a UNIX socket path"]


def test_metrics_port_taken(tmp_path: Path) -> None:
    chain = make_chain(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run_serve(tmp_path, ["--mount", str(tmp_path / "mnt"), "--qmp",
                                   str(tmp_path / "q.sock"), "--metrics", f"127.0.0.1:{port}",
                                   "--drive", f"id=d0,file={chain['top']}"])
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert f"--metrics 127.0.0.1:{port}: cannot listen" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "mnt").exists()

