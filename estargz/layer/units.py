"""The pieces an output layer is built from, shared by the eStargz and
zstd:chunked writers: each entry's tar header and TOC entry, and the *units*
(a unit is one compressed member or frame: optionally one chunk of a file's
payload, then the tar padding and the headers up to the next payload; with
a minimum chunk size, small chunks share a unit), planned before anything
is compressed; and the payload bytes of an entry, read from the input tar
(sparse files expanded). ``converter.py`` compresses and writes them.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import struct
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from .._cancel import check_cancelled
from .._exceptions import (
    InvalidInput,
    UnsupportedEntry,
)
from .order import Landmark, Planned
from .tarstream import printable
from .toc import (
    TOCEntry,
)

# A unit's header run is cut here so that long runs of entries without data
# (thousands of directories) never pile up in memory.
_MAX_TAIL = 1 << 20
#: Bytes read from the input tar at a time.
READ_SIZE = 1 << 20
# PAX records the output header re-derives from the entry's fields, or that
# describe the input encoding rather than the file.
_DROP_PAX = frozenset({"path", "linkpath", "size", "uid", "gid", "uname",
                       "gname", "mtime", "comment", "charset", "hdrcharset"})
_XATTR_PREFIX = "SCHILY.xattr."


# --- building headers and TOC entries ------------------------------------

# Files of a layer share a handful of mtimes: formatting each once saves
# a gmtime and a format per entry on the converter's main thread.
@functools.lru_cache(maxsize=4096)
def format_modtime(mtime: float) -> str:
    """The TOC's ``modtime``: UTC, RFC 3339, rounded to the second; ``""``
    for the Unix epoch itself (Go's ``formatModtime``)."""
    if math.floor(mtime) == 0:
        return ""
    t = time.gmtime(math.floor(mtime + 0.5))
    return (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
            f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}Z")


_TYPES = {
    tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}


def entry_header(m: Planned) -> tuple[bytes, TOCEntry, int]:
    """Return the output tar header bytes, the TOC entry and the payload size."""
    if isinstance(m, Landmark):
        o = tarfile.TarInfo(m.name)
        o.size = len(m.contents)
        o.mode = 0o644
        return o.tobuf(tarfile.PAX_FORMAT), TOCEntry(
            name=m.name, type="reg", size=o.size, mode=o.mode), o.size
    o = tarfile.TarInfo(m.name)
    o.type = tarfile.REGTYPE if m.isreg() else m.type
    o.mode = m.mode & 0o7777
    o.uid, o.gid, o.uname, o.gname = m.uid, m.gid, m.uname, m.gname
    o.mtime = m.mtime
    o.linkname = m.linkname if m.issym() or m.islnk() else ""
    o.devmajor, o.devminor = m.devmajor, m.devminor
    o.size = m.size if m.isreg() else 0
    o.pax_headers = {k: v for k, v in m.pax_headers.items()
                     if k not in _DROP_PAX and not k.startswith("GNU.sparse.")}
    try:
        header = ustar_header(o) or o.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        modtime = format_modtime(m.mtime)
    except (ValueError, OverflowError, OSError) as e:
        raise UnsupportedEntry(printable(m.name), f"cannot be written: {e}") from None
    name = o.name + "/" if o.type == tarfile.DIRTYPE and not o.name.endswith("/") else o.name
    xattrs = {k[len(_XATTR_PREFIX):]: v.encode("utf-8", "surrogateescape")
              for k, v in o.pax_headers.items() if k.startswith(_XATTR_PREFIX)}
    entry = TOCEntry(name=name, type=_TYPES.get(o.type, "reg"), size=o.size,
                     modtime=modtime, link_name=o.linkname, mode=o.mode,
                     uid=o.uid, gid=o.gid, user_name=o.uname, group_name=o.gname,
                     xattrs=xattrs)
    if o.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        entry.dev_major, entry.dev_minor = o.devmajor, o.devminor
    return header, entry, o.size


_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
_NUMBER_7 = 8 ** 7  # what 7 octal digits hold (uid, gid, mode, devices)
_NUMBER_11 = 8 ** 11  # what 11 octal digits hold (size, mtime)


def ustar_header(o: tarfile.TarInfo) -> bytes | None:
    """``o.tobuf(tarfile.PAX_FORMAT)`` when that is one ustar block (no PAX
    record needed: ASCII names that fit, whole-second mtime, numbers that
    fit), else ``None``. The same bytes in a tenth of the time: tarfile's
    header builder was a sixth of the converter's GIL-held time on a layer
    of many small files. tests/test_units_header.py holds it to tarfile's output."""
    name = o.name + "/" if o.type == tarfile.DIRTYPE and not o.name.endswith("/") else o.name
    mtime, type_ = o.mtime, o.type
    if o.pax_headers or type(mtime) is not int or len(type_) != 1:
        return None
    for text, limit in ((name, 100), (o.linkname, 100), (o.uname, 32), (o.gname, 32)):
        if len(text) > limit or not text.isascii():
            return None
    if not (0 <= o.uid < _NUMBER_7 and 0 <= o.gid < _NUMBER_7 and 0 <= o.size < _NUMBER_11
            and 0 <= mtime < _NUMBER_11):
        return None
    if type_ in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        if not (0 <= o.devmajor < _NUMBER_7 and 0 <= o.devminor < _NUMBER_7):
            return None
        major, minor = b"%07o\0" % o.devmajor, b"%07o\0" % o.devminor
    else:
        major = minor = b""
    block = _USTAR.pack(
        name.encode("ascii"), b"%07o\0" % (o.mode & 0o7777), b"%07o\0" % o.uid,
        b"%07o\0" % o.gid, b"%011o\0" % o.size, b"%011o\0" % mtime, b"        ", type_,
        o.linkname.encode("ascii"), b"ustar\x0000", o.uname.encode("ascii"),
        o.gname.encode("ascii"), major, minor, b"")
    # The checksum: every byte, its own field counted as spaces.
    return block[:148] + b"%06o\0" % sum(block) + block[155:]


def padding(size: int) -> bytes:
    return bytes(-size % tarfile.BLOCKSIZE)


# --- units: the gzip members of the output --------------------------------

class Data:
    """A payload chunk in a unit: bytes ``[start, start+length)`` of
    ``member``'s data, at uncompressed offset ``inner`` of the unit."""

    __slots__ = ("member", "start", "length", "entry", "inner")

    def __init__(self, member: Planned, start: int, length: int, entry: TOCEntry,
                 inner: int) -> None:
        self.member = member
        self.start = start
        self.length = length
        self.entry = entry
        self.inner = inner


class Unit:
    """One output gzip member: payload chunks and the header bytes between
    them, in order. Without a minimum chunk size it holds at most one
    chunk, first; the first unit of a layer holds none."""

    __slots__ = ("pieces", "entries", "size", "tail_size")

    def __init__(self) -> None:
        self.pieces: list[Data | bytearray] = []
        # TOC entries in TOC order.
        self.entries: list[TOCEntry] = []
        self.size = 0  # uncompressed bytes
        self.tail_size = 0  # uncompressed bytes since the last chunk

    def add_bytes(self, data: bytes) -> None:
        last = self.pieces[-1] if self.pieces else None
        if isinstance(last, bytearray):
            last += data
        else:
            self.pieces.append(bytearray(data))
        self.size += len(data)
        self.tail_size += len(data)

    def add_data(self, m: Planned, start: int, length: int, entry: TOCEntry) -> None:
        self.pieces.append(Data(m, start, length, entry, self.size))
        self.entries.append(entry)
        self.size += length
        self.tail_size = 0

    @property
    def tail(self) -> bytes | bytearray:
        """The header bytes after the unit's last chunk (all of them, for a
        unit without one)."""
        last = self.pieces[-1] if self.pieces else None
        return last if isinstance(last, bytearray) else b""

    @property
    def has_data(self) -> bool:
        return any(isinstance(p, Data) for p in self.pieces)


class _MemberSize:
    """How many compressed bytes a unit's gzip member holds so far, as
    ``plan_units`` needs it to cut units by the reference's rule: before each
    chunk the reference sync-flushes its gzip writer and starts a new member
    once the compressed bytes since the member's start reach the minimum
    chunk size (estargz.go's ``w.cw.n-prevOffset >= MinChunkSize``).

    The plan must exist before the units are compressed (in parallel, with
    the same output for any number of workers), so the real sizes are not
    known yet: a raw deflate at level 1 stands in for them. It is cheap,
    deterministic, and independent of the backend and level the layer is
    written with. Once the count reaches the limit nothing more is fed: the
    next chunk starts a new unit anyway, so a large file costs at most about
    ``limit`` compressed bytes of work.
    """

    # Pieces fed at a time: stop soon after the limit within a large read.
    _SLICE = 1 << 16

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._z = zlib.compressobj(1, zlib.DEFLATED, -15)

    @property
    def full(self) -> bool:
        return self.size >= self.limit

    def feed(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        for at in range(0, len(view), self._SLICE):
            if self.full:
                return
            self.size += len(self._z.compress(view[at:at + self._SLICE]))

    def feed_payload(self, fd: int, m: Planned, start: int, length: int) -> None:
        for piece in read_payload(fd, m, start, length):
            check_cancelled()
            self.feed(piece)
            if self.full:
                return

    def flushed(self) -> int:
        """The count after a sync flush, as the reference measures it."""
        if not self.full:
            self.size += len(self._z.flush(zlib.Z_SYNC_FLUSH))
        return self.size


def plan_units(planned: Sequence[Planned], chunk_size: int,
                header_of: Callable[[Planned], tuple[bytes, TOCEntry, int]] = entry_header,
                min_chunk_size: int = 0, *, fresh: int = -1, fd: int = -1,
                lossless: bool = False, trailer: bytes = b"") -> Iterator[Unit]:
    """Cut ``planned`` into units, each entry's header and TOC entry made by
    ``header_of``. A chunk starts a new unit unless the current one holds a
    chunk and, compressed, fewer than ``min_chunk_size`` bytes (the
    reference's rule; see ``_MemberSize``: the payloads are read from ``fd``,
    the input tar, to measure it); the chunks of ``planned[:fresh + 1]``
    (prioritized files and the landmark) always start one, so the prefetched
    range ends exactly at the landmark. ``lossless``: headers and padding are
    the input's own bytes, read from ``fd``. ``trailer`` ends the last unit."""
    if (lossless or min_chunk_size > 0) and fd < 0:
        raise ValueError("plan_units needs the input tar's fd for lossless "
                         "or a minimum chunk size")
    unit = Unit()
    member: _MemberSize | None = None  # with a minimum chunk size, of ``unit``
    pos = 0  # lossless: input bytes consumed
    for i, m in enumerate(planned):
        header, entry, size = header_of(m)
        if lossless:
            assert isinstance(m, tarfile.TarInfo)
            header = _pread_all(fd, pos, m.offset_data - pos, m)
            pos = m.offset_data + size
        unit.add_bytes(header)
        if member is not None:
            member.feed(header)
        if not size:
            if entry.type == "reg":
                entry.digest = _EMPTY_DIGEST
            unit.entries.append(entry)
        for start in range(0, size, chunk_size):
            n = min(chunk_size, size - start)
            # A unit without a chunk (the first, or one cut by _MAX_TAIL)
            # never takes one: no member is measured for it.
            if member is None or i <= fresh or member.flushed() >= min_chunk_size:
                yield unit
                unit = Unit()
                member = _MemberSize(min_chunk_size) if min_chunk_size > 0 else None
            e = entry if start == 0 else TOCEntry(name=entry.name, type="chunk")
            e.chunk_offset = start
            if n == chunk_size:
                e.chunk_size = n  # as the reference: omitted for a short last chunk
            unit.add_data(m, start, n, e)
            if member is not None:
                member.feed_payload(fd, m, start, n)
        if size:
            pad = padding(size)
            if lossless:
                assert isinstance(m, tarfile.TarInfo)
                pad = _pread_all(fd, pos, len(pad), m)
                pos += len(pad)
            unit.add_bytes(pad)
            if member is not None:
                member.feed(pad)
        if unit.tail_size > _MAX_TAIL:
            yield unit
            unit = Unit()
            member = None
    if lossless:
        trailer = _pread_all(fd, pos, os.fstat(fd).st_size - pos, None)
    unit.add_bytes(trailer)
    yield unit


def _pread_all(fd: int, offset: int, length: int, m: tarfile.TarInfo | None) -> bytes:
    """Input bytes ``[offset, offset+length)``: headers and padding, small."""
    parts = list(_pread(fd, offset, length, m))
    return parts[0] if len(parts) == 1 else b"".join(parts)


_EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()


def read_payload(fd: int, m: Planned, start: int, length: int) -> Iterator[bytes]:
    """Yield bytes ``[start, start+length)`` of entry ``m``'s payload.

    Sparse entries are expanded: holes read as zeros.
    """
    if isinstance(m, Landmark):
        yield m.contents[start:start + length]
        return
    if not m.sparse:
        yield from _pread(fd, m.offset_data + start, length, m)
        return
    pos, end, stored = start, start + length, m.offset_data
    # typeshed types TarInfo.sparse as int; it is a list of (offset, size).
    sparse = cast("list[tuple[int, int]]", m.sparse)
    for off, n in sorted(sparse):
        if pos >= end:
            break
        if off + n <= pos:
            stored += n
            continue
        if off > pos:  # a hole before this data block
            gap = min(off, end) - pos
            yield from _zeros(gap)
            pos += gap
            if pos >= end:
                break
        skip = pos - off
        take = min(n - skip, end - pos)
        yield from _pread(fd, stored + skip, take, m)
        pos += take
        stored += n
    if pos < end:
        yield from _zeros(end - pos)


def _zeros(n: int) -> Iterator[bytes]:
    while n:
        k = min(n, READ_SIZE)
        yield bytes(k)
        n -= k


def _pread(fd: int, offset: int, length: int,
           m: tarfile.TarInfo | None) -> Iterator[bytes]:
    while length:
        got = os.pread(fd, min(length, READ_SIZE), offset)
        if not got:
            where = f"the data of {printable(m.name)!r}" if m is not None else "its end"
            raise InvalidInput(f"input tar is truncated in {where}")
        yield got
        offset += len(got)
        length -= len(got)


