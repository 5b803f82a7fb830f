"""HttpSource: a remote image read with HTTP range requests (the RemoteSource of http://
and https:// URLs).

The open uses httpx's synchronous Client: redirects, auth, cookies, per-phase timeouts,
the checks of range support. TLS uses an ssl context of our own: the system CA store (not
certifi's bundle), or the CA file the spec names; sslverify=off is explicit and logged.
The data reads then go over keep-alive connections of our own to the final URL, with the
headers httpx sent last (http_conn.py: recv_into into the caller's buffer, the GIL
released, so worker threads read at once); through a proxy they stay on httpx.

Every read is one `Range: bytes=a-b` GET that must come back 206 with exactly that range
of a file of the size seen at open. Resets, timeouts, short bodies and 5xx/408/429 answers
are retried with exponential backoff until the read's deadline (`timeout` seconds);
other answers (404, 200 without a range, another size) fail at once. Failures raise
OSError(EIO or ETIMEDOUT, "<url>: <reason>"), the URL without credentials; data is
returned whole or not at all. A read smaller than `readahead` fetches readahead bytes
more and keeps them (4 buffers), which serves the small reads of qcow2 metadata.
"""

from __future__ import annotations

import errno
import logging
import re
import ssl
import threading
import time
import urllib.request
from collections import OrderedDict

import httpx

from vdisk.engine import blocking
from vdisk.engine.remote.http_conn import (
    CONTENT_RANGE,
    RETRIED_STATUS,
    FatalError,
    RangePool,
    RetryableError,
    Target,
    describe,
)
from vdisk.engine.remote.url import CONNECT_TIMEOUT, DEFAULT_TIMEOUT, SourceSpec
from vdisk.errors import ImageError

log = logging.getLogger("vdisk")

POOL_SIZE = 8  # connections kept alive (and at most open) per source
BACKOFF_FIRST = 0.05  # seconds before the first retry; doubled up to BACKOFF_MAX
BACKOFF_MAX = 2.0
READAHEAD_BUFFERS = 4
PROBE_BYTES = 64 << 10  # fetched at open: the header and the format probe
_TOTAL_ONLY = re.compile(r"bytes \*/(\d+)")


