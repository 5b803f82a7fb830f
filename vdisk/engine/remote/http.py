"""HttpSource: a remote image read with HTTP range requests (the RemoteSource of http://
and https:// URLs).

The client is httpx's synchronous Client: a thread-safe keep-alive pool (the engine runs
network reads in worker threads, several at once), redirects, per-phase timeouts, HTTP/1.1
through h11. TLS uses an ssl context of our own: the system CA store (not certifi's
bundle), or the CA file the spec names; sslverify=off is explicit and logged.

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
from collections import OrderedDict

import httpx

from vdisk.engine import blocking
from vdisk.engine.remote.url import CONNECT_TIMEOUT, DEFAULT_TIMEOUT, SourceSpec
from vdisk.errors import ImageError

log = logging.getLogger("vdisk")

POOL_SIZE = 8  # connections kept alive (and at most open) per source
BACKOFF_FIRST = 0.05  # seconds before the first retry; doubled up to BACKOFF_MAX
BACKOFF_MAX = 2.0
READAHEAD_BUFFERS = 4
PROBE_BYTES = 64 << 10  # fetched at open: the header and the format probe
RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_TOTAL_ONLY = re.compile(r"bytes \*/(\d+)")


class _Retry(Exception):
    """A failed attempt that may succeed if made again."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class _Fatal(Exception):
    """A failed attempt that will fail again."""


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


def _describe(e: httpx.HTTPError) -> str:
    text = str(e) or type(e).__name__
    return re.sub(r"^\[Errno -?\d+\] ", "", text)


class HttpSource:
    """A remote image on an HTTP(S) server (read-only), for several threads at once."""

    def __init__(self, spec: SourceSpec, target: httpx.URL, client: httpx.Client, size: int,
                 timeout: float) -> None:
        self.url = spec.display
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
        client = httpx.Client(
            verify=ssl_context(spec), follow_redirects=True, max_redirects=10,
            headers=headers, auth=auth,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=POOL_SIZE,
                                max_keepalive_connections=POOL_SIZE, keepalive_expiry=30.0),
        )
        try:
            size, head = cls._probe(spec, url, client, connect_timeout)
        except BaseException:
            client.close()
            raise
        src = cls(spec, url, client, size, read_timeout)
        if head:
            src._buffers[0] = head
        log.debug("%s: %d bytes over HTTP range requests", spec.display, size)
        return src

    @staticmethod
    def _probe(spec: SourceSpec, target: httpx.URL, client: httpx.Client,
               connect_timeout: float) -> tuple[int, bytes]:
        """(size, first bytes) from one range request for the first PROBE_BYTES."""
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
            raise ImageError(url, f"cannot connect: {_describe(e)}") from None
        if r.status_code == 200:
            raise ImageError(url, "the server does not support range requests (it answered a "
                                  "range request with the whole file, 200 OK)")
        if r.status_code == 416:
            m = _TOTAL_ONLY.fullmatch(r.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == 0:
                return 0, b""
        if r.status_code != 206:
            raise ImageError(url, f"HTTP {r.status_code} {r.reason_phrase}")
        m = _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", ""))
        if not m or m.group(3) == "*" or int(m.group(1)) != 0:
            raise ImageError(url, "the server's answer to a range request has no usable "
                                  f"Content-Range ({r.headers.get('Content-Range')!r})")
        size, end = int(m.group(3)), int(m.group(2))
        if len(r.content) != end + 1:
            raise ImageError(url, f"short answer to a range request ({len(r.content)} of "
                                  f"{end + 1} bytes)")
        return size, r.content

    # -- RemoteSource -----------------------------------------------------------------

    def pread(self, length: int, offset: int) -> bytes:
        if length <= 0:
            return b""
        if self._closed:
            raise OSError(errno.EBADF, f"{self.url}: source is closed")
        end = min(offset + length, self.size)
        if offset >= end:
            return bytes(length)
        data = self._cached(offset, end)
        if data is None:
            blocking.about_to_block(f"HTTP read of {length} bytes")
            fetch_end = end
            if end - offset < self._readahead:
                fetch_end = min(self.size, end + self._readahead)
            got = self._fetch(offset, fetch_end)
            if fetch_end > end:
                with self._lock:
                    self._buffers[offset] = got
                    while len(self._buffers) > READAHEAD_BUFFERS:
                        self._buffers.popitem(last=False)
            data = got[:end - offset]
        return data if len(data) == length else data + bytes(length - len(data))

    def block_status(self, offset: int, length: int) -> tuple[int, bool] | None:
        return None  # HTTP cannot tell holes from data

    def close(self) -> None:
        self._closed = True
        self._client.close()

    # -- internals --------------------------------------------------------------------

    def _cached(self, offset: int, end: int) -> bytes | None:
        with self._lock:
            for start, buf in self._buffers.items():
                if start <= offset and end <= start + len(buf):
                    self._buffers.move_to_end(start)
                    return buf[offset - start:end - start]
        return None

    def _fetch(self, offset: int, end: int) -> bytes:
        """Bytes [offset, end) of the file, retried until the deadline."""
        started = time.monotonic()
        deadline = started + self._timeout
        delay = BACKOFF_FIRST
        attempts = 0
        while True:
            attempts += 1
            try:
                return self._attempt(offset, end, deadline)
            except _Fatal as e:
                raise self._give_up(errno.EIO, f"{e}", offset, end) from None
            except _Retry as e:
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
            raise _Retry(f"timed out ({type(e).__name__})", timed_out=True) from None
        except (httpx.TransportError, httpx.DecodingError) as e:
            if _cert_problem(e):
                raise _Fatal(f"TLS certificate does not verify: {_describe(e)}") from None
            raise _Retry(_describe(e)) from None
        except httpx.TooManyRedirects:
            raise _Fatal("too many redirects") from None
        if r.status_code in RETRIED_STATUS:
            raise _Retry(f"HTTP {r.status_code} {r.reason_phrase}")
        if r.status_code != 206:
            raise _Fatal(f"HTTP {r.status_code} {r.reason_phrase} to a range request")
        m = _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", ""))
        if not m or (int(m.group(1)), int(m.group(2))) != (offset, end - 1):
            raise _Fatal(f"the server answered another range ({r.headers.get('Content-Range')!r}"
                         f" for {offset}-{end - 1})")
        if m.group(3) != str(self.size):
            raise _Fatal(f"the file changed size on the server ({m.group(3)}, was {self.size})")
        if len(r.content) != end - offset:
            raise _Retry(f"short answer ({len(r.content)} of {end - offset} bytes)")
        return r.content
