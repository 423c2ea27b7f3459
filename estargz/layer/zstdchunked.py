"""The zstd:chunked layer format: writing, parsing the footer and the TOC.

What containers/storage (podman, CRI-O) pulls partially, and what the
reference's ``zstdchunked`` package reads. The blob is an ordinary
``tar+zstd`` stream of independent zstd frames (every payload chunk starts a
frame, exactly as every chunk starts a gzip member in eStargz), followed by
three zstd *skippable* frames, which plain zstd decoders skip:

1. the TOC (the eStargz TOC JSON, plus ``endOffset`` on files and a top-level
   ``tarSplitDigest``), zstd-compressed;
2. the tar-split data (github.com/vbatts/tar-split's JSON lines: type 2
   segments of raw tar bytes, type 1 files with their size and CRC-64/ISO),
   zstd-compressed, from which containers/storage rebuilds the exact tar;
3. the footer: where the TOC is, its sizes, the manifest type and the magic.

The footer is the 40-byte layout that Debian's containers/storage (1.43) and
the reference (stargz-snapshotter v0.18) read and write; current
containers/storage never reads the footer but locates both the TOC and the
tar-split data through the layer annotations (``io.github.containers.*``),
which we write as well. See docs/format.md.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import struct
import tarfile
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any, BinaryIO, cast

from .._exceptions import FooterError, InvalidInput, TOCError
from .compression import Backend
from .converter import (
    ConvertOptions,
    _Compressed,
    _Writer,
    register_format,
    write_units,
)
from .order import Landmark, Planned
from .source import RangeSource
from .streamhash import StreamHash
from .toc import (
    MAX_TOC_JSON_SIZE,
    TOC_DIGEST_ANNOTATION,
    TOCEntry,
    clean_name,
    encode_entry,
    encode_toc,
)
from .units import Data, Unit, entry_header, format_modtime, plan_units

FORMAT_NAME = "zstd:chunked"
#: As the reference (``ctr-remote``/``nerdctl --zstdchunked-compression-level``).
DEFAULT_ZSTD_LEVEL = 3
MAX_ZSTD_LEVEL = 22
MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"

SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
#: The 40-byte footer's magic (Debian's containers/storage 1.43, the reference).
FOOTER_MAGIC = b"GnUlInUx"
#: The 64-byte footer's magic (current containers/storage); read, not written.
FOOTER_MAGIC_V2 = b"GNUlInUx"
FOOTER_SIZE = 40
FOOTER_SIZE_V2 = 64
MANIFEST_TYPE_CRFS = 1
_SKIP_HEADER = 8

# Annotations: the current containers/storage names and the older ones that
# Debian's containers/storage 1.43 and the reference's snapshotter read.
MANIFEST_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
MANIFEST_POSITION = "io.github.containers.zstd-chunked.manifest-position"
TARSPLIT_POSITION = "io.github.containers.zstd-chunked.tarsplit-position"
LEGACY_MANIFEST_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
LEGACY_MANIFEST_POSITION = "io.containers.zstd-chunked.manifest-position"
#: Annotations of a zstd:chunked layer descriptor that describe the blob.
#: Never ``containerd.io/snapshot/stargz/toc.digest`` beside them: current
#: containers/storage refuses a layer with both ("both zstd:chunked and
#: eStargz TOC found").
ANNOTATION_KEYS = (MANIFEST_CHECKSUM, MANIFEST_POSITION, TARSPLIT_POSITION,
                   LEGACY_MANIFEST_CHECKSUM, LEGACY_MANIFEST_POSITION)

_END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)
# tar-split lines are compressed in batches of about this many bytes: few
# enough calls that the main thread seldom gives up the GIL (see _Writer.write).
_TARSPLIT_BATCH = 1 << 20


def _zstandard() -> Any:
    # Imported when zstd:chunked is used: `import estargz` needs only the
    # standard library (the rootless profiling helper runs under a bare python3).
    import zstandard
    return zstandard


def _crc64_model() -> Any:
    """tar-split's file checksum: Go's ``hash/crc64`` with the ISO table
    (``calc(data, crc_so_far)``, ``combine(crc_a, crc_b, len_b)``). anycrc
    (Mark Adler's crcany, word-wise): about 10 GB/s where crcmod-plus did
    0.43 GB/s holding the GIL, which made the CRC the writer's bottleneck
    (docs/benchmarks.md, zstd:chunked)."""
    import anycrc  # imported when zstd:chunked is used (see _zstandard for why here)
    return anycrc.Model("CRC64-GO-ISO")


class ZstdBackend:
    """Makes one zstd frame per ``compressobj()``, like a deflate back-end
    makes one gzip member, so the converter's units and thread pool serve
    both formats. A ``ZstdCompressor`` is not thread-safe: one per thread."""

    name = "zstd"

    def __init__(self, level: int) -> None:
        self.level = level
        self._local = threading.local()

    def compressor(self) -> Any:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = _zstandard().ZstdCompressor(level=self.level)
        return c

    def compressobj(self) -> Any:
        return self.compressor().compressobj()

    def compress(self, data: bytes) -> bytes:
        """``data`` as one frame."""
        frame: bytes = self.compressor().compress(data)
        return frame


def skippable_frame(data: bytes) -> bytes:
    """``data`` in a zstd skippable frame (magic 0x184D2A50)."""
    return SKIPPABLE_MAGIC + struct.pack("<I", len(data)) + data


def footer_bytes(manifest_offset: int, compressed: int, uncompressed: int) -> bytes:
    """The 40-byte footer (before its skippable-frame header)."""
    return struct.pack("<QQQQ", manifest_offset, compressed, uncompressed,
                       MANIFEST_TYPE_CRFS) + FOOTER_MAGIC


class _TarSplit:
    """tar-split's JSON lines, written as the reference's packer writes them
    (Go's ``json.Encoder`` of ``storage.Entry``), zstd-compressed as they come."""

    def __init__(self, backend: ZstdBackend) -> None:
        # A compressor of its own: this stream stays open while the thread's
        # shared one makes other frames (a compressobj shares its context).
        self._z = _zstandard().ZstdCompressor(level=backend.level).compressobj()
        self._parts: list[bytes] = []
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.size = 0
        self._pos = 0

    def _line(self, line: str) -> None:
        data = line.encode("utf-8")
        self._pos += 1
        self.size += len(data)
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= _TARSPLIT_BATCH:
            self._flush_pending()

    def _flush_pending(self) -> None:
        self._parts.append(self._z.compress(b"".join(self._pending)))
        self._pending, self._pending_size = [], 0

    def segment(self, raw: bytes | memoryview) -> None:
        if raw:
            payload = base64.b64encode(raw).decode()
            self._line(f'{{"type":2,"payload":"{payload}","position":{self._pos}}}\n')

    def file(self, name: str, size: int, crc: int | None) -> None:
        # Go escapes <, > and & in strings; json.dumps does not, and readers
        # decode both the same, so only the bytes (and the digest) would differ.
        text = (json.dumps(name, ensure_ascii=False).replace("<", "\\u003c")
                .replace(">", "\\u003e").replace("&", "\\u0026"))
        sized = f',"size":{size}' if size else ""
        payload = "null" if crc is None else \
            '"' + base64.b64encode(struct.pack(">Q", crc)).decode() + '"'
        self._line(f'{{"type":1,"name":{text}{sized},"payload":{payload},'
                   f'"position":{self._pos}}}\n')

    def finish(self) -> bytes:
        self._flush_pending()
        self._parts.append(self._z.flush())
        data = b"".join(self._parts)
        self._parts = []
        return data


class _ZstdWriter(_Writer):
    """The converter's writer, also writing the tar-split data as the units
    pass (each file's CRC-64 is known once its last chunk is written) and
    each file's end offset for the TOC's ``endOffset``."""

    def __init__(self, out: BinaryIO, fd: int, diff: StreamHash, backend: ZstdBackend) -> None:
        super().__init__(out, fd, diff)
        self.backend = backend
        self.tarsplit = _TarSplit(backend)
        # (header length, name, payload size) of each planned entry, in order,
        # recorded by record_header as the units are planned.
        self.headers: deque[tuple[int, str, int]] = deque()
        self._crc = 0
        crc64 = _crc64_model()
        # Each chunk's CRC comes from the pool; a file's is their combination.
        self.chunk_sum, self._combine = crc64.calc, crc64.combine
        self._done: tuple[str, int, int] | None = None
        #: Exact ``modtime`` of entries whose mtime has a fraction (by clean name).
        self.modtimes: dict[str, str] = {}

    def record_header(self, m: Planned) -> tuple[bytes, TOCEntry, int]:
        header, entry, size = entry_header(m)
        self.headers.append((len(header), entry.name, size))
        return header, entry, size

    def unit(self, u: Unit, c: _Compressed) -> None:
        super().unit(u, c)
        ts = self.tarsplit
        start = pos = 0
        if self._done is not None:  # this unit ends a file's payload
            name, size, crc = self._done
            self._done = None
            ts.file(name, size, crc)
            pos = -size % tarfile.BLOCKSIZE  # its padding leads the tail
        tail = memoryview(u.tail)
        while pos < len(tail):
            length, name, size = self.headers.popleft()
            pos += length
            ts.segment(tail[start:pos])
            start = pos
            if not size:
                ts.file(name, 0, None)
            # else: the payload follows in the next units; its line comes
            # when its last chunk is written (file_done).
        if start < len(tail):
            ts.segment(tail[start:])

    def encode_entry(self, e: TOCEntry) -> str:
        """The eStargz entry, plus ``UID``, ``GID`` and ``ModTime`` spelled as
        Debian's containers/storage 1.43 (podman 4.3) reads them: its TOC
        parser matches those keys only (fixed upstream in later releases), so
        without them a partial pull makes every file root's with the pull's
        time. Go's decoder matches keys without case, so the reference reads
        the same values twice; current containers/storage skips them."""
        if e.modtime and e.type != "chunk":
            e.modtime = self.modtimes.get(clean_name(e.name), e.modtime)
        text = encode_entry(e)
        extra = []
        if e.uid:
            extra.append(f'\t\t\t"UID": {e.uid}')
        if e.gid:
            extra.append(f'\t\t\t"GID": {e.gid}')
        if e.modtime:
            extra.append(f'\t\t\t"ModTime": "{e.modtime}"')
        if not extra:
            return text
        return text[:-len("\n\t\t}")] + ",\n" + ",\n".join(extra) + "\n\t\t}"

    def chunk_summed(self, d: Data, value: int) -> None:
        self._crc = value if d.start == 0 else self._combine(self._crc, value, d.length)

    def file_done(self, entry: TOCEntry) -> None:
        entry.end_offset = self.offset
        self._done = (entry.name, entry.size, self._crc)
        self._crc = 0


def write_zstdchunked(fd: int, planned: Sequence[Planned], out: BinaryIO,
                      options: ConvertOptions) -> dict[str, Any]:
    """Write the zstd:chunked blob for ``planned`` entries (payloads read
    from ``fd``) to ``out``. Returns the digests, sizes and annotations."""
    backend = ZstdBackend(options.zstd_level)
    with StreamHash(fd) as diff:
        return _write_zstdchunked(_ZstdWriter(out, fd, diff, backend), planned, options)


def _write_zstdchunked(writer: _ZstdWriter, planned: Sequence[Planned],
                       options: ConvertOptions) -> dict[str, Any]:
    # The converter's pipeline (converter.write_units), then the three
    # skippable frames that must follow the data in this order.
    backend = writer.backend
    planned = _storage_exact(planned, writer.modtimes)
    # The pool's task only calls compressobj(): duck-typed.
    write_units(writer, planned, plan_units(planned, options.chunk_size, writer.record_header),
                cast("Backend", backend), options.workers)

    # The end of the tar archive, a frame of its own: the uncompressed
    # stream is a complete tar for `zstd -dc | tar -x`.
    writer.write(backend.compress(_END_OF_ARCHIVE))
    writer.diff.update(_END_OF_ARCHIVE)
    writer.usize += len(_END_OF_ARCHIVE)

    writer.tarsplit.segment(_END_OF_ARCHIVE)
    tarsplit = writer.tarsplit.finish(), writer.tarsplit.size
    tarsplit_digest = "sha256:" + hashlib.sha256(tarsplit[0]).hexdigest()
    toc_json = encode_toc(writer.toc_parts, extra={"tarSplitDigest": tarsplit_digest})
    writer.toc_parts = []
    if len(toc_json) > MAX_TOC_JSON_SIZE:  # as write_estargz: readers refuse it
        raise InvalidInput(f"the TOC is {len(toc_json)} bytes, more than the "
                           f"{MAX_TOC_JSON_SIZE} bytes readers accept; use a larger "
                           "chunk size")
    payload_end = writer.offset
    manifest = backend.compress(toc_json)
    manifest_offset = payload_end + _SKIP_HEADER
    tarsplit_offset = manifest_offset + len(manifest) + _SKIP_HEADER
    writer.write(skippable_frame(manifest))
    writer.write(skippable_frame(tarsplit[0]))
    writer.write(skippable_frame(footer_bytes(manifest_offset, len(manifest), len(toc_json))))
    checksum = "sha256:" + hashlib.sha256(manifest).hexdigest()
    position = f"{manifest_offset}:{len(manifest)}:{len(toc_json)}:{MANIFEST_TYPE_CRFS}"
    annotations = {
        MANIFEST_CHECKSUM: checksum, MANIFEST_POSITION: position,
        TARSPLIT_POSITION: f"{tarsplit_offset}:{len(tarsplit[0])}:{tarsplit[1]}",
        LEGACY_MANIFEST_CHECKSUM: checksum, LEGACY_MANIFEST_POSITION: position,
    }
    return {
        "blob_digest": writer.blob_digest(),
        "blob_size": writer.offset,
        "diff_id": "sha256:" + writer.diff.hexdigest(),
        "toc_digest": "sha256:" + hashlib.sha256(toc_json).hexdigest(),
        "uncompressed_size": writer.usize,
        "prefetch_size": writer.landmark_offset,
        "toc_size": writer.offset - payload_end,
        "annotations": annotations,
    }


def exact_modtime(mtime: float) -> str | None:
    """RFC 3339 with the fraction of seconds a PAX ``mtime`` record of
    ``mtime`` carries (tarfile writes ``str(mtime)``, which Go parses to the
    nanosecond); ``None`` for whole seconds."""
    if not isinstance(mtime, float) or mtime.is_integer() or mtime < 1:
        return None
    text = str(mtime)
    if "e" in text or "E" in text or "." not in text:
        return None
    whole, frac = text.split(".")
    frac = frac[:9].rstrip("0")
    if not frac:
        return None
    base: str = format_modtime(int(whole))
    return base[:-1] + "." + frac + "Z"


def _storage_exact(planned: Sequence[Planned], modtimes: dict[str, str]) -> list[Planned]:
    """Current containers/storage checks every TOC entry against its tar
    header (mode, owners, times, xattrs) and refuses the layer on any
    difference. So the TOC gets the exact ``modtime`` where the header has a
    fraction (eStargz's whole seconds would differ), and the headers lose
    PAX ``atime``/``ctime``, which the TOC does not carry."""
    out: list[Planned] = []
    for m in planned:
        if not isinstance(m, Landmark):
            if "atime" in m.pax_headers or "ctime" in m.pax_headers:
                m = copy.copy(m)
                m.pax_headers = {k: v for k, v in m.pax_headers.items()
                                 if k not in ("atime", "ctime")}
            exact = exact_modtime(m.mtime)
            if exact is not None:
                modtimes[clean_name(m.name)] = exact
        out.append(m)
    return out


# --- reading ----------------------------------------------------------------

def is_zstdchunked(source: RangeSource) -> bool:
    """True if ``source`` ends with a zstd:chunked footer (either layout)."""
    size = source.size
    if size < FOOTER_SIZE + _SKIP_HEADER:
        return False
    tail = source.read_at(size - FOOTER_SIZE, FOOTER_SIZE)
    return tail[-8:] in (FOOTER_MAGIC, FOOTER_MAGIC_V2)


def parse_footer(source: RangeSource) -> tuple[int, int, int]:
    """``(manifest offset, compressed length, uncompressed length)`` from the
    footer, checked against the blob; raises :class:`FooterError`."""
    size = source.size
    if size >= FOOTER_SIZE_V2 + _SKIP_HEADER and \
            source.read_at(size - 8, 8) == FOOTER_MAGIC_V2:
        frame = source.read_at(size - FOOTER_SIZE_V2 - _SKIP_HEADER,
                               FOOTER_SIZE_V2 + _SKIP_HEADER)
        if frame[:8] != SKIPPABLE_MAGIC + struct.pack("<I", FOOTER_SIZE_V2):
            raise FooterError("zstd:chunked footer is not in a skippable frame")
        offset, clen, ulen, kind = struct.unpack("<QQQQ", frame[8:40])
        footer_start = size - FOOTER_SIZE_V2 - _SKIP_HEADER
    else:
        if size < FOOTER_SIZE + _SKIP_HEADER:
            raise FooterError(f"blob of {size} bytes is too small for a zstd:chunked footer")
        frame = source.read_at(size - FOOTER_SIZE - _SKIP_HEADER, FOOTER_SIZE + _SKIP_HEADER)
        if frame[-8:] != FOOTER_MAGIC:
            raise FooterError("no zstd:chunked footer magic at the end of the blob")
        if frame[:8] != SKIPPABLE_MAGIC + struct.pack("<I", FOOTER_SIZE):
            raise FooterError("zstd:chunked footer is not in a skippable frame")
        offset, clen, ulen, kind = struct.unpack("<QQQQ", frame[8:40])
        footer_start = size - FOOTER_SIZE - _SKIP_HEADER
    if kind != MANIFEST_TYPE_CRFS:
        raise FooterError(f"zstd:chunked manifest type {kind} is not 1 (CRFS)")
    if not offset >= _SKIP_HEADER or offset + clen > footer_start:
        raise FooterError(f"footer points at a {clen}-byte TOC at {offset}, "
                          f"outside the {size}-byte blob")
    if ulen > MAX_TOC_JSON_SIZE:
        raise TOCError(f"TOC JSON of {ulen} bytes exceeds the "
                       f"{MAX_TOC_JSON_SIZE}-byte limit", offset=offset)
    head = source.read_at(offset - _SKIP_HEADER, _SKIP_HEADER)
    if head != SKIPPABLE_MAGIC + struct.pack("<I", clen):
        raise FooterError("TOC is not the skippable frame the footer names", offset=offset)
    return offset, clen, ulen


def decompress_bounded(data: bytes, size: int, what: str, offset: int) -> bytes:
    """Decompress zstd ``data`` that must be exactly ``size`` bytes, never
    producing more (a bomb is an error, not an allocation)."""
    zstandard = _zstandard()
    parts = []
    got = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as r:
            while got <= size:
                piece = r.read(min(size + 1 - got, 1 << 20))
                if not piece:
                    break
                parts.append(piece)
                got += len(piece)
    except zstandard.ZstdError as e:
        raise TOCError(f"{what} is not valid zstd: {e}", offset=offset) from None
    if got != size:
        raise TOCError(f"{what} does not decompress to the {size} bytes its "
                       "position says", offset=offset)
    return b"".join(parts)


register_format(FORMAT_NAME, write_zstdchunked)

__all__ = ["ANNOTATION_KEYS", "DEFAULT_ZSTD_LEVEL", "FORMAT_NAME", "MEDIA_TYPE",
           "TOC_DIGEST_ANNOTATION", "ZstdBackend", "is_zstdchunked", "parse_footer",
           "write_zstdchunked"]