def ssl_context(spec: SourceSpec) -> ssl.SSLContext:
    """The context that verifies the server: the system store, or spec.ca_file."""
    ctx = ssl.create_default_context(cafile=spec.ca_file)
    if not spec.sslverify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _cert_problem(e: BaseException) -> str | None:
    """The reason when e (or what caused it) is a failed certificate verification."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or str(seen)
        seen = seen.__cause__ or seen.__context__
    return "certificate verify failed" if "CERTIFICATE_VERIFY_FAILED" in str(e) else None


class HttpSource:
    """A remote image on an HTTP(S) server (read-only), for several threads at once."""

    def __init__(self, spec: SourceSpec, target: httpx.URL, client: httpx.Client, size: int,
                 timeout: float, pool: RangePool | None = None) -> None:
        self.url = spec.display
        self._pool = pool  # None: the reads go through httpx (a proxy is in the way)
        self.size = size
        self._target = target  # spec.url without credentials (they are in the client)
        self._client = client
        self._timeout = timeout
        self._readahead = spec.readahead
        self._lock = threading.Lock()
        self._buffers: OrderedDict[int, bytes] = OrderedDict()  # offset -> bytes
        self._closed = False
        self.requests = 0  # range requests sent (for tests and stats)

    @classmethod
    def connect(cls, spec: SourceSpec, *, timeout: float | None = None,
                connect_timeout: float = CONNECT_TIMEOUT) -> HttpSource:
        """Check that the server answers range requests and learn the size; ImageError
        (redacted URL, reason) if not: no answer, 404, no range support, a bad cert."""
        read_timeout = timeout or spec.timeout or DEFAULT_TIMEOUT
        if not spec.sslverify and spec.driver == "https":
            log.warning("%s: TLS certificate verification is off (sslverify=off): the "
                        "server is not authenticated", spec.display)
        headers = {"Cookie": spec.cookie} if spec.cookie else {}
        # credentials go in an auth object, not the URL: httpx logs the URLs it fetches
        url = httpx.URL(spec.url)
        auth = None
        if url.username or url.password or spec.username is not None:
            auth = httpx.BasicAuth(spec.username or url.username, url.password)
            url = url.copy_with(username=None, password=None)
        tls = ssl_context(spec)
        client = httpx.Client(
            verify=tls, follow_redirects=True, max_redirects=10,
            headers=headers, auth=auth,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=POOL_SIZE,
                                max_keepalive_connections=POOL_SIZE, keepalive_expiry=30.0),
        )
        try:
            size, head, last = cls._probe(spec, url, client, connect_timeout)
        except BaseException:
            client.close()
            raise
        pool = _own_pool(last, client, tls)
        if pool is not None:
            client.close()  # its connection would idle: the reads go over the pool
        src = cls(spec, url, client, size, read_timeout, pool)
        if head:
            src._buffers[0] = head
        log.debug("%s: %d bytes over HTTP range requests", spec.display, size)
        return src

    @staticmethod
    def _probe(spec: SourceSpec, target: httpx.URL, client: httpx.Client,
               connect_timeout: float) -> tuple[int, bytes, httpx.Request]:
        """(size, first bytes, the request last sent) from one range request for the
        first PROBE_BYTES."""
        url = spec.display
        try:
            r = client.get(target, headers={"Range": f"bytes=0-{PROBE_BYTES - 1}"},
                           timeout=httpx.Timeout(connect_timeout))
        except httpx.ConnectTimeout:
            raise ImageError(url, f"the host does not answer (no connection within "
                                  f"{connect_timeout:g} s)") from None
        except httpx.TimeoutException:
            raise ImageError(url, f"the server does not answer (nothing within "
                                  f"{connect_timeout:g} s)") from None
        except httpx.TooManyRedirects:
            raise ImageError(url, "too many redirects") from None
        except httpx.HTTPError as e:
            cert = _cert_problem(e)
            if cert is not None:
                raise ImageError(url, f"the server's TLS certificate does not verify ({cert}); "
                                      "name the CA that signed it with a CA file") from None
            raise ImageError(url, f"cannot connect: {describe(e)}") from None
        if r.status_code == 200:
            raise ImageError(url, "the server does not support range requests (it answered a "
                                  "range request with the whole file, 200 OK)")
        if r.status_code == 416:
            m = _TOTAL_ONLY.fullmatch(r.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == 0:
                return 0, b"", r.request
        if r.status_code != 206:
            raise ImageError(url, f"HTTP {r.status_code} {r.reason_phrase}")
        m = CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", ""))
        if not m or m.group(3) == "*" or int(m.group(1)) != 0:
            raise ImageError(url, "the server's answer to a range request has no usable "
                                  f"Content-Range ({r.headers.get('Content-Range')!r})")
        size, end = int(m.group(3)), int(m.group(2))
        if len(r.content) != end + 1:
            raise ImageError(url, f"short answer to a range request ({len(r.content)} of "
                                  f"{end + 1} bytes)")
        return size, r.content, r.request

    # -- RemoteSource -----------------------------------------------------------------

    def pread(self, length: int, offset: int) -> bytes:
        if length <= 0:
            return b""
        buf = bytearray(length)
        self.pread_into(memoryview(buf), offset)
        return bytes(buf)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill buf as pread(len(buf), offset) would; on OSError buf holds anything."""
        length = len(buf)
        if length <= 0:
            return
        if self._closed:
            raise OSError(errno.EBADF, f"{self.url}: source is closed")
        end = min(offset + length, self.size)
        if offset >= end:
            buf[:] = bytes(length)
            return
        if not self._from_cache(buf, offset, end):
            blocking.about_to_block(f"HTTP read of {length} bytes")
            if end - offset < self._readahead:
                fetch_end = min(self.size, end + self._readahead)
                got = bytearray(fetch_end - offset)
                self._fetch_into(memoryview(got), offset)
                kept = bytes(got)
                with self._lock:
                    self._buffers[offset] = kept
                    while len(self._buffers) > READAHEAD_BUFFERS:
                        self._buffers.popitem(last=False)
                buf[:end - offset] = kept[:end - offset]
            else:
                self._fetch_into(buf[:end - offset], offset)
        if end - offset < length:
            buf[end - offset:] = bytes(length - (end - offset))

    def block_status(self, offset: int, length: int) -> tuple[int, bool] | None:
        return None  # HTTP cannot tell holes from data

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.close()
        self._client.close()

    # -- internals --------------------------------------------------------------------

    def _from_cache(self, buf: memoryview, offset: int, end: int) -> bool:
        with self._lock:
            for start, kept in self._buffers.items():
                if start <= offset and end <= start + len(kept):
                    self._buffers.move_to_end(start)
                    buf[:end - offset] = kept[offset - start:end - start]
                    return True
        return False

    def _fetch_into(self, view: memoryview, offset: int) -> None:
        """view := bytes [offset, offset + len(view)) of the file, retried until the
        deadline."""
        end = offset + len(view)
        started = time.monotonic()
        deadline = started + self._timeout
        delay = BACKOFF_FIRST
        attempts = 0
        while True:
            attempts += 1
            try:
                if self._pool is not None:
                    self.requests += 1
                    self._pool.read_into(view, offset, self.size, deadline)
                else:
                    view[:] = self._attempt(offset, end, deadline)
                return
            except FatalError as e:
                raise self._give_up(errno.EIO, f"{e}", offset, end) from None
            except RetryableError as e:
                left = deadline - time.monotonic()
                if left <= delay:
                    code = errno.ETIMEDOUT if e.timed_out else errno.EIO
                    spent = time.monotonic() - started
                    raise self._give_up(code, f"{e} (gave up after {attempts} attempts in "
                                              f"{spent:.1f} s)", offset, end) from None
                log.debug("%s: read at %d+%d: %s; retrying in %.2f s", self.url, offset,
                          end - offset, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    def _give_up(self, code: int, reason: str, offset: int, end: int) -> OSError:
        log.warning("%s: read of %d bytes at %d failed: %s", self.url, end - offset, offset,
                    reason)
        return OSError(code, f"{self.url}: {reason}")

    def _attempt(self, offset: int, end: int, deadline: float) -> bytes:
        left = max(0.001, deadline - time.monotonic())
        self.requests += 1
        try:
            r = self._client.get(self._target, headers={"Range": f"bytes={offset}-{end - 1}"},
                                 timeout=httpx.Timeout(left, connect=min(left, CONNECT_TIMEOUT)))
        except httpx.TimeoutException as e:
            raise RetryableError(f"timed out ({type(e).__name__})", timed_out=True) from None
        except (httpx.TransportError, httpx.DecodingError) as e:
            if _cert_problem(e):
                raise FatalError(f"TLS certificate does not verify: {describe(e)}") from None
            raise RetryableError(describe(e)) from None
        except httpx.TooManyRedirects:
            raise FatalError("too many redirects") from None
        if r.status_code in RETRIED_STATUS:
            raise RetryableError(f"HTTP {r.status_code} {r.reason_phrase}")
        if r.status_code != 206:
            raise FatalError(f"HTTP {r.status_code} {r.reason_phrase} to a range request")
        m = CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", ""))
        if not m or (int(m.group(1)), int(m.group(2))) != (offset, end - 1):
            raise FatalError(f"the server answered another range ({r.headers.get('Content-Range')!r}"
                         f" for {offset}-{end - 1})")
        if m.group(3) != str(self.size):
            raise FatalError(f"the file changed size on the server ({m.group(3)}, was {self.size})")
        if len(r.content) != end - offset:
            raise RetryableError(f"short answer ({len(r.content)} of {end - offset} bytes)")
        return r.content


def _own_pool(last: httpx.Request, client: httpx.Client, tls: ssl.SSLContext
              ) -> RangePool | None:
    """Connections of our own to where the open's last request went, with its headers;
    None if a proxy is in the way (httpx then carries the reads)."""
    url = last.url
    proxies = urllib.request.getproxies_environment() if client.trust_env else {}
    if (proxies.get(url.scheme) or proxies.get("all")) and \
            not urllib.request.proxy_bypass(url.host):
        return None
    headers = [(k, v) for k, v in last.headers.raw
               if k.lower() not in (b"range", b"accept-encoding", b"content-length")]
    headers.append((b"Accept-Encoding", b"identity"))
    port = url.port or (443 if url.scheme == "https" else 80)
    target = Target(url.host, port, url.raw_path, tuple(headers),
                    tls if url.scheme == "https" else None)
    return RangePool(target, POOL_SIZE)
