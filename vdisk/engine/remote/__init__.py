"""Remote sources: a remote image read through a protocol (QEMU's protocol layer: the
http, https and nbd drivers) under a format driver (raw or qcow2), read-only.

url.py parses backing names into a SourceSpec; open_source() connects to it, giving a
RemoteSource (http.py: HttpSource; nbd.py: NbdSource); images.py puts a format driver
on a source. Every start-up failure is an ImageError naming the URL without credentials.
"""

from __future__ import annotations

from typing import Protocol

from vdisk.engine.remote.url import CONNECT_TIMEOUT, DEFAULT_TIMEOUT, SourceSpec


class RemoteSource(Protocol):
    url: str  # the URL with credentials removed: safe for messages and logs
    size: int  # bytes, known after connect

    def pread(self, length: int, offset: int) -> bytes:
        """Exactly length bytes (short only past size: zero-filled). Thread-safe: may be
        called from several worker threads at once. Retries idempotent reads on resets
        with backoff within its deadline; raises OSError(errno.EIO or ETIMEDOUT,
        "<url>: <reason>") when it gives up. Never returns partial data."""
        ...

    def block_status(self, offset: int, length: int) -> tuple[int, bool] | None:
        """(run length, True if the run reads as zeroes/hole) from offset, or None when
        the server cannot tell (then everything counts as data)."""
        ...

    def close(self) -> None: ...


def open_source(spec: SourceSpec, *, connect_timeout: float = CONNECT_TIMEOUT) -> RemoteSource:
    """Connect to the image spec names; ImageError(redacted url, reason) on failure."""
    if spec.driver == "nbd":
        from vdisk.engine.remote.nbd import NbdSource

        return NbdSource.connect(host=spec.host, port=spec.port, socket_path=spec.socket_path,
                                 export=spec.export, url=spec.display,
                                 timeout=spec.timeout or DEFAULT_TIMEOUT,
                                 connect_timeout=connect_timeout)
    from vdisk.engine.remote.http import HttpSource

    return HttpSource.connect(spec, connect_timeout=connect_timeout)
