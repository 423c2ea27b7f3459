"""Reading and verifying zstd:chunked blobs, beside :mod:`.reader` and
:mod:`.verify` for eStargz.

:func:`open_layer` tells the formats apart by their footers and returns a
reader with the same interface either way, so ``layer toc | ls | extract``
read a zstd:chunked blob by range exactly as an eStargz one: the footer, the
TOC (bounded, digest-checked, with the same consistency rules) and the
frames of the one file asked for. :func:`verify_layer` checks every byte:
the frames decompress to one tar whose headers match the TOC, every chunk
starts a frame at its offset and matches its digests, and the tar-split
data reassembles to exactly that stream.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from collections import deque
from collections.abc import Callable, Container, Iterator
from dataclasses import replace
from typing import Any

from .._exceptions import DigestMismatch, EstargzError, InvalidBlob, InvalidInput, TOCError
from .reader import LayerReader
from .source import RangeSource, SequentialReader
from .tarstream import BLOCK, PeekableStream, iter_headers
from .toc import MAX_TOC_JSON_SIZE, TOCEntry, check_toc, clean_name, decode_toc
from .units import format_modtime
from .verify import VerifyReport, _compare, _verify_file, verify_blob
from .zstdchunked import (
    SKIPPABLE_MAGIC,
    _crc64_model,
    _zstandard,
    decompress_bounded,
    exact_modtime,
    is_zstdchunked,
    parse_footer,
)

_PIECE = 1 << 20
_FEED = 1 << 10
_SKIP_HEADER = 8
#: The tar-split data is about a third of the tar headers' size; this bounds
#: a hostile one (it is streamed, never held decompressed).
MAX_TARSPLIT_LINE = 64 << 20


class ZstdChunkedReader(LayerReader):
    """An opened zstd:chunked blob: footer, TOC and TOC digest, checked.

    ``toc_digest`` is the sha256 of the TOC JSON (what the reference's
    ``VerifyTOC`` checks); ``manifest_checksum`` the sha256 of the compressed
    TOC (containers/storage's ``manifest-checksum`` annotation).
    """

    def __init__(self, source: RangeSource, *,  # noqa: D107
                 max_toc_size: int = MAX_TOC_JSON_SIZE) -> None:
        self.source = source
        offset, clen, ulen = parse_footer(source)
        if ulen > max_toc_size:
            raise TOCError(f"TOC JSON of {ulen} bytes exceeds the "
                           f"{max_toc_size}-byte limit", offset=offset)
        self.manifest_offset = offset
        self.manifest_size = clen
        compressed = source.read_at(offset, clen)
        self.manifest_checksum = "sha256:" + hashlib.sha256(compressed).hexdigest()
        self.toc_json = decompress_bounded(compressed, ulen, "TOC", offset)
        #: Where the frames end: the TOC's skippable frame starts here.
        self.toc_offset = self.payload_end = offset - _SKIP_HEADER
        self.footer_size = source.size - self.payload_end
        self.toc_digest = "sha256:" + hashlib.sha256(self.toc_json).hexdigest()
        toc = decode_toc(self.toc_json)
        check_toc(toc, self.toc_offset)
        toc.digest = self.toc_digest
        self._index_toc(toc)
        self.tar_split_digest = _tar_split_digest(self.toc_json)

    def _chunk_pieces(self, c: TOCEntry, size: int, nxt: int, name: str) -> Iterator[bytes]:
        # zstd:chunked: every chunk starts a frame (no innerOffset).
        return read_frames_prefix(self.source, c.offset, nxt, size, name)


def _tar_split_digest(toc_json: bytes) -> str:
    # decode_toc keeps only entries; the top-level field is read here.
    value = json.loads(toc_json).get("tarSplitDigest", "")
    if not isinstance(value, str):
        raise TOCError("TOC 'tarSplitDigest' is not a string")
    return value


def open_layer(source: RangeSource, *, toc_source: RangeSource | None = None,
               ) -> LayerReader:
    """A reader for eStargz or zstd:chunked ``source``, told apart by its
    footer; ``toc_source`` is the TOC blob of an eStargz blob whose TOC is
    external."""
    if is_zstdchunked(source):
        _no_toc_blob(toc_source)
        return ZstdChunkedReader(source)
    return LayerReader(source, toc_source=toc_source)


def _no_toc_blob(toc_source: RangeSource | None) -> None:
    # A zstd:chunked TOC is always inside the blob; a TOC blob given with
    # one is a mistake to report, not a thing to ignore.
    if toc_source is not None:
        raise InvalidInput("a zstd:chunked blob holds its own TOC; a TOC blob is only "
                           "for an eStargz blob with an external TOC")


def read_frames_prefix(source: RangeSource, start: int, end: int, size: int,
                       name: str | None = None) -> Iterator[bytes]:
    """Yield the first ``size`` uncompressed bytes of the zstd frames at
    ``[start, end)`` of ``source``, reading no byte outside that range."""
    reader = ZstdFramesReader(SequentialReader(source, start, end).read, base=start,
                              error=lambda m, offset=None: InvalidBlob(
                                  m, entry=name, offset=offset))
    left = size
    while left:
        piece = reader.read(min(left, _PIECE))
        if not piece:
            raise InvalidBlob(f"chunk data ends {left} bytes early", entry=name, offset=start)
        left -= len(piece)
        yield piece


class ZstdFramesReader:
    """Decompress concatenated zstd frames, recording where each starts.

    The same interface as :class:`~.gzipstream.GzipMembersReader` (frames
    for members), so the verifier's checks serve both formats. Skippable
    frames inside the data are refused: nothing but data belongs there.
    """

    def __init__(self, read_compressed: Callable[[int], bytes], base: int = 0,
                 error: Callable[..., EstargzError] = InvalidBlob,
                 track_members: bool | Container[int] = True) -> None:
        self._read = read_compressed
        self._cpos = base
        self._in = memoryview(b"")
        self._at = 0
        self._d: Any = None
        self._upos = 0
        self._error = error
        self._wanted: Container[int] | None = (
            None if track_members is True else
            frozenset() if track_members is False else track_members)
        self.member_starts: deque[tuple[int, int]] = deque()
        self.members = 0
        self._zstd = _zstandard()
        self._dctx = self._zstd.ZstdDecompressor()
        # Output of the last call not yet returned, and how much of it was.
        self._pending = memoryview(b"")
        self._pat = 0

    @property
    def compressed_offset(self) -> int:
        return self._cpos

    def tell(self) -> int:
        return self._upos

    def at_member_end(self) -> bool:
        return self._d is None and self._pat == len(self._pending)

    def read(self, n: int = -1) -> bytes:
        """Return up to ``n`` decompressed bytes; fewer only at the end."""
        if n < 0:
            n = 1 << 62
        out = []
        need = n
        while need > 0:
            if self._pat < len(self._pending):
                take = self._pending[self._pat:self._pat + need]
                self._pat += len(take)
                out.append(bytes(take))
                need -= len(take)
                self._upos += len(take)
                continue
            if self._d is None:
                if self._at == len(self._in) and not self._refill():
                    break
                if bytes(self._in[self._at:self._at + 4]) == SKIPPABLE_MAGIC:
                    raise self._error("skippable frame inside the data", offset=self._cpos)
                self._d = self._dctx.decompressobj()
                self.members += 1
                if self._wanted is None or self._cpos in self._wanted:
                    self.member_starts.append((self._upos, self._cpos))
            # Fed in small slices: zstandard's decompressobj has no output
            # limit, and one byte of an RLE block can stand for 128 KiB, so
            # a slice bounds what one call can produce (32 MiB), not the frame.
            src = bytes(self._in[self._at:self._at + _FEED])
            d = self._d
            try:
                data = d.decompress(src)
            except self._zstd.ZstdError as e:
                raise self._error(f"invalid zstd data: {e}", offset=self._cpos) from None
            used = len(src) - len(d.unused_data) if d.eof else len(src)
            self._at += used
            self._cpos += used
            if d.eof:
                self._d = None
            self._pending, self._pat = memoryview(data), 0
            if not data and self._d is not None and self._at == len(self._in) \
                    and not self._refill():
                raise self._error("zstd stream is truncated", offset=self._cpos)
        return b"".join(out)

    def _refill(self) -> bool:
        self._in = memoryview(self._read(_PIECE))
        self._at = 0
        return len(self._in) > 0


def verify_layer(source: RangeSource, toc_digest: str | None = None, *,
                 toc_source: RangeSource | None = None) -> VerifyReport:
    """Verify an eStargz or zstd:chunked blob (told apart by its footer);
    ``toc_source`` is the TOC blob of an eStargz blob whose TOC is external."""
    if is_zstdchunked(source):
        _no_toc_blob(toc_source)
        return verify_zstdchunked(source, toc_digest)
    return verify_blob(source, toc_digest, toc_source=toc_source)


def verify_zstdchunked(source: RangeSource, toc_digest: str | None = None) -> VerifyReport:
    """Verify every byte of zstd:chunked ``source``; raise :class:`InvalidBlob`
    (or a subclass) naming the first problem. ``toc_digest`` may be the TOC
    JSON's digest or the manifest checksum (the compressed TOC's)."""
    # Over 60 lines: the checks follow the blob's layout (footer, TOC,
    # tar-split, every frame), each using what the one before established.
    layer = ZstdChunkedReader(source)
    if toc_digest is not None and toc_digest not in (layer.toc_digest,
                                                      layer.manifest_checksum):
        raise DigestMismatch(f"TOC digest is {layer.toc_digest} (manifest checksum "
                             f"{layer.manifest_checksum}), expected {toc_digest}")
    split = _TarSplitChecker(layer)
    entries = layer.entries
    wanted = {e.offset for e in entries if e.is_data()} | {
        e.end_offset for e in entries if e.end_offset}
    frames = ZstdFramesReader(SequentialReader(source, 0, layer.payload_end).read,
                              track_members=wanted)
    stream = PeekableStream(_Tee(frames, split.feed), error=_blob_error)
    starts: dict[int, list[int]] = {}
    upos_of: dict[int, int] = {}  # compressed offset -> uncompressed start

    def member_offsets_at(upos: int) -> list[int]:
        while frames.member_starts and frames.member_starts[0][0] <= upos:
            u, c = frames.member_starts.popleft()
            starts.setdefault(u, []).append(c)
            upos_of[c] = u
        for u in [u for u in starts if u < upos]:
            del starts[u]
        return starts.get(upos, [])

    ends: list[tuple[int, int, str]] = []  # (endOffset, data end, name)
    pos = files = chunks = 0
    for ti in iter_headers(stream, error=_blob_error):
        if pos >= len(entries):
            raise InvalidBlob("tar entry is not in the TOC", entry=ti.name)
        e = entries[pos]
        exact = exact_modtime(ti.mtime)
        if exact is not None:
            # zstd:chunked TOCs carry a header's fraction of a second.
            if e.modtime != exact:
                raise InvalidBlob(f"tar header and TOC disagree on modtime: {exact!r} vs "
                                  f"{e.modtime!r}", entry=e.name, offset=e.offset or None)
            _compare(ti, replace(e, modtime=format_modtime(ti.mtime)))
        else:
            _compare(ti, e)
        pos += 1
        if e.type != "reg" or e.size == 0:
            if e.end_offset:
                raise TOCError("entry without data has an endOffset", entry=e.name)
            continue
        files += 1
        pos, n = _verify_file(stream, ti, entries, pos, member_offsets_at)
        chunks += n
        if e.end_offset:
            ends.append((e.end_offset, ti.offset_data + e.size, e.name))
    if pos != len(entries):
        raise InvalidBlob("TOC entry has no tar entry", entry=entries[pos].name)
    trailing = stream.read(20 * BLOCK)
    if trailing.strip(b"\x00") or stream.read(1) or not frames.at_member_end():
        raise InvalidBlob("data follows the end of the tar archive",
                          offset=frames.compressed_offset)
    if frames.compressed_offset != layer.payload_end:
        raise InvalidBlob("zstd frames do not end at the TOC", offset=frames.compressed_offset)
    member_offsets_at(1 << 62)
    for end, data_end, name in ends:
        # containers/storage reads [offset, endOffset) for the file: its
        # data must be complete before a frame starting there.
        if end != layer.payload_end and upos_of.get(end, -1) < data_end:
            raise TOCError("endOffset does not follow the file's last frame",
                           entry=name, offset=end)
    split.finish()
    return VerifyReport(toc_digest=layer.toc_digest, entries=pos, files=files,
                        chunks=chunks, gzip_members=frames.members,
                        uncompressed_size=frames.tell())


class _Tee:
    """A ``read``-able that hands every byte it returns to ``sink`` too."""

    def __init__(self, inner: ZstdFramesReader, sink: Callable[[bytes], None]) -> None:
        self._inner = inner
        self._sink = sink

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        if data:
            self._sink(data)
        return data


class _TarSplitChecker:
    """Checks, as the uncompressed stream passes, that the tar-split data
    rebuilds it byte for byte: each segment is the next raw bytes, each file
    entry the next payload with its CRC-64, names in the TOC's order."""

    def __init__(self, layer: ZstdChunkedReader) -> None:
        self._names = iter([clean_name(e.name) for e in layer.entries if e.type != "chunk"])
        self._lines: Iterator[bytes] | None = None
        self._position = 0
        self._segment = memoryview(b"")
        self._file_left = 0
        self._file_crc = 0
        self._want_crc = b""
        self._file_name = ""
        self._crc64 = _crc64_model().calc
        self._seen: set[str] = set()
        pos = layer.manifest_offset + layer.manifest_size
        if not layer.tar_split_digest:
            return  # the reference's and older writers' blobs have none
        source = layer.source
        if pos + _SKIP_HEADER > source.size:
            raise InvalidBlob("TOC names tar-split data the blob lacks", offset=pos)
        head = source.read_at(pos, _SKIP_HEADER)
        length = struct.unpack("<I", head[4:])[0]
        if head[:4] != SKIPPABLE_MAGIC or pos + _SKIP_HEADER + length > source.size - 48 \
                or length > MAX_TOC_JSON_SIZE:
            raise InvalidBlob("no tar-split skippable frame after the TOC", offset=pos)
        data = source.read_at(pos + _SKIP_HEADER, length)
        if "sha256:" + hashlib.sha256(data).hexdigest() != layer.tar_split_digest:
            raise DigestMismatch("tar-split data does not match the TOC's tarSplitDigest",
                                 offset=pos)
        self._lines = self._iter_lines(data, pos)

    @staticmethod
    def _iter_lines(data: bytes, pos: int) -> Iterator[bytes]:
        zstandard = _zstandard()
        buf = b""
        try:
            with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as r:
                while True:
                    piece = r.read(_PIECE)
                    if not piece:
                        break
                    buf += piece
                    *lines, buf = buf.split(b"\n")
                    yield from lines
                    if len(buf) > MAX_TARSPLIT_LINE:
                        raise InvalidBlob("tar-split line is too long", offset=pos)
        except zstandard.ZstdError as e:
            raise InvalidBlob(f"tar-split data is not valid zstd: {e}", offset=pos) from None
        if buf.strip():
            yield buf

    def _next(self) -> bool:
        """Load the next entry; False when there is none."""
        assert self._lines is not None
        for line in self._lines:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                kind, position = obj["type"], obj["position"]
            except (ValueError, KeyError, TypeError):
                raise InvalidBlob("tar-split entry is not valid JSON") from None
            if position != self._position:
                raise InvalidBlob(f"tar-split entry {self._position} says position {position!r}")
            self._position += 1
            payload = _b64(obj.get("payload"))
            if kind == 2:
                self._segment = memoryview(payload)
                if payload:
                    return True
                continue
            if kind != 1:
                raise InvalidBlob(f"tar-split entry {position} has unknown type {kind!r}")
            size = obj.get("size", 0)
            if type(size) is not int or size < 0:
                raise InvalidBlob(f"tar-split entry {position} has a bad size")
            name = obj.get("name") or _b64(obj.get("name_raw")).decode("utf-8", "replace")
            if not isinstance(name, str):
                raise InvalidBlob(f"tar-split entry {position} has a bad name")
            if clean_name(name) != next(self._names, None):
                raise InvalidBlob(f"tar-split file {name!r} is not the next TOC entry")
            if size and len(payload) != 8:
                raise InvalidBlob(f"tar-split file {name!r} has no CRC-64")
            self._file_left, self._file_crc, self._want_crc = size, 0, payload
            self._file_name = name
            if size:
                return True
        return False

    def feed(self, data: bytes) -> None:
        if self._lines is None:
            return
        view = memoryview(data)
        while view:
            if self._segment:
                n = min(len(self._segment), len(view))
                if self._segment[:n] != view[:n]:
                    raise InvalidBlob("tar-split segment differs from the tar stream")
                self._segment, view = self._segment[n:], view[n:]
            elif self._file_left:
                n = min(self._file_left, len(view))
                self._file_crc = self._crc64(view[:n], self._file_crc)
                self._file_left -= n
                view = view[n:]
                if not self._file_left and \
                        struct.pack(">Q", self._file_crc) != self._want_crc:
                    raise InvalidBlob("tar-split CRC-64 does not match the file",
                                      entry=self._file_name)
            elif not self._next():
                raise InvalidBlob("tar stream goes on past the tar-split data")

    def finish(self) -> None:
        if self._lines is None:
            return
        if self._segment or self._file_left or self._next():
            raise InvalidBlob("tar-split data goes on past the tar stream")


def _b64(value: Any) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise InvalidBlob("tar-split payload is not base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBlob("tar-split payload is not base64") from None


def _blob_error(message: str, offset: int | None = None) -> InvalidBlob:
    return InvalidBlob(message, offset=offset)


__all__ = ["ZstdChunkedReader", "ZstdFramesReader", "open_layer", "read_frames_prefix",
           "verify_layer", "verify_zstdchunked"]
