"""Full verification of an eStargz blob, in one streaming pass.

Checks, in order, and stops at the first problem:

* the footer, the TOC entry and its JSON, and its digest (also against an
  expected one, e.g. from a manifest annotation);
* the TOC's own consistency (``toc.check_toc``);
* that the bytes before the footer are one valid gzip stream (every member's
  CRC and length) holding one valid tar archive whose last entry is the TOC;
* that each tar header agrees with its TOC entry, in order;
* that every payload chunk starts a gzip member at exactly its TOC offset,
  and matches its chunk digest, and every file its digest.

Memory stays bounded: payloads are streamed; only the TOC is held.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

from .._exceptions import DigestMismatch, InvalidBlob, TOCError
from .converter import format_modtime
from .gzipstream import GzipMembersReader
from .reader import LayerReader
from .source import RangeSource, SequentialReader
from .tarstream import BLOCK, PeekableStream, iter_headers, padded
from .toc import TOC_TAR_NAME, TOCEntry, clean_name

_PIECE = 1 << 20
_KINDS = {
    tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
    tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg",
}
_XATTR = "SCHILY.xattr."


@dataclass(frozen=True)
class VerifyReport:
    """What a successful verification saw."""

    toc_digest: str
    entries: int
    files: int
    chunks: int
    gzip_members: int
    uncompressed_size: int


def verify_blob(source: RangeSource, toc_digest: str | None = None, *,
                toc_source: RangeSource | None = None) -> VerifyReport:
    """Verify the whole blob in ``source`` (with its TOC blob ``toc_source``
    if its TOC is external); raise :class:`InvalidBlob` (or a subclass)
    naming the first problem found, with entry and offset."""
    layer = LayerReader(source, toc_source=toc_source)
    if toc_digest is not None and toc_digest != layer.toc_digest:
        raise DigestMismatch(f"TOC digest is {layer.toc_digest}, expected {toc_digest}")
    _check_toc_tail(layer)
    # Only members at offsets the TOC names matter; recording every start
    # would let a blob of millions of empty members fill memory.
    wanted = {e.offset for e in layer.entries if e.is_data()} | {layer.toc_offset}
    gz = GzipMembersReader(SequentialReader(source, 0, layer.payload_end).read,
                           track_members=wanted)
    stream = PeekableStream(gz, error=_blob_error)
    starts: dict[int, list[int]] = {}

    def member_offsets_at(upos: int) -> list[int]:
        """Compressed offsets of the members that start at uncompressed ``upos``."""
        while gz.member_starts and gz.member_starts[0][0] <= upos:
            u, c = gz.member_starts.popleft()
            starts.setdefault(u, []).append(c)
        for u in [u for u in starts if u < upos]:
            del starts[u]
        return starts.get(upos, [])

    entries = layer.entries
    pos = 0  # index into TOC entries
    files = chunks = 0
    toc_seen = False
    for ti in iter_headers(stream, error=_blob_error):
        if toc_seen:
            raise InvalidBlob("tar entry after the TOC", entry=ti.name)
        if ti.name == TOC_TAR_NAME:
            member_offsets_at(ti.offset)
            if layer.toc_offset not in starts.get(ti.offset, []):
                raise InvalidBlob("TOC header does not start the gzip member the footer "
                                  "points at", entry=ti.name, offset=layer.toc_offset)
            toc_seen = True
            continue
        if pos >= len(entries):
            raise InvalidBlob("tar entry is not in the TOC", entry=ti.name)
        e = entries[pos]
        _compare(ti, e)
        pos += 1
        if e.type != "reg" or e.size == 0:
            continue
        files += 1
        pos, n = _verify_file(stream, ti, entries, pos, member_offsets_at)
        chunks += n
    if toc_seen and layer.external:
        raise InvalidBlob("blob with an external TOC holds a TOC entry too")
    if not toc_seen and not layer.external:
        raise InvalidBlob("tar archive ends without the TOC entry")
    if pos != len(entries):
        raise InvalidBlob("TOC entry has no tar entry", entry=entries[pos].name)
    _check_end(layer, stream, gz)
    return VerifyReport(toc_digest=layer.toc_digest, entries=pos, files=files,
                        chunks=chunks, gzip_members=gz.members + 1,
                        uncompressed_size=gz.tell())


def _check_end(layer: LayerReader, stream: PeekableStream, gz: GzipMembersReader) -> None:
    """After the TOC entry: its padding, end-of-archive blocks (a record's
    worth at most), then the end of the gzip stream right at the footer.
    An external TOC's blob ends with its last entry instead, and no more
    than a record of zero blocks (the input's, when converted losslessly)."""
    toc = 0 if layer.external else padded(layer.toc_header.size)
    trailing = stream.read(toc + 21 * BLOCK)
    if trailing.strip(b"\x00") or stream.read(1) or not gz.at_member_end():
        raise InvalidBlob("data follows the TOC before the footer", offset=layer.toc_offset)
    if gz.compressed_offset != layer.payload_end:
        raise InvalidBlob("gzip stream does not end at the footer", offset=gz.compressed_offset)


def _verify_file(stream: PeekableStream, ti: tarfile.TarInfo, entries: list[TOCEntry],
                 pos: int, member_offsets_at: Callable[[int], list[int]]) -> tuple[int, int]:
    """Check the data of regular file ``ti`` (TOC entry ``entries[pos - 1]``)
    chunk by chunk: each chunk starts its gzip member and matches its
    digest, and the whole file matches its own. Returns the index of the
    next TOC entry and the number of chunks."""
    e = entries[pos - 1]
    whole = hashlib.sha256()
    stream.skip_to(ti.offset_data)
    c = e
    chunks = 0
    while True:
        size = c.chunk_size or (e.size - c.chunk_offset)
        upos = ti.offset_data + c.chunk_offset
        h = hashlib.sha256()
        left = size
        while left:
            piece = stream.read(min(left, _PIECE))
            if not piece:
                raise InvalidBlob("file data is truncated", entry=e.name, offset=c.offset)
            # The member at the chunk's offset starts innerOffset bytes before it.
            if left == size and c.offset not in member_offsets_at(upos - c.inner_offset):
                raise InvalidBlob("chunk offset does not start the gzip member holding "
                                  "the chunk" if not c.inner_offset else "chunk offset "
                                  "and innerOffset do not point at the chunk",
                                  entry=e.name, offset=c.offset)
            h.update(piece)
            whole.update(piece)
            left -= len(piece)
        chunks += 1
        if "sha256:" + h.hexdigest() != c.chunk_digest:
            raise DigestMismatch("chunk does not match its chunkDigest",
                                 entry=e.name, offset=c.offset)
        if c.chunk_offset + size >= e.size:
            break
        if pos >= len(entries) or entries[pos].type != "chunk":
            raise TOCError("file's chunks end early", entry=e.name)
        c = entries[pos]
        pos += 1
    if "sha256:" + whole.hexdigest() != e.digest:
        raise DigestMismatch("file does not match its digest", entry=e.name, offset=e.offset)
    return pos, chunks


def _check_toc_tail(layer: LayerReader) -> None:
    """The TOC member: nothing after the JSON but padding and two zero blocks."""
    rest = layer.toc_rest.read(padded(layer.toc_header.size) - layer.toc_header.size
                               + 2 * BLOCK + 1)
    if rest.strip(b"\x00"):
        raise TOCError("bytes follow the TOC JSON in its tar entry", offset=layer.toc_offset)
    if layer.toc_rest.read(1):
        raise TOCError("data follows the TOC entry", offset=layer.toc_offset)


def _compare(ti: tarfile.TarInfo, e: TOCEntry) -> None:
    """Raise unless tar header ``ti`` and TOC entry ``e`` describe the same entry."""
    def bad(field: str, tar_value: object, toc_value: object) -> InvalidBlob:
        return InvalidBlob(f"tar header and TOC disagree on {field}: "
                           f"{tar_value!r} vs {toc_value!r}", entry=e.name, offset=e.offset or None)

    if clean_name(ti.name) != clean_name(e.name):
        raise bad("name", ti.name, e.name)
    kind = _KINDS.get(ti.type, f"type {ti.type!r}")
    if kind != e.type:
        raise bad("type", kind, e.type)
    # iter_headers refused a time the TOC cannot express (NaN, year 10000).
    modtime = format_modtime(ti.mtime)
    checks = [("mode", ti.mode & 0o7777, e.mode & 0o7777), ("uid", ti.uid, e.uid),
              ("gid", ti.gid, e.gid), ("modtime", modtime, e.modtime)]
    if e.type == "reg":
        checks.append(("size", ti.size, e.size))
    if e.type in ("symlink", "hardlink"):
        checks.append(("linkName", ti.linkname, e.link_name))
    if e.type in ("char", "block"):
        checks += [("devMajor", ti.devmajor, e.dev_major), ("devMinor", ti.devminor, e.dev_minor)]
    # The reference omits a user or group name equal to the previous one for
    # the same id, so an empty name in the TOC is not a mismatch.
    if e.user_name:
        checks.append(("userName", ti.uname, e.user_name))
    if e.group_name:
        checks.append(("groupName", ti.gname, e.group_name))
    xattrs = {k[len(_XATTR):]: v.encode("utf-8", "surrogateescape")
              for k, v in ti.pax_headers.items() if k.startswith(_XATTR)}
    checks.append(("xattrs", xattrs, e.xattrs))
    for field, a, b in checks:
        if a != b:
            raise bad(field, a, b)


def _blob_error(message: str, offset: int | None = None) -> InvalidBlob:
    return InvalidBlob(message, offset=offset)
