"""SOCI zTOCs: the model, building one from a layer read once, and its bytes.

A zTOC (soci-snapshotter's ``ztoc`` package, here as of v0.16.1) lets the
SOCI Snapshotter lazily load an *unmodified* layer: the layer's file table
(each tar member's name, metadata and the uncompressed offset of its data)
plus checkpoints into the existing gzip stream every span (:mod:`.zinfo`).
Its bytes are a flatbuffer (ztoc/fbs/ztoc.fbs). :func:`marshal_ztoc` builds
it in the order soci's Go marshaler does, so for the same layer and span
size our bytes, and hence the zTOC's digest, equal ``soci create``'s
(tests/test_ztoc.py checks this against soci's own builder).

The file table comes from the one tar walk (:mod:`.tarstream`), with names,
types and times as Go's archive/tar reports them, which is what soci stores.
"""

from __future__ import annotations

import re
import struct
import tarfile
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import flatbuffers

from .._exceptions import InvalidBlob, InvalidInput, UnsupportedEntry
from .._version import __version__
from .tarstream import BLOCK, ZERO_BLOCK, PeekableStream, iter_headers, padded, printable
from .zinfo import (
    Checkpoint,
    GzipCheckpointWalk,
    PlainSpanWalk,
    decode_gzip_zinfo,
    encode_gzip_zinfo,
    encode_tar_zinfo,
    flatbuffer_builder,
)

#: The only zTOC version soci writes and reads.
ZTOC_VERSION = "0.9"
#: soci's default span size (``soci create --span-size``).
DEFAULT_SPAN_SIZE = 4 << 20
#: What we write as ``build_tool_identifier`` unless told otherwise; soci
#: create writes "AWS SOCI CLI v0.2".
DEFAULT_BUILD_TOOL = f"estargz v{__version__}"
#: Compression algorithms a zTOC can describe, with their flatbuffer enum
#: values (``CompressionAlgorithm``); soci v0.16.1 builds none for zstd.
ALGORITHMS = {"gzip": 1, "uncompressed": 2}

# The tar typeflags soci's getType accepts, and the names it stores.
_TYPES = {b"0": "reg", b"1": "hardlink", b"2": "symlink", b"3": "char",
          b"4": "block", b"5": "dir", b"6": "fifo"}
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
# Limits on what unmarshal accepts, far above anything real.
MAX_ZTOC_SIZE = 1 << 30


