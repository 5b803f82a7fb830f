"""Compressed-cluster codecs: raw deflate with a 4 KiB window (type 0) and zstd (type 1)."""

from __future__ import annotations

import errno
import io
import zlib

from vdisk import lazyimport

lazyimport.defer("zstandard")  # its C library loads when a zstd cluster is first met
import zstandard  # noqa: E402

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_DEFLATE: "zlib", COMPRESSION_ZSTD: "zstd"}


def decompress_cluster(ctype: int, data: bytes | memoryview, cluster_size: int) -> bytes:
    """Inflate one compressed cluster to exactly cluster_size bytes, or raise OSError(EIO).

    Trailing bytes after the stream (sector padding) are ignored.
    """
    try:
        if ctype == COMPRESSION_DEFLATE:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)
        elif ctype == COMPRESSION_ZSTD:
            out = _zstd_bounded(data, cluster_size)
        else:
            raise OSError(errno.EIO, f"unknown compression type {ctype}")
    except (zlib.error, zstandard.ZstdError) as e:
        raise OSError(errno.EIO, f"compressed cluster is damaged: {e}") from None
    if len(out) < cluster_size:
        raise OSError(errno.EIO, "compressed cluster inflates to a short cluster")
    return out[:cluster_size]


def _zstd_bounded(data: bytes | memoryview, limit: int) -> bytes:
    """Inflate at most `limit` bytes (a hostile frame may claim gigabytes)."""
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(bytes(data)),
                                                        read_across_frames=False)
    parts: list[bytes] = []
    got = 0
    while got < limit:
        chunk = reader.read(limit - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def compress_cluster(ctype: int, data: bytes) -> bytes:
    """Compress one cluster the way QEMU stores it (deflate raw -12 window, or one zstd frame)."""
    if ctype == COMPRESSION_DEFLATE:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
        return c.compress(data) + c.flush()
    if ctype == COMPRESSION_ZSTD:
        return zstandard.ZstdCompressor().compress(data)
    raise ValueError(f"unknown compression type {ctype}")
