"""qcow2 header: parse and validate, header extensions, feature name table, serialize,
and rewrite in place (QEMU: qcow2_update_header)."""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field

from vdisk.engine.qcow2.fileio import ImageFile
from vdisk.engine.raw import fallocate
from vdisk.errors import CorruptImageError, UnsupportedImageError

MAGIC = b"QFI\xfb"
V2_LEN = 72
V3_LEN = 104
_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 32 more bytes

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_BACKING_NAME = 1023
MAX_HOST_OFFSET = 1 << 56
INCOMPAT_OFFSET = 72  # the v3 header's incompatible_features field
REFTABLE_OFFSET = 48  # refcount_table_offset (u64), then refcount_table_clusters (u32)
_FALLOC_FL_KEEP_SIZE = 0x01

_INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file",
                   3: "compression type", 4: "extended L2 entries"}


@dataclass
class Header:
    """The parsed header plus everything needed to write it back unchanged."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_LEN
    compression_type: int = 0
    raw: bytes = b""  # bytes [0, header_length) as read, to keep unknown trailing fields
    extensions: list[tuple[int, bytes]] = field(default_factory=list)  # in file order, no end
    backing_name: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    def ext(self, etype: int) -> bytes | None:
        for t, d in self.extensions:
            if t == etype:
                return d
        return None

    def feature_name(self, kind: int, bit: int) -> str:
        name = self.feature_names.get((kind, bit))
        if name:
            return name
        if kind == 0 and bit in _INCOMPAT_NAMES:
            return _INCOMPAT_NAMES[bit]
        return f"unknown feature bit {bit}"


def is_qcow2(header_bytes: bytes) -> bool:
    """True if the bytes start with the qcow2 magic."""
    return bytes(header_bytes[:4]) == MAGIC


def parse_header(path: str, buf: bytes, file_size: int) -> Header:
    """Parse and validate the header area (the file's first cluster, or less if shorter).

    Raises CorruptImageError / UnsupportedImageError naming the file and the problem.
    Feature policy (encryption, unknown bits, dirty, corrupt) is the caller's business
    except where parsing itself cannot go on.
    """

    def bad(reason: str) -> CorruptImageError:
        return CorruptImageError(path, reason)

    if len(buf) < 4 or not is_qcow2(buf):
        raise bad("not a qcow2 image (bad magic)")
    if len(buf) < V2_LEN:
        raise bad("truncated qcow2 header")
    f = _V2.unpack_from(buf, 0)
    h = Header(
        version=f[1], backing_file_offset=f[2], backing_file_size=f[3], cluster_bits=f[4],
        size=f[5], crypt_method=f[6], l1_size=f[7], l1_table_offset=f[8],
        refcount_table_offset=f[9], refcount_table_clusters=f[10], nb_snapshots=f[11],
        snapshots_offset=f[12],
    )
    if h.version not in (2, 3):
        raise UnsupportedImageError(path, f"unsupported qcow2 version {h.version}")
    if not 9 <= h.cluster_bits <= 21:
        raise bad(f"cluster_bits {h.cluster_bits} out of range (9..21)")
    cs = h.cluster_size
    if h.version == 3:
        if len(buf) < V3_LEN:
            raise bad("truncated qcow2 v3 header")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = _V3.unpack_from(buf, V2_LEN)
        if h.header_length < V3_LEN or h.header_length > cs or h.header_length % 8:
            raise bad(f"invalid header_length {h.header_length}")
        if len(buf) < h.header_length:
            raise bad("truncated qcow2 header")
        if h.header_length > 104:
            h.compression_type = buf[104]
    else:
        h.header_length = V2_LEN
    h.raw = bytes(buf[: h.header_length])
    if h.refcount_order > 6:
        raise bad(f"refcount_order {h.refcount_order} out of range (0..6)")
    _parse_extensions(path, h, buf)
    if h.version == 3:
        unknown = h.incompatible & ~INCOMPAT_KNOWN
        if unknown:
            names = [h.feature_name(0, b) for b in range(64) if unknown >> b & 1]
            raise UnsupportedImageError(
                path, "unsupported incompatible qcow2 feature: " + ", ".join(names))
    if h.size >= 1 << 63:
        raise bad("virtual size is too large")
    if h.extended_l2 and h.cluster_bits < 14:
        raise bad("extended L2 entries need clusters of at least 16 KiB")
    if bool(h.incompatible & INCOMPAT_COMPRESSION) != (h.compression_type != 0):
        raise bad("compression type field and incompatible bit disagree")
    if h.compression_type not in (0, 1):
        raise UnsupportedImageError(path, f"unknown compression type {h.compression_type}")
    # Backing file name: inside the first cluster, at most 1023 bytes.
    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_NAME:
            raise bad(f"backing file name too long ({h.backing_file_size} bytes)")
        end = h.backing_file_offset + h.backing_file_size
        if end > cs or end > len(buf):
            raise bad("backing file name lies beyond the first cluster or the end of file")
        raw_name = bytes(buf[h.backing_file_offset:end])
        if b"\0" in raw_name:
            raise bad("backing file name contains a NUL byte")
        try:
            h.backing_name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise bad("backing file name is not valid UTF-8") from None
    _validate_tables(path, h, file_size)
    return h


def _parse_extensions(path: str, h: Header, buf: bytes) -> None:
    off = h.header_length
    end_limit = min(len(buf), h.cluster_size)
    if h.backing_file_offset and h.backing_file_offset < end_limit:
        end_limit = h.backing_file_offset
    while True:
        if off + 8 > end_limit:
            if off >= end_limit and off == h.backing_file_offset:
                return  # no end marker before the name: tolerate like QEMU does
            raise CorruptImageError(path, "header extensions run past the first cluster")
        etype, elen = struct.unpack_from(">II", buf, off)
        off += 8
        if etype == EXT_END:
            return
        if off + elen > end_limit:
            raise CorruptImageError(path, f"header extension 0x{etype:x} is too long")
        data = bytes(buf[off:off + elen])
        off += (elen + 7) & ~7
        h.extensions.append((etype, data))
        if etype == EXT_BACKING_FORMAT:
            h.backing_format = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif etype == EXT_FEATURE_TABLE:
            for i in range(len(data) // 48):
                kind, bit = data[i * 48], data[i * 48 + 1]
                name = data[i * 48 + 2:i * 48 + 48].split(b"\0", 1)[0]
                h.feature_names[(kind, bit)] = name.decode("utf-8", "replace")


def _validate_tables(path: str, h: Header, file_size: int) -> None:
    cs = h.cluster_size

    def bad(reason: str) -> CorruptImageError:
        return CorruptImageError(path, reason)

    def check_table(name: str, off: int, length: int) -> None:
        if off % cs:
            raise bad(f"{name} offset 0x{off:x} is not cluster aligned")
        if off == 0 or off + length > file_size or off >= MAX_HOST_OFFSET:
            raise bad(f"{name} (offset 0x{off:x}, {length} bytes) lies beyond the end of file")

    if h.l1_size * 8 > MAX_L1_BYTES:
        raise bad(f"L1 table is too large ({h.l1_size} entries)")
    l2_bytes_per = cs // (16 if h.extended_l2 else 8) * cs
    need = -(-h.size // l2_bytes_per)
    if h.l1_size < need:
        raise bad(f"L1 table is too small ({h.l1_size} entries, {need} needed)")
    if h.l1_size:
        check_table("L1 table", h.l1_table_offset, h.l1_size * 8)
    if h.refcount_table_clusters == 0:
        raise bad("refcount table is empty")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise bad(f"refcount table is too large ({h.refcount_table_clusters} clusters)")
    check_table("refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs)
    if h.nb_snapshots > 65536:
        raise bad(f"too many snapshots ({h.nb_snapshots})")
    if h.nb_snapshots:
        check_table("snapshot table", h.snapshots_offset, h.nb_snapshots * 40)
    # Overlaps between the header cluster, the refcount table and the L1 table.
    areas = [("header", 0, cs),
             ("refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs)]
    if h.l1_size:
        areas.append(("L1 table", h.l1_table_offset, h.l1_size * 8))
    for i, (n1, o1, l1) in enumerate(areas):
        for n2, o2, l2 in areas[i + 1:]:
            if o1 < o2 + l2 and o2 < o1 + l1:
                raise bad(f"{n1} overlaps {n2}")


def serialize_header(h: Header) -> bytes:
    """The header area (header, extensions, end marker, backing name) as one byte string.

    Uses h's fields, h.extensions (with the backing-format extension replaced by
    h.backing_format) and h.backing_name; sets h.backing_file_offset/size to match.
    """
    exts = [(t, d) for t, d in h.extensions if t != EXT_BACKING_FORMAT]
    if h.backing_name is not None and h.backing_format:
        exts.insert(0, (EXT_BACKING_FORMAT, h.backing_format.encode()))
    h.extensions = exts
    body = bytearray()
    for t, d in exts:
        body += struct.pack(">II", t, len(d)) + d + b"\0" * (-len(d) % 8)
    body += struct.pack(">II", EXT_END, 0)
    name = h.backing_name.encode() if h.backing_name is not None else b""
    if h.backing_name is not None:
        h.backing_file_offset = h.header_length + len(body)
        h.backing_file_size = len(name)
    else:
        h.backing_file_offset = 0
        h.backing_file_size = 0
    raw = bytearray(h.raw.ljust(h.header_length, b"\0"))
    _V2.pack_into(raw, 0, MAGIC, h.version, h.backing_file_offset, h.backing_file_size,
                  h.cluster_bits, h.size, h.crypt_method, h.l1_size, h.l1_table_offset,
                  h.refcount_table_offset, h.refcount_table_clusters, h.nb_snapshots,
                  h.snapshots_offset)
    if h.version == 3:
        _V3.pack_into(raw, V2_LEN, h.incompatible, h.compatible, h.autoclear,
                      h.refcount_order, h.header_length)
        if h.header_length > 104:
            raw[104] = h.compression_type
    h.raw = bytes(raw)
    return bytes(raw) + bytes(body) + name


def feature_table_ext() -> tuple[int, bytes]:
    """The feature name table extension QEMU writes into v3 images."""
    feats = [(0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
             (0, 3, "compression type"), (0, 4, "extended L2 entries"),
             (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data")]
    data = b"".join(struct.pack(">BB46s", k, b, n.encode()) for k, b, n in feats)
    return EXT_FEATURE_TABLE, data


def rewrite_header(f: ImageFile, h: Header, old_len: int) -> int:
    """Rewrite the header area in one pwrite inside the first cluster, then sync; the
    length of the new header area. old_len: the length of the area it replaces (the
    rest of it is zeroed).

    The file never grows (the tables follow the first cluster), and its blocks are
    reserved first (fallocate), so a full file system fails the rewrite before a byte
    changes instead of tearing it halfway.
    """
    cs = h.cluster_size
    buf = serialize_header(h)
    if len(buf) > cs:  # drop the optional feature name table
        h.extensions = [(t, d) for t, d in h.extensions if t != EXT_FEATURE_TABLE]
        buf = serialize_header(h)
    if len(buf) > cs:
        raise OSError(errno.ENOSPC, f"{f.path}: header does not fit in the first cluster")
    pad = max(0, min(cs, old_len) - len(buf))
    out = buf + bytes(pad)
    if len(out) > f.size:
        raise OSError(errno.EIO, f"{f.path}: the file is shorter than its header")
    try:
        fallocate(f.fd, _FALLOC_FL_KEEP_SIZE, 0, len(out))
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(e.errno, f"{f.path}: cannot rewrite the header: "
                                   f"{e.strerror}") from None
    done = os.pwrite(f.fd, out, 0)
    if done != len(out):
        raise OSError(errno.EIO, f"{f.path}: short header write ({done} of {len(out)})")
    f.sync()
    return len(buf)


def write_incompatible(f: ImageFile, h: Header) -> None:
    """Write h.incompatible (v3) into the file: 8 bytes inside the header, never torn, never
    extending the file. Not synced."""
    f.pwrite(struct.pack(">Q", h.incompatible), INCOMPAT_OFFSET)


def write_reftable_pointer(f: ImageFile, h: Header, off: int, clusters: int) -> None:
    """Point the header (and h) at a new refcount table. Not synced."""
    h.refcount_table_offset = off
    h.refcount_table_clusters = clusters
    f.pwrite(struct.pack(">QI", off, clusters), REFTABLE_OFFSET)