@dataclass(frozen=True)
class FileMetadata:
    """One tar member as a zTOC records it (soci's ``ztoc.FileMetadata``).

    Strings are Go's bytes decoded as UTF-8 with ``surrogateescape``.
    """

    #: The member's name exactly as in the tar (``./`` and trailing ``/`` kept).
    name: str
    #: "reg", "dir", "symlink", "hardlink", "char", "block" or "fifo".
    type: str
    #: Offset of the member's data in the uncompressed tar.
    uncompressed_offset: int
    #: The header's size field.
    uncompressed_size: int
    linkname: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    #: Modification time as Go's ``time.MarshalText`` (RFC 3339, nanoseconds
    #: without trailing zeros), in UTC.
    mod_time: str = ""
    devmajor: int = 0
    devminor: int = 0
    #: The member's PAX records, all of them (the schema's ``xattrs`` field;
    #: soci keeps every record there, not only ``SCHILY.xattr.*``).
    pax_headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Ztoc:
    """A whole zTOC (soci's ``ztoc.Ztoc``)."""

    version: str
    build_tool_identifier: str
    #: Size of the layer blob as stored (compressed).
    compressed_archive_size: int
    #: Where Go's tar reader stopped: after the two zero blocks (not the
    #: padding some writers add after them).
    uncompressed_archive_size: int
    files: tuple[FileMetadata, ...]
    #: Number of spans minus one.
    max_span_id: int
    #: ``sha256:`` digest of each span's compressed bytes.
    span_digests: tuple[str, ...]
    #: The zinfo blob: gzip checkpoints, or a TarZinfo flatbuffer.
    checkpoints: bytes
    #: "gzip" or "uncompressed".
    compression_algorithm: str = "gzip"

    @cached_property
    def decoded_checkpoints(self) -> list[Checkpoint]:
        """The gzip checkpoints (empty for an uncompressed layer)."""
        if self.compression_algorithm != "gzip":
            return []
        return decode_gzip_zinfo(self.checkpoints, _ztoc_error)[1]

    @cached_property
    def span_size(self) -> int:
        """The span size the zTOC was built with."""
        if self.compression_algorithm == "gzip":
            return decode_gzip_zinfo(self.checkpoints, _ztoc_error)[0]
        return _decode_tar_zinfo(self.checkpoints)[0]

    def span_of(self, offset: int) -> int:
        """The span holding uncompressed offset ``offset`` (soci's
        ``UncompressedOffsetToSpanID``: the last span starting at or before it).

        A file's data ``[o, o + size)`` is in spans ``span_of(o)`` to
        ``span_of(o + size)``: soci includes the span of the end offset too.
        """
        if offset < 0:
            raise InvalidInput(f"offset {offset} is negative")
        if self.compression_algorithm != "gzip":
            return min(offset // self.span_size, max(self.max_span_id, 0))
        points = self.decoded_checkpoints
        lo, hi = 0, len(points) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if points[mid].uncompressed_offset <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def span_range(self, span_id: int) -> tuple[int, int]:
        """Compressed byte range ``[start, end)`` of span ``span_id`` in the
        layer blob: what the snapshotter fetches (and ``span_digests`` hashes)
        for it. Spans may share one byte when a block boundary falls inside it."""
        if not 0 <= span_id <= self.max_span_id:
            raise InvalidInput(f"span {span_id} is not in 0 to {self.max_span_id}")
        if self.compression_algorithm != "gzip":
            start = span_id * self.span_size
            end = (self.compressed_archive_size if span_id == self.max_span_id
                   else start + self.span_size)
            return start, end
        points = self.decoded_checkpoints
        end = (self.compressed_archive_size if span_id == self.max_span_id
               else points[span_id + 1].compressed_offset)
        return points[span_id].start, end

    def file_spans(self, entry: FileMetadata) -> range:
        """The spans a file's data needs, as soci's extraction computes them
        (``span_of`` its start to ``span_of`` its end offset); none for an
        empty file, which soci never reads."""
        if entry.uncompressed_size <= 0:
            return range(0)
        first = self.span_of(entry.uncompressed_offset)
        return range(first, self.span_of(entry.uncompressed_offset
                                          + entry.uncompressed_size) + 1)

    def span_uncompressed_start(self, span_id: int) -> int:
        """Uncompressed offset where span ``span_id`` begins."""
        if not 0 <= span_id <= self.max_span_id:
            raise InvalidInput(f"span {span_id} is not in 0 to {self.max_span_id}")
        if self.compression_algorithm != "gzip":
            return span_id * self.span_size
        return self.decoded_checkpoints[span_id].uncompressed_offset


def _ztoc_error(message: str) -> InvalidBlob:
    return InvalidBlob(f"invalid zTOC: {message}")


# --- building -----------------------------------------------------------------

def build_ztoc(stream: BinaryIO, *, span_size: int = DEFAULT_SPAN_SIZE,
               build_tool: str = DEFAULT_BUILD_TOOL,
               compression: str = "gzip") -> Ztoc:
    """The zTOC soci v0.16.1 builds for the layer blob read from ``stream``.

    ``stream`` is read once, sequentially, to its end (wrap it to hash or
    count the blob on the way). ``compression`` is the layer's: "gzip", or
    "uncompressed" for a plain tar; soci builds no zTOC for zstd layers.
    A member soci refuses (sparse files, PAX global headers, an unknown
    type) or a corrupt stream raises :class:`InvalidInput`.
    """
    walk: GzipCheckpointWalk | PlainSpanWalk
    if compression == "gzip":
        walk = GzipCheckpointWalk(stream.read, span_size)
    elif compression == "uncompressed":
        walk = PlainSpanWalk(stream.read, span_size)
    else:
        raise InvalidInput(f"no zTOC for {compression!r} layers: soci builds them "
                           "for gzip and uncompressed layers only")
    tar = PeekableStream(walk)
    files = []
    raw: list[bytes] = []
    for ti in iter_headers(tar, raw=raw):
        files.append(_metadata(ti, raw))
    end = _tar_end(tar)
    while walk.read(1 << 20):
        pass  # the checkpoints and digests need the whole blob
    if isinstance(walk, GzipCheckpointWalk):
        # soci reads the tar through Go's gzip reader, which opens the
        # first member at once and each later one when the tar needs its data.
        for i, (start, is_gzip) in enumerate(walk.members):
            if not is_gzip and (i == 0 or start < end):
                raise InvalidInput(f"compressed member {i + 1} is a zlib stream, not gzip")
        checkpoints = encode_gzip_zinfo(walk.checkpoints, span_size)
        max_span = len(walk.checkpoints) - 1
    else:
        checkpoints = encode_tar_zinfo(span_size, walk.compressed_size)
        size = walk.compressed_size
        max_span = size // span_size - (1 if size % span_size == 0 else 0)
    return Ztoc(
        version=ZTOC_VERSION, build_tool_identifier=build_tool,
        compressed_archive_size=walk.compressed_size,
        uncompressed_archive_size=end, files=tuple(files),
        max_span_id=max_span, span_digests=tuple(walk.span_digests),
        checkpoints=checkpoints, compression_algorithm=compression)


def _tar_end(tar: PeekableStream) -> int:
    """Where Go's tar reader stops after the last member: past one zero block
    and a second one, or at the end of the stream after the first."""
    at = tar.tell()
    head = tar.peek(2 * BLOCK)
    if not head:
        return at
    if head[:BLOCK] != ZERO_BLOCK:
        # iter_headers ends quietly at a PAX global header alone at the end;
        # Go's reader returns it as a member, which soci refuses.
        raise InvalidInput(f"tar member at offset {at} is a PAX global header; "
                           "soci refuses layers with one")
    if len(head) == BLOCK:
        return at + BLOCK
    if head[BLOCK:] != ZERO_BLOCK:
        raise InvalidInput(f"tar stream has a zero block at offset {at} "
                           "not followed by another")
    return at + 2 * BLOCK


def _cstr(field_: bytes) -> str:
    """A NUL-terminated tar field, as Go's parser.parseString reads it."""
    return field_.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _metadata(ti: tarfile.TarInfo, raw: list[bytes]) -> FileMetadata:
    """``ti`` as soci's metadataFromTarReader records it, from the header
    fields as Go's archive/tar decodes them (``raw``: see iter_headers)."""
    gnu_name = gnu_link = ""
    i = 0
    while True:
        block = raw[i]
        kind = block[156:157]
        if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            size = tarfile.nti(block[124:136])  # type: ignore[attr-defined]  # not in typeshed
            text = _cstr(raw[i + 1][:size])
            if kind == tarfile.GNUTYPE_LONGNAME:
                gnu_name = text
            else:
                gnu_link = text
            i += 2
        elif kind == tarfile.XGLTYPE:
            raise InvalidInput(f"tar member {printable(ti.name)!r} follows a PAX global "
                               "header; soci refuses layers with one")
        elif kind in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            i += 2
        else:
            break
    magic, trailer = block[257:263], block[508:512]
    v7 = magic not in (b"ustar\0", b"ustar ")
    name = _cstr(block[0:100])
    if magic == b"ustar\0":
        prefix = _cstr(block[345:476] if trailer == b"tar\0" else block[345:500])
        if prefix:
            name = prefix + "/" + name
    linkname = _cstr(block[157:257])
    pax = ti.pax_headers
    if any(k.startswith("GNU.sparse.") for k in pax):
        raise UnsupportedEntry(printable(ti.name), "sparse files are not supported in a zTOC")
    # Go's mergePAX: an empty record keeps the header's value; then GNU
    # long names win over both.
    name = gnu_name or pax.get("path") or name
    linkname = gnu_link or pax.get("linkpath") or linkname
    uname = pax.get("uname") or ("" if v7 else _cstr(block[265:297]))
    gname = pax.get("gname") or ("" if v7 else _cstr(block[297:329]))
    flag = block[156:157]
    if flag == tarfile.AREGTYPE:
        flag = tarfile.DIRTYPE if name.endswith("/") else tarfile.REGTYPE
    kind_name = _TYPES.get(flag)
    if kind_name is None:
        raise UnsupportedEntry(printable(ti.name),
                               f"tar entry type {flag!r} is not supported by soci")
    return FileMetadata(
        name=name, type=kind_name, uncompressed_offset=ti.offset_data,
        uncompressed_size=ti.size, linkname=linkname, mode=ti.mode,
        uid=ti.uid, gid=ti.gid,
        uname=uname, gname=gname,
        mod_time=_go_time(pax.get("mtime"), ti.mtime),
        devmajor=0 if v7 else ti.devmajor, devminor=0 if v7 else ti.devminor,
        pax_headers=dict(pax))


def _go_time(pax_mtime: str | None, mtime: float) -> str:
    """A tar mtime as Go's ``time.MarshalText`` writes it in UTC: from the
    PAX record's digits when there is one (parsePAXTime: nanoseconds,
    truncated), else the header's whole seconds."""
    if pax_mtime is None:
        secs, nanos = int(mtime), 0
    else:
        whole, _, frac = pax_mtime.partition(".")
        secs = int(whole)
        nanos = int((frac + "000000000")[:9]) if frac else 0
        if whole.startswith("-"):
            nanos = -nanos
    total = secs * 1_000_000_000 + nanos
    secs, nanos = divmod(total, 1_000_000_000)
    days, rest = divmod(secs, 86400)
    year, month, day = _civil(days)
    text = (f"{year:04d}-{month:02d}-{day:02d}T{rest // 3600:02d}:"
            f"{rest // 60 % 60:02d}:{rest % 60:02d}")
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + "Z"


def _civil(days: int) -> tuple[int, int, int]:
    """Proleptic Gregorian (year, month, day) of ``days`` after 1970-01-01
    (H. Hinnant's civil_from_days; ``datetime`` has no year 0)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (1 if month <= 2 else 0), month, day


# --- marshalling ----------------------------------------------------------------

def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def marshal_ztoc(z: Ztoc) -> bytes:
    """The zTOC's flatbuffer bytes, built exactly as soci's ztocToFlatbuffer
    builds them (same order of objects, same omitted defaults)."""
    _check_fits(z)
    b = flatbuffer_builder()
    version = b.CreateString(_b(z.version))
    tool = b.CreateString(_b(z.build_tool_identifier))
    toc = _toc(b, z.files)
    checkpoints = b.CreateByteVector(z.checkpoints)
    digests = [b.CreateString(_b(d)) for d in z.span_digests]
    b.StartVector(4, len(digests), 4)
    for off in reversed(digests):
        b.PrependUOffsetTRelative(off)
    span_digests = b.EndVector()
    b.StartObject(4)  # CompressionInfo
    b.PrependInt32Slot(1, z.max_span_id, 0)
    b.PrependUOffsetTRelativeSlot(2, span_digests, 0)
    b.PrependUOffsetTRelativeSlot(3, checkpoints, 0)
    b.PrependInt8Slot(0, ALGORITHMS[z.compression_algorithm], 1)
    info = b.EndObject()
    b.StartObject(6)  # Ztoc
    b.PrependUOffsetTRelativeSlot(0, version, 0)
    b.PrependUOffsetTRelativeSlot(1, tool, 0)
    b.PrependUOffsetTRelativeSlot(4, toc, 0)
    b.PrependInt64Slot(2, z.compressed_archive_size, 0)
    b.PrependInt64Slot(3, z.uncompressed_archive_size, 0)
    b.PrependUOffsetTRelativeSlot(5, info, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


_INT32 = (-(1 << 31), (1 << 31) - 1)
_UINT32 = (0, (1 << 32) - 1)
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _check_fits(z: Ztoc) -> None:
    """Raise :class:`InvalidInput` unless every number fits its field."""
    if z.compression_algorithm not in ALGORITHMS:
        raise InvalidInput(f"compression algorithm {z.compression_algorithm!r} "
                           "is not one a zTOC can hold")
    values = [("max_span_id", z.max_span_id, _INT32),
              ("compressed_archive_size", z.compressed_archive_size, _INT64),
              ("uncompressed_archive_size", z.uncompressed_archive_size, _INT64)]
    for m in z.files:
        values += [("uncompressed_offset", m.uncompressed_offset, _INT64),
                   ("uncompressed_size", m.uncompressed_size, _INT64),
                   ("mode", m.mode, _INT64), ("uid", m.uid, _UINT32),
                   ("gid", m.gid, _UINT32), ("devmajor", m.devmajor, _INT64),
                   ("devminor", m.devminor, _INT64)]
    for what, value, (low, high) in values:
        if not low <= value <= high:
            raise InvalidInput(f"zTOC {what} {value} does not fit its field")


def _toc(b: flatbuffers.Builder, files: tuple[FileMetadata, ...]) -> int:
    """soci's tocToFlatbuffer: entries built last to first."""
    offsets = [0] * len(files)
    for i in range(len(files) - 1, -1, -1):
        offsets[i] = _file(b, files[i])
    b.StartVector(4, len(files), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    metadata = b.EndVector()
    b.StartObject(1)  # TOC
    b.PrependUOffsetTRelativeSlot(0, metadata, 0)
    return int(b.EndObject())


def _file(b: flatbuffers.Builder, m: FileMetadata) -> int:
    """soci's prepareMetadataOffset."""
    name = b.CreateString(_b(m.name))
    kind = b.CreateString(_b(m.type))
    link = b.CreateString(_b(m.linkname))
    uname = b.CreateString(_b(m.uname))
    gname = b.CreateString(_b(m.gname))
    mod_time = b.CreateString(_b(m.mod_time))
    records = []
    # Go's sort.Strings: byte order.
    for key in sorted(m.pax_headers, key=_b):
        k = b.CreateString(_b(key))
        v = b.CreateString(_b(m.pax_headers[key]))
        b.StartObject(2)  # Xattr
        b.PrependUOffsetTRelativeSlot(0, k, 0)
        b.PrependUOffsetTRelativeSlot(1, v, 0)
        records.append(b.EndObject())
    b.StartVector(4, len(records), 4)
    for off in reversed(records):
        b.PrependUOffsetTRelative(off)
    xattrs = b.EndVector()
    b.StartObject(14)  # FileMetadata
    b.PrependUOffsetTRelativeSlot(0, name, 0)
    b.PrependUOffsetTRelativeSlot(1, kind, 0)
    b.PrependInt64Slot(2, m.uncompressed_offset, 0)
    b.PrependInt64Slot(3, m.uncompressed_size, 0)
    b.PrependUOffsetTRelativeSlot(4, link, 0)
    b.PrependInt64Slot(5, m.mode, 0)
    b.PrependUint32Slot(6, m.uid, 0)
    b.PrependUint32Slot(7, m.gid, 0)
    b.PrependUOffsetTRelativeSlot(8, uname, 0)
    b.PrependUOffsetTRelativeSlot(9, gname, 0)
    b.PrependUOffsetTRelativeSlot(10, mod_time, 0)
    b.PrependInt64Slot(11, m.devmajor, 0)
    b.PrependInt64Slot(12, m.devminor, 0)
    b.PrependUOffsetTRelativeSlot(13, xattrs, 0)
    return int(b.EndObject())


# --- unmarshalling ----------------------------------------------------------------

_I8 = struct.Struct("<b")
_U16 = struct.Struct("<H")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")


class _Table:
    """A flatbuffer table read with every offset checked against the buffer
    (the flatbuffers package's readers trust their input)."""

    def __init__(self, buf: bytes, pos: int, what: str) -> None:
        self.buf = buf
        self.what = what
        _need(buf, pos, 4, what)
        vtable = pos - _I32.unpack_from(buf, pos)[0]
        _need(buf, vtable, 4, what)
        vt_len, obj_len = _U16.unpack_from(buf, vtable)[0], _U16.unpack_from(buf, vtable + 2)[0]
        if vt_len < 4 or vt_len % 2:
            raise _ztoc_error(f"{what} has a vtable of {vt_len} bytes")
        _need(buf, vtable, vt_len, what)
        _need(buf, pos, obj_len, what)
        self.pos, self.vtable, self.vt_len, self.obj_len = pos, vtable, vt_len, obj_len

    def _at(self, slot: int, size: int) -> int | None:
        entry = 4 + 2 * slot
        if entry + 2 > self.vt_len:
            return None
        off: int = _U16.unpack_from(self.buf, self.vtable + entry)[0]
        if off == 0:
            return None
        if off + size > self.obj_len:
            raise _ztoc_error(f"{self.what} field {slot} lies outside its table")
        return self.pos + off

    def scalar(self, slot: int, fmt: struct.Struct, default: int) -> int:
        at = self._at(slot, fmt.size)
        return default if at is None else int(fmt.unpack_from(self.buf, at)[0])

    def _ref(self, slot: int) -> int | None:
        at = self._at(slot, 4)
        if at is None:
            return None
        target: int = at + _U32.unpack_from(self.buf, at)[0]
        _need(self.buf, target, 4, self.what)
        return target

    def table(self, slot: int, what: str) -> _Table | None:
        target = self._ref(slot)
        return None if target is None else _Table(self.buf, target, what)

    def string(self, slot: int, what: str) -> str:
        raw = self.bytes(slot, what)
        return raw.decode("utf-8", "surrogateescape")

    def bytes(self, slot: int, what: str) -> bytes:
        target = self._ref(slot)
        if target is None:
            return b""
        n = _U32.unpack_from(self.buf, target)[0]
        _need(self.buf, target + 4, n, what)
        return self.buf[target + 4:target + 4 + n]

    def vector(self, slot: int, what: str) -> list[int]:
        """Positions of the elements of a vector of tables or strings."""
        target = self._ref(slot)
        if target is None:
            return []
        n = _U32.unpack_from(self.buf, target)[0]
        _need(self.buf, target + 4, 4 * n, what)
        out = []
        for i in range(n):
            at = target + 4 + 4 * i
            elem = at + _U32.unpack_from(self.buf, at)[0]
            _need(self.buf, elem, 4, what)
            out.append(elem)
        return out


def _need(buf: bytes, pos: int, size: int, what: str) -> None:
    if pos < 0 or size < 0 or pos + size > len(buf):
        raise _ztoc_error(f"{what} points outside the {len(buf)}-byte buffer")


def _string_at(buf: bytes, pos: int, what: str) -> str:
    n = _U32.unpack_from(buf, pos)[0]
    _need(buf, pos + 4, n, what)
    return buf[pos + 4:pos + 4 + n].decode("utf-8", "surrogateescape")


def unmarshal_ztoc(data: bytes) -> Ztoc:
    """Read zTOC bytes, checking everything that later use relies on: any
    malformed input raises :class:`InvalidBlob` with a one-line message.

    Checked beyond the flatbuffer's structure: a known compression
    algorithm; checkpoints that decode, one per span; one ``sha256:``
    digest per span; non-negative sizes and offsets; file entries that do
    not overlap (soci's check, on the entries in offset order), each after
    a header block and inside the archive.
    """
    if len(data) > MAX_ZTOC_SIZE:
        raise _ztoc_error(f"{len(data)} bytes is more than {MAX_ZTOC_SIZE}")
    if len(data) < 8:
        raise _ztoc_error(f"{len(data)} bytes is too short")
    root = _Table(data, _U32.unpack_from(data, 0)[0], "root table")
    version = root.string(0, "version")
    tool = root.string(1, "build tool identifier")
    csize = root.scalar(2, _I64, 0)
    usize = root.scalar(3, _I64, 0)
    if csize < 0 or usize < 0:
        raise _ztoc_error(f"archive sizes {csize} and {usize} must not be negative")
    toc = root.table(4, "TOC")
    files = [] if toc is None else [
        _file_from(_Table(data, pos, f"file entry {i}"), i)
        for i, pos in enumerate(toc.vector(0, "TOC metadata"))]
    info = root.table(5, "compression info")
    if info is None:
        raise _ztoc_error("it has no compression info")
    algorithm_value = info.scalar(0, _I8, 1)
    algorithm = {v: k for k, v in ALGORITHMS.items()}.get(algorithm_value)
    if algorithm is None:
        raise _ztoc_error(f"compression algorithm {algorithm_value} is unknown")
    max_span = info.scalar(1, _I32, 0)
    digests = tuple(_string_at(data, pos, f"span digest {i}")
                    for i, pos in enumerate(info.vector(2, "span digests")))
    checkpoints = info.bytes(3, "checkpoints")
    z = Ztoc(version=version, build_tool_identifier=tool, compressed_archive_size=csize,
             uncompressed_archive_size=usize, files=tuple(files), max_span_id=max_span,
             span_digests=digests, checkpoints=checkpoints,
             compression_algorithm=algorithm)
    _check(z)
    return z



def _file_from(t: _Table, i: int) -> FileMetadata:
    pax: dict[str, str] = {}
    for j, pos in enumerate(t.vector(13, f"file entry {i} xattrs")):
        x = _Table(t.buf, pos, f"file entry {i} xattr {j}")
        pax[x.string(0, "xattr key")] = x.string(1, "xattr value")
    m = FileMetadata(
        name=t.string(0, "name"), type=t.string(1, "type"),
        uncompressed_offset=t.scalar(2, _I64, 0), uncompressed_size=t.scalar(3, _I64, 0),
        linkname=t.string(4, "linkname"), mode=t.scalar(5, _I64, 0),
        uid=t.scalar(6, _U32, 0), gid=t.scalar(7, _U32, 0),
        uname=t.string(8, "uname"), gname=t.string(9, "gname"),
        mod_time=t.string(10, "mod time"),
        devmajor=t.scalar(11, _I64, 0), devminor=t.scalar(12, _I64, 0),
        pax_headers=pax)
    if m.uncompressed_offset < 0 or m.uncompressed_size < 0:
        raise _ztoc_error(f"file entry {i} ({printable(m.name)!r}) has offset "
                          f"{m.uncompressed_offset} and size {m.uncompressed_size}")
    return m


def _decode_tar_zinfo(blob: bytes) -> tuple[int, int]:
    """``(span_size, size)`` of a TarZinfo flatbuffer."""
    if len(blob) < 8:
        raise _ztoc_error(f"tar checkpoints of {len(blob)} bytes are too short")
    t = _Table(blob, _U32.unpack_from(blob, 0)[0], "tar checkpoints")
    span_size, size = t.scalar(1, _I64, 0), t.scalar(2, _I64, 0)
    if span_size <= 0 or size < 0:
        raise _ztoc_error(f"tar checkpoints have span size {span_size} and size {size}")
    return span_size, size


def _check(z: Ztoc) -> None:
    """What :func:`unmarshal_ztoc` checks beyond the structure."""
    spans = z.max_span_id + 1
    if z.compression_algorithm == "gzip":
        count = len(z.decoded_checkpoints)
        if count != spans:
            raise _ztoc_error(f"{count} checkpoints for {spans} spans")
        last = z.decoded_checkpoints[-1].start
        if last > z.compressed_archive_size:
            raise _ztoc_error(f"a checkpoint at {last} lies beyond the "
                              f"{z.compressed_archive_size}-byte layer")
    else:
        span_size, size = _decode_tar_zinfo(z.checkpoints)
        want = size // span_size - (1 if size % span_size == 0 else 0)
        if z.max_span_id != want:
            raise _ztoc_error(f"max span id {z.max_span_id} for {size} bytes "
                              f"in spans of {span_size}")
    if len(z.span_digests) != max(spans, 0):
        raise _ztoc_error(f"{len(z.span_digests)} span digests for {spans} spans")
    for i, d in enumerate(z.span_digests):
        if not _DIGEST.match(d):
            raise _ztoc_error(f"span digest {i} {printable(d[:80])!r} is not a sha256 digest")
    # soci's flatbufferToTOC: in offset order, no entry starts before the
    # end of the previous one's data; and, as in any tar, a header block
    # before each entry's data, and all of it before the archive's end.
    next_header = 0
    for m in sorted(z.files, key=lambda m: m.uncompressed_offset):
        if m.uncompressed_offset < next_header + BLOCK:
            raise _ztoc_error(f"file entry {printable(m.name)!r} overlaps the one before it")
        if m.uncompressed_offset + m.uncompressed_size > z.uncompressed_archive_size:
            raise _ztoc_error(f"file entry {printable(m.name)!r} ends beyond the "
                              f"{z.uncompressed_archive_size}-byte archive")
        next_header = padded(m.uncompressed_offset + m.uncompressed_size)

