"""Remote bases (issue 11): vdisk and qemu-storage-daemon on the same servers.

- a stream of a qcow2 overlay whose base is served over NBD by nbdkit with its delay
  filter (every read answered after DELAY_MS);
- a stream of an overlay whose base is served over HTTP by nginx on loopback;
- the first-touch copy-on-read of that HTTP base, read sequentially by fio;
- RSS after the stream.
The servers are started here and stopped after; every result is compared with the base.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_lib.chain import Chain, random_file
from bench_lib.fio import Job, run_fio
from bench_lib.sides import SIDES
from tests.helpers.commands import qemu_img, run
from tests.helpers.polling import wait_until

MiB = 1 << 20
REMOTE_SIZE = 256 * MiB
DELAY_MS = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def nbdkit(image: Path, sock: Path, delay_ms: int) -> Iterator[str]:
    """nbdkit serving image read-only on a UNIX socket, each read delayed; yields the URL."""
    proc = subprocess.Popen(["nbdkit", "--foreground", "--readonly", "--unix", str(sock),
                             "--filter=delay", "file", str(image), f"rdelay={delay_ms}ms"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, timeout=20)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        _end(proc)


@contextmanager
def nginx(root: Path, work: Path) -> Iterator[str]:
    """nginx serving root on 127.0.0.1 (range requests, keep-alive); yields its base URL."""
    port = _free_port()
    prefix = work / "nginx"
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""daemon off;
master_process off;  # one process, as the caller: it can read the caller's 0700 folders
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf)],
                            stdin=subprocess.DEVNULL)

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_until(up, timeout=20)
        yield f"http://127.0.0.1:{port}"
    finally:
        _end(proc)


def make_base(dir: Path, size: int) -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    return random_file(dir / "base.raw", size)


def overlay(dir: Path, url: str, base: Path, size: int) -> Chain:
    """An empty qcow2 top over the remote base; expected.raw is the base itself."""
    dir.mkdir(parents=True, exist_ok=True)
    chain = Chain(dir, size)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", url, "-F", "raw", chain.top, size)
    os.symlink(base, chain.expected)
    return chain


def _same(chain: Chain, what: str) -> None:
    res = run("qemu-img", "compare", "-q", "-F", "raw", chain.top, chain.expected,
              check=False, timeout=None)
    if res.returncode != 0:
        raise RuntimeError(f"{what}: the top differs from the base")


def stream_remote(name: str, chain: Chain, timeout: float) -> dict[str, float]:
    """One unthrottled stream of chain on side name: seconds, RSS after; checked."""
    from bench_lib.runner import start_stream, wait_stream

    with SIDES[name](chain, chain.dir, streamable=True) as side:
        client = side.qmp()
        try:
            t0 = time.monotonic()
            start_stream(side, client)
            wait_stream(client, timeout=timeout)
            took = time.monotonic() - t0
        finally:
            client.close()
        time.sleep(0.5)
        rss = side.memory()["VmRSS"] / MiB
    info = qemu_img("info", "--output=json", chain.top)
    if '"backing-filename"' in info:
        raise RuntimeError(f"{name}: the top still has a backing file after the stream")
    _same(chain, f"{name} stream")
    return {"s": took, "rss_mib": rss}


def cor_remote(name: str, chain: Chain, log: Path | None) -> float:
    """First-touch sequential 1 MiB read with copy-on-read on: MiB/s."""
    with SIDES[name](chain, chain.dir, copy_on_read=True) as side:
        out = run_fio(side.file, Job("remote_cor_read_1m", "read", "1M", timed=False),
                      runtime=0, ramp=0, log=log)
    return float(out["read"]["bw"]) / MiB


def run_remote(work: Path, say: Any, log: Path | None, size: int = REMOTE_SIZE
               ) -> dict[str, dict[str, float]]:
    """Every remote figure on both sides: results[side][figure]."""
    results: dict[str, dict[str, float]] = {name: {} for name in SIDES}
    base = make_base(work / "remote-base", size)
    timeout = 600.0
    with nbdkit(base, work / "nbd.sock", DELAY_MS) as url:
        for name in SIDES:
            say(f"{name}: stream over NBD, {DELAY_MS} ms a read")
            r = stream_remote(name, overlay(work / f"nbd-{name}", url, base, size), timeout)
            results[name]["nbd_stream_s"] = r["s"]
            results[name]["rss_after_remote_stream_mib"] = r["rss_mib"]
    with nginx(base.parent, work) as web:
        url = f"{web}/{base.name}"
        for name in SIDES:
            say(f"{name}: stream over HTTP (nginx, loopback)")
            r = stream_remote(name, overlay(work / f"http-{name}", url, base, size), timeout)
            results[name]["http_stream_s"] = r["s"]
            say(f"{name}: copy-on-read first touch over HTTP")
            chain = overlay(work / f"httpcor-{name}", url, base, size)
            results[name]["http_cor_read_mbps"] = cor_remote(name, chain, log)
    return results
