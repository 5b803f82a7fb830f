"""nginx on 127.0.0.1 for the remote-image tests: a config in the test's folder, one
process (master_process off), stopped and restarted by the test; and a self-signed CA
made with openssl for HTTPS.

Locations served (under the document root `root`):
  /img/...     the files, with range requests (nginx's default)
  /norange/... the same files with range support off (max_ranges 0: 200 OK, whole file)
  /flaky/...   a range request that does not start at 0 gets 503 (the open works, reads
               fail), for the retry paths
  /auth/...    basic auth: user `alice`, password `s3cret`
  /cookie/...  only with the cookie sid=42, else 403
  /moved/X     302 to /img/X
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers.commands import run

USER, PASSWORD = "alice", "s3cret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_ca(d: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a CA and a server certificate for 127.0.0.1."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("openssl", "req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.pem",
        "-days", "2", "-subj", "/CN=vdisk test CA")
    run("openssl", "req", *ec, "-keyout", d / "server.key", "-out", d / "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", d / "server.csr", "-CA", d / "ca.pem", "-CAkey",
        d / "ca.key", "-CAcreateserial", "-out", d / "server.pem", "-days", "2",
        "-extfile", d / "ext.cnf")
    return d / "ca.pem", d / "server.pem", d / "server.key"


class Nginx:
    """One nginx serving root; .url(path) is its URL. A context manager: stops it."""

    def __init__(self, tmp: Path, root: Path, *, tls: tuple[Path, Path] | None = None) -> None:
        self.dir = tmp / f"nginx-{free_port()}"
        self.dir.mkdir()
        self.root = root
        self.port = free_port()
        self.scheme = "https" if tls else "http"
        htpasswd = self.dir / "htpasswd"
        hashed = run("openssl", "passwd", "-apr1", PASSWORD).stdout.strip()
        htpasswd.write_text(f"{USER}:{hashed}\n")
        ssl = ""
        if tls:
            ssl = f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};"
        (self.dir / "nginx.conf").write_text(f"""
daemon off; master_process off; worker_processes 1;
error_log {self.dir}/error.log warn; pid {self.dir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
  log_format vdisk '$connection $connection_requests "$request" $status $body_bytes_sent';
  access_log {self.dir}/access.log vdisk;
  client_body_temp_path {self.dir}/body; proxy_temp_path {self.dir}/proxy;
  fastcgi_temp_path {self.dir}/fcgi; uwsgi_temp_path {self.dir}/uwsgi;
  scgi_temp_path {self.dir}/scgi;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{self.port} {"ssl" if tls else ""}; {ssl}
    keepalive_requests 10000;
    location /img/ {{ alias {root}/; }}
    location /norange/ {{ alias {root}/; max_ranges 0; }}
    location /flaky/ {{ alias {root}/; if ($http_range !~ "^bytes=0-") {{ return 503; }} }}
    location /auth/ {{ alias {root}/; auth_basic "vdisk"; auth_basic_user_file {htpasswd}; }}
    location /cookie/ {{ alias {root}/; if ($cookie_sid != "42") {{ return 403; }} }}
    location /moved/ {{ rewrite ^/moved/(.*)$ /img/$1 redirect; }}
  }}
}}
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def url(self, path: str, userinfo: str = "") -> str:
        at = f"{userinfo}@" if userinfo else ""
        return f"{self.scheme}://{at}127.0.0.1:{self.port}/{path.lstrip('/')}"

    def start(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen([nginx, "-c", str(self.dir / "nginx.conf"), "-p",
                                      str(self.dir)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"nginx exited: {err}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("nginx did not start listening")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    def requests(self) -> list[str]:
        """The access log's lines: connection serial, its request count, request, status,
        body bytes."""
        log = self.dir / "access.log"
        return log.read_text().splitlines() if log.exists() else []

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
