"""Remote sources: a remote image read through a protocol (QEMU's protocol layer under a
format driver, read-only). See docs of issue 11; open_source() is added with url.py."""

from __future__ import annotations

from typing import Protocol


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
