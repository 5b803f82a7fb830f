"""`vdisk serve --metrics ADDR`: the drives' I/O counters as a Prometheus text endpoint.

ADDR is HOST:PORT (TCP, e.g. 127.0.0.1:9101 or [::1]:9101) or a UNIX socket path (it has
a '/'; made 0600 in a private directory, like the QMP socket). Any GET path answers
(/metrics by convention); HEAD too. The server is a small HTTP/1.1 responder on the
daemon's trio loop: each scrape builds the text with prometheus_client from the live
counters (vdisk.block.stats), a few microseconds of work per drive, so the loop never
blocks and no thread touches the counters. One request per connection.

Metrics, each with a `drive` label (counters; times in seconds):
vdisk_read_bytes_total, vdisk_written_bytes_total, vdisk_discarded_bytes_total,
vdisk_read_operations_total, vdisk_write_operations_total,
vdisk_flush_operations_total, vdisk_discard_operations_total,
vdisk_read_seconds_total, vdisk_write_seconds_total, vdisk_flush_seconds_total,
vdisk_discard_seconds_total; and the gauge vdisk_write_highest_offset_bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:  # imported when a scrape comes: an idle daemon without it is smaller
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

from vdisk.block.stats import IOStats
from vdisk.errors import VdiskError

log = logging.getLogger("vdisk.metrics")

Address = tuple[str, int] | str  # (host, port) or a UNIX socket path
DrivesFn = Callable[[], Iterable[tuple[str, IOStats]]]
BindUnix = Callable[[str], Awaitable[trio.socket.SocketType]]

MAX_HEAD = 8192  # bytes of request line and headers
REQUEST_TIMEOUT = 10.0  # seconds a client has to send its request and read the answer

# (metric name, help, IOStats attribute, scale to the metric's unit)
COUNTERS = (
    ("vdisk_read_bytes", "Bytes read by the drive's users.", "rd_bytes", 1),
    ("vdisk_written_bytes", "Bytes written (data and zeroes).", "wr_bytes", 1),
    ("vdisk_discarded_bytes", "Bytes discarded (punch-hole).", "unmap_bytes", 1),
    ("vdisk_read_operations", "Read requests.", "rd_operations", 1),
    ("vdisk_write_operations", "Write requests.", "wr_operations", 1),
    ("vdisk_flush_operations", "Flush requests.", "flush_operations", 1),
    ("vdisk_discard_operations", "Discard requests.", "unmap_operations", 1),
    ("vdisk_read_seconds", "Time spent in reads.", "rd_total_time_ns", 1e-9),
    ("vdisk_write_seconds", "Time spent in writes.", "wr_total_time_ns", 1e-9),
    ("vdisk_flush_seconds", "Time spent in flushes.", "flush_total_time_ns", 1e-9),
    ("vdisk_discard_seconds", "Time spent in discards.", "unmap_total_time_ns", 1e-9),
)


def parse_address(text: str, what: str = "--metrics") -> Address:
    """HOST:PORT or a UNIX path (anything with a '/'); VdiskError naming `what`."""
    if "/" in text:
        return os.path.abspath(text)
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise VdiskError(f"{what} {text}: expected HOST:PORT (e.g. 127.0.0.1:9101) or a "
                         "UNIX socket path")
    return host, int(port)


class DriveCollector:
    """A prometheus_client collector reading the drives' counters at each scrape."""

    def __init__(self, drives: DrivesFn) -> None:
        self._drives = drives

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        drives = [(drive, stats.counters()) for drive, stats in self._drives()]
        for name, text, attr, scale in COUNTERS:
            family = CounterMetricFamily(name, text, labels=["drive"])
            for drive, counts in drives:
                value = counts[attr]
                family.add_metric([drive], value * scale if scale != 1 else value)
            yield family
        gauge = GaugeMetricFamily("vdisk_write_highest_offset_bytes",
                                  "End of the highest write.", labels=["drive"])
        for drive, counts in drives:
            gauge.add_metric([drive], counts["wr_highest_offset"])
        yield gauge


def make_registry(drives: DrivesFn) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DriveCollector(drives))
    return registry


def _response(status: str, body: bytes, content_type: str, head_only: bool) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + (b"" if head_only else body)


def answer(request_head: bytes, registry: CollectorRegistry) -> bytes:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    """The HTTP response to a request's line and headers."""
    line = request_head.split(b"\n", 1)[0].strip()
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _response("400 Bad Request", b"bad request\n", "text/plain", False)
    method = parts[0]
    if method not in (b"GET", b"HEAD"):
        return _response("405 Method Not Allowed", b"GET or HEAD only\n", "text/plain",
                         False)
    return _response("200 OK", generate_latest(registry), CONTENT_TYPE_LATEST,
                     method == b"HEAD")


async def _handle(stream: trio.abc.Stream, registry: CollectorRegistry) -> None:
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            head = b""
            while b"\r\n\r\n" not in head and b"\n\n" not in head:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                head += chunk
                if len(head) > MAX_HEAD:
                    await stream.send_all(_response("431 Request Header Fields Too Large",
                                                    b"", "text/plain", False))
                    return
            await stream.send_all(answer(head, registry))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
        log.debug("metrics client: %s", e)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()


async def serve_metrics(address: Address, drives: DrivesFn, bind_unix: BindUnix,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                        ) -> None:
    """Listen at `address` and answer scrapes until cancelled; VdiskError if it cannot
    listen. A UNIX socket is bound with `bind_unix` and removed again at the end."""
    registry = make_registry(drives)
    identity: tuple[int, int] | None = None
    what = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
    try:
        if isinstance(address, str):
            sock = await bind_unix(address)
            st = os.lstat(address)
            identity = (st.st_dev, st.st_ino)
            listeners: list[trio.SocketListener] = [trio.SocketListener(sock)]
        else:
            listeners = await trio.open_tcp_listeners(address[1], host=address[0])
    except OSError as e:
        raise VdiskError(f"--metrics {what}: cannot listen: {e.strerror or e}") from None
    log.info("metrics at %s", what if isinstance(address, str) else f"http://{what}/metrics")
    try:
        async with trio.open_nursery() as nursery:
            async def handler(stream: Any) -> None:
                await _handle(stream, registry)

            await nursery.start(trio.serve_listeners, handler, listeners)
            task_status.started()
    finally:
        if isinstance(address, str) and identity is not None:
            try:
                st = os.lstat(address)
                if (st.st_dev, st.st_ino) == identity:
                    os.unlink(address)
            except OSError:
                pass
