"""Reading an eStargz blob through ranged reads: footer, TOC, single files.

:class:`LayerReader` needs only a :class:`~estargz.source.RangeSource`. To
list a layer it reads the footer and the TOC; to extract one file it then
reads just that file's chunks -- what a lazy-pulling snapshotter does with
HTTP range requests. A blob written with an external TOC is read with its
TOC blob as a second source.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Iterator

from .._exceptions import DigestMismatch, FooterError, InvalidBlob, NotFound, TOCError
from .footer import (
    EXTERNAL_TOC_FOOTER_SIZE,
    FOOTER_SIZE,
    is_external_toc_footer,
    parse_footer,
)
from .gzipstream import GzipMembersReader
from .source import RangeSource, SequentialReader
from .tarstream import PeekableStream, iter_headers
from .toc import MAX_TOC_JSON_SIZE, TOC, TOC_TAR_NAME, TOCEntry, check_toc, clean_name, decode_toc

_PIECE = 1 << 20


class LayerReader:
    """An opened eStargz blob: its footer, TOC and TOC digest, checked.

    ``toc_source`` is the TOC blob of a blob whose TOC is external (footer
    ``STARGZEXTERNALTOC``); it is required for such a blob and refused for
    any other. Then :attr:`external` is true and :attr:`toc_offset` is the
    end of the payload: data offsets lie below it either way.
    """

    def __init__(self, source: RangeSource, *, toc_source: RangeSource | None = None,
                 max_toc_size: int = MAX_TOC_JSON_SIZE) -> None:
        self.source = source
        size = source.size
        tail = source.read_at(max(0, size - FOOTER_SIZE), min(size, FOOTER_SIZE))
        self.external = is_external_toc_footer(tail)
        if self.external:
            if toc_source is None:
                raise FooterError("the blob's TOC is external (footer STARGZEXTERNALTOC); "
                                  "give its TOC blob (--toc FILE)")
            self.footer_size = EXTERNAL_TOC_FOOTER_SIZE
            self.payload_end = self.toc_offset = size - self.footer_size
            toc_read = SequentialReader(toc_source, 0, toc_source.size).read
            toc_base = 0
        else:
            if toc_source is not None:
                raise FooterError("the blob holds its own TOC; a TOC blob is only for a "
                                  "blob whose TOC is external")
            self.toc_offset, self.footer_size = parse_footer(tail)
            self.payload_end = size - self.footer_size
            if not 0 <= self.toc_offset < self.payload_end:
                raise FooterError(f"footer points at TOC offset {self.toc_offset}, "
                                  f"outside the {size}-byte blob")
            toc_read = SequentialReader(source, self.toc_offset, self.payload_end).read
            toc_base = self.toc_offset
        self._toc_stream = GzipMembersReader(toc_read, base=toc_base, error=TOCError,
                                             track_members=False)
        stream = PeekableStream(self._toc_stream, error=_toc_error)
        headers = iter_headers(stream, error=_toc_error)
        head = next(headers, None)
        if head is None:
            raise TOCError("no tar entry at the TOC offset", offset=self.toc_offset)
        if head.name != TOC_TAR_NAME or not head.isreg():
            raise TOCError(f"tar entry at the TOC offset is {head.name!r}, "
                           f"not {TOC_TAR_NAME!r}", offset=self.toc_offset)
        if head.size > max_toc_size:
            raise TOCError(f"TOC JSON of {head.size} bytes exceeds the "
                           f"{max_toc_size}-byte limit", offset=self.toc_offset)
        self.toc_json = stream.read(head.size)
        if len(self.toc_json) != head.size:
            raise TOCError("TOC JSON is truncated", offset=self.toc_offset)
        #: The stream and header just past the TOC JSON, for the verifier.
        self.toc_header = head
        self.toc_rest = stream
        self.toc_digest = "sha256:" + hashlib.sha256(self.toc_json).hexdigest()
        toc = decode_toc(self.toc_json)
        check_toc(toc, self.toc_offset)
        toc.digest = self.toc_digest
        self._index_toc(toc)

    def _index_toc(self, toc: TOC) -> None:
        """Keep the checked ``toc`` and index it: entries by name, and where
        the members (or frames) holding data start."""
        self.toc: TOC = toc
        self._by_name: dict[str, int] = {}
        for i, e in enumerate(toc.entries):
            if e.type != "chunk":
                self._by_name[clean_name(e.name)] = i
        # A chunk is read from its member's start to the next one (chunks
        # may share a member).
        self._starts = sorted({e.offset for e in toc.entries if e.is_data()})

    @property
    def entries(self) -> list[TOCEntry]:
        return self.toc.entries

    def lookup(self, path: str) -> TOCEntry:
        """The entry at ``path``, following hardlinks. Raises :class:`NotFound`."""
        return self.entries[self._index(path)]

    def _index(self, path: str) -> int:
        i = self._by_name.get(clean_name(path))
        hops = 0
        while i is not None and self.entries[i].type == "hardlink" and hops < 40:
            i = self._by_name.get(clean_name(self.entries[i].link_name))
            hops += 1
        if i is None or self.entries[i].type == "hardlink":
            raise NotFound(f"{path!r} is not in the layer")
        return i

    def chunks(self, path: str) -> list[tuple[TOCEntry, int, int]]:
        """``(entry, size, next_offset)`` for each data chunk of file ``path``."""
        i = self._index(path)
        e = self.entries[i]
        if e.type != "reg":
            raise NotFound(f"{path!r} is not a regular file")
        if e.size == 0:
            return []
        out = []
        entries = self.entries
        j = i
        while j < len(entries) and (j == i or entries[j].type == "chunk"):
            c = entries[j]
            size = c.chunk_size or (e.size - c.chunk_offset)
            nxt = self._next_offset(c.offset)
            out.append((c, size, nxt))
            j += 1
        return out

    def _next_offset(self, offset: int) -> int:
        """Where the gzip member after the one at ``offset`` starts."""
        k = bisect_right(self._starts, offset)
        return self._starts[k] if k < len(self._starts) else self.toc_offset

    def iter_file(self, path: str) -> Iterator[bytes]:
        """Yield the contents of regular file ``path``, reading only its chunks.

        Every chunk is checked against its ``chunkDigest`` and the whole file
        against its ``digest``; a mismatch raises :class:`DigestMismatch`
        after the chunk's bytes (so write to a temporary file and keep it only
        once the iteration completes).
        """
        e = self.lookup(path)
        whole = hashlib.sha256()
        for c, size, nxt in self.chunks(path):
            h = hashlib.sha256()
            for piece in self._chunk_pieces(c, size, nxt, e.name):
                h.update(piece)
                whole.update(piece)
                yield piece
            if "sha256:" + h.hexdigest() != c.chunk_digest:
                raise DigestMismatch("chunk does not match its chunkDigest",
                                     entry=e.name, offset=c.offset)
        if e.digest and "sha256:" + whole.hexdigest() != e.digest:
            raise DigestMismatch("file does not match its digest", entry=e.name)

    def _chunk_pieces(self, c: TOCEntry, size: int, nxt: int, name: str) -> Iterator[bytes]:
        """The uncompressed bytes of chunk ``c`` (``size`` of them, its member
        ending at ``nxt``), read by range: the one step that differs between
        formats (a gzip member here; zstd frames in zstdreader)."""
        return read_member_prefix(self.source, c.offset, nxt, size, name, skip=c.inner_offset)


def read_member_prefix(source: RangeSource, start: int, end: int, size: int,
                       name: str | None = None, *, skip: int = 0) -> Iterator[bytes]:
    """Yield ``size`` uncompressed bytes, after the first ``skip``, of the
    gzip data at ``[start, end)`` of ``source``, reading no byte outside
    that range."""
    def error(message: str, offset: int | None = None) -> InvalidBlob:
        return InvalidBlob(message, entry=name, offset=offset)

    reader = GzipMembersReader(SequentialReader(source, start, end).read, base=start,
                               error=error, track_members=False)
    while skip:
        piece = reader.read(min(skip, _PIECE))
        if not piece:
            raise InvalidBlob(f"gzip member ends {skip} bytes before the chunk's "
                              "innerOffset", entry=name, offset=start)
        skip -= len(piece)
    left = size
    while left:
        piece = reader.read(min(left, _PIECE))
        if not piece:
            raise InvalidBlob(f"chunk data ends {left} bytes early", entry=name, offset=start)
        left -= len(piece)
        yield piece


def _toc_error(message: str, offset: int | None = None) -> TOCError:
    return TOCError(message, offset=offset)
