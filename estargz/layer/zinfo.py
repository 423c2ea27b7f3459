"""The zinfo half of a SOCI zTOC: checkpoints into a layer's compressed stream.

A checkpoint is where decompression can start in the middle of a gzip
stream: a deflate block boundary (compressed offset ``in`` and the ``bits``
of the byte before it still unread), the uncompressed offset ``out`` there,
and the 32 KiB of output before it (deflate's back-reference window). The
SOCI Snapshotter places one after the first gzip header and then at the
first block boundary more than ``span_size`` uncompressed bytes after the
previous one (soci-snapshotter v0.16.1, ztoc/compression/gzip_zinfo.c, from
zlib's examples/zran.c); the bytes from one checkpoint to the next are a
*span*, fetched and verified (``span_digests``) as one piece.

Python's ``zlib`` module does not report deflate block boundaries, so
:class:`GzipCheckpointWalk` drives the system zlib's ``inflate`` with
``Z_BLOCK`` through ctypes, exactly as soci's C code does (docs/soci.md,
"Checkpoints: how we find deflate block boundaries", says why this and not
indexed_gzip or rapidgzip). Plain tar layers have no checkpoints: their
spans are fixed ``span_size`` slices of the file and the "checkpoints" are a
small flatbuffer (:func:`encode_tar_zinfo`), as soci's tar_zinfo.go writes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import flatbuffers

from .._cancel import check_cancelled
from .._exceptions import EstargzError, InvalidBlob, InvalidInput

#: Bytes of uncompressed history saved with each checkpoint (deflate's window).
WINDOW = 32768
#: Version of the gzip zinfo blob soci v0.16.1 writes (ZINFO_VERSION_TWO).
GZIP_ZINFO_VERSION = 2
#: Version field of the tar zinfo flatbuffer (tar_zinfo.go, zinfoVersion).
TAR_ZINFO_VERSION = 2
# gzip_zinfo.h: BLOB_HEADER_SIZE and PACKED_CHECKPOINT_SIZE.
_BLOB_HEADER = struct.Struct("<iq")
_CHECKPOINT = struct.Struct("<qqB")
_PACKED = _CHECKPOINT.size + WINDOW

# Compressed bytes read per call, and uncompressed bytes inflate may
# produce per call. Neither changes where checkpoints fall: a block ends
# where the data says, whatever the buffers (docs/soci.md).
_IN_CHUNK = 1 << 16
_OUT_CHUNK = 1 << 16

# zlib.h
_Z_OK, _Z_STREAM_END, _Z_NEED_DICT = 0, 1, 2
_Z_BUF_ERROR = -5
_Z_BLOCK = 5
# 32 + 15: a gzip or zlib header, detected, as soci's init_flate(47) asks.
# Its file table comes from Go's gzip reader, which takes gzip only: see
# GzipCheckpointWalk.members.
_AUTO_HEADER = 47
_GZIP_MAGIC = 0x1F


@dataclass(frozen=True)
class Checkpoint:
    """One place to start inflating: see the module docstring."""

    #: Compressed offset of the first whole byte after the block boundary.
    compressed_offset: int
    #: Uncompressed offset at the boundary.
    uncompressed_offset: int
    #: Bits (0-7) of the byte at ``compressed_offset - 1`` not yet consumed.
    bits: int
    #: The 32 KiB of output before the boundary (zero-filled at the start).
    window: bytes

    @property
    def start(self) -> int:
        """First compressed byte a span starting here needs."""
        return self.compressed_offset - (1 if self.bits else 0)


def encode_gzip_zinfo(checkpoints: list[Checkpoint], span_size: int) -> bytes:
    """soci's gzip zinfo blob (gzip_zinfo.c ``zinfo_to_blob``, version 2): an
    int32 count and the int64 span size, then per checkpoint int64 ``in``,
    int64 ``out``, one byte of bits and the window; little-endian."""
    parts = [_BLOB_HEADER.pack(len(checkpoints), span_size)]
    for c in checkpoints:
        parts.append(_CHECKPOINT.pack(c.compressed_offset, c.uncompressed_offset, c.bits))
        parts.append(c.window)
    return b"".join(parts)


def decode_gzip_zinfo(blob: bytes,
                      error: Callable[[str], EstargzError] = InvalidBlob,
                      ) -> tuple[int, list[Checkpoint]]:
    """``(span_size, checkpoints)`` of a gzip zinfo blob, checked: the size
    matches the count (soci's ``blob_to_zinfo``; its version 1, one
    checkpoint short, is refused), offsets never go backwards, bits are 0-7."""
    if len(blob) < _BLOB_HEADER.size:
        raise error(f"checkpoints blob of {len(blob)} bytes is shorter than its header")
    count, span_size = _BLOB_HEADER.unpack_from(blob)
    if count < 1 or _BLOB_HEADER.size + count * _PACKED != len(blob):
        raise error(f"checkpoints blob of {len(blob)} bytes does not hold the "
                    f"{count} checkpoints it claims")
    if span_size <= 0:
        raise error(f"span size {span_size} is not positive")
    out = []
    prev_in = prev_out = 0
    for i in range(count):
        at = _BLOB_HEADER.size + i * _PACKED
        cin, cout, bits = _CHECKPOINT.unpack_from(blob, at)
        if bits > 7 or cin < prev_in or cout < prev_out or cin - (1 if bits else 0) < 0:
            raise error(f"checkpoint {i} is out of order or malformed "
                        f"(in {cin}, out {cout}, bits {bits})")
        prev_in, prev_out = cin, cout
        start = at + _CHECKPOINT.size
        out.append(Checkpoint(cin, cout, bits, blob[start:start + WINDOW]))
    return span_size, out


def flatbuffer_builder() -> flatbuffers.Builder:
    """A new flatbuffers builder, for writing zTOCs.

    The package is imported here, when a zTOC is written, not with the
    module: ``import estargz`` needs only the standard library, since the
    rootless profiling helper imports it under a bare ``python3``
    (tests/test_flatroot.py), as zstd:chunked's ``zstandard`` is."""
    import flatbuffers
    return flatbuffers.Builder(0)


def encode_tar_zinfo(span_size: int, size: int) -> bytes:
    """The "checkpoints" of a plain tar layer: soci's TarZinfo flatbuffer
    (ztoc/compression/fbs/zinfo.fbs) holding version, span size and the
    layer's size, built in the order tar_zinfo.go builds it."""
    b = flatbuffer_builder()
    b.StartObject(3)
    b.PrependInt32Slot(0, TAR_ZINFO_VERSION, 0)
    b.PrependInt64Slot(1, span_size, 0)
    b.PrependInt64Slot(2, size, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


@dataclass
class SpanHashes:
    """Digests of the compressed bytes of each span, computed as they go by."""

    digests: list[str]
    _current: hashlib._Hash | None = None

    def start(self, seed: bytes = b"") -> None:
        """Close the current span (if any) and open the next, beginning with
        ``seed`` (the shared byte of a boundary inside a byte)."""
        self.finish()
        self._current = hashlib.sha256(seed)

    def update(self, data: bytes | memoryview) -> None:
        if self._current is not None:
            self._current.update(data)

    def finish(self) -> None:
        if self._current is not None:
            self.digests.append("sha256:" + self._current.hexdigest())
            self._current = None


class _ZStream(ctypes.Structure):
    """zlib's ``z_stream``."""

    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p), ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int), ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


def _load_zlib() -> ctypes.CDLL:
    """The system zlib, the library soci's cgo code links (``-lz``)."""
    name = ctypes.util.find_library("z") or "libz.so.1"
    lib = ctypes.CDLL(name)
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.inflateInit2_.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_int,
                                  ctypes.c_char_p, ctypes.c_int]
    lib.inflate.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_int]
    lib.inflateReset2.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_int]
    lib.inflateEnd.argtypes = [ctypes.POINTER(_ZStream)]
    return lib


_zlib = _load_zlib()


class GzipCheckpointWalk:
    """Decompress a gzip layer read once through ``read_compressed`` (a
    ``read(n)`` of the compressed bytes), finding soci's checkpoints on the way.

    ``read(n)`` returns decompressed bytes (give it to the tar walk); when it
    returns ``b""`` the whole compressed stream has been consumed and
    :attr:`checkpoints`, :attr:`span_digests` and :attr:`compressed_size`
    are final. Concatenated gzip members are one stream, as in soci. Corrupt
    or truncated data raises ``error`` with the compressed offset.
    """

    def __init__(self, read_compressed: Callable[[int], bytes], span_size: int,
                 error: Callable[[str], EstargzError] = InvalidInput) -> None:
        if span_size <= 0:
            raise InvalidInput(f"span size {span_size} is not positive")
        self._read = read_compressed
        self._span = span_size
        self._error = error
        self.checkpoints: list[Checkpoint] = []
        #: ``(uncompressed offset, is gzip)`` of each member: soci's walk
        #: also inflates zlib streams, its tar reader does not.
        self.members: list[tuple[int, bool]] = []
        self._hashes = SpanHashes([])
        self._strm = _ZStream()
        self._in = ctypes.create_string_buffer(_IN_CHUNK)
        self._out = ctypes.create_string_buffer(_OUT_CHUNK)
        self._chunk = b""
        self._chunk_at = 0
        self._totin = 0
        self._totout = 0
        self._last = 0
        self._tail = bytes(WINDOW)  # the last WINDOW bytes of output
        self._done = False
        self._pending = b""
        self._spill = b""
        self._last_byte = b""
        self._stalled = 0
        self.compressed_size = 0
        ret = _zlib.inflateInit2_(ctypes.byref(self._strm), _AUTO_HEADER, _zlib.zlibVersion(),
                                  ctypes.sizeof(_ZStream))
        if ret != _Z_OK:
            raise InvalidInput(f"zlib cannot start inflating (inflateInit2 returned {ret})")

    @property
    def span_digests(self) -> list[str]:
        """``sha256:`` digests of each span's compressed bytes (final at the end)."""
        return self._hashes.digests

    def close(self) -> None:
        """Free zlib's state (also done at the end of the stream)."""
        strm = getattr(self, "_strm", None)  # None: __init__ failed early
        if strm is not None and strm.state:
            _zlib.inflateEnd(ctypes.byref(strm))

    def __del__(self) -> None:
        self.close()

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` decompressed bytes (all the rest for ``n < 0``)."""
        want = n if n >= 0 else 1 << 62
        out = [self._pending]
        have = len(self._pending)
        while have < want and not self._done:
            data = self._step()
            if data:
                out.append(data)
                have += len(data)
        joined = b"".join(out)
        # Keep what the caller did not ask for, for the next read.
        self._pending = joined[want:]
        return joined[:want]

    def _fill(self) -> bool:
        """Load the next compressed chunk; False at the end of the input."""
        check_cancelled()
        if not self._spill:
            self._spill = self._read(_IN_CHUNK)
            self.compressed_size += len(self._spill)
        # A reader may return more than asked: the rest waits its turn.
        chunk, self._spill = self._spill[:_IN_CHUNK], self._spill[_IN_CHUNK:]
        if not chunk:
            return False
        ctypes.memmove(self._in, chunk, len(chunk))
        self._chunk, self._chunk_at = chunk, 0
        self._strm.next_in = ctypes.addressof(self._in)
        self._strm.avail_in = len(chunk)
        return True

    def _member_starts(self) -> None:
        """Note a member starting at the next input byte (a gzip member's
        first byte is 0x1f; a zlib stream's never is)."""
        first = self._chunk[self._chunk_at]
        self.members.append((self._totout, first == _GZIP_MAGIC))

    def _step(self) -> bytes:
        """One ``inflate(Z_BLOCK)`` call, as in soci's generate_zinfo_from_fp."""
        s = self._strm
        if s.avail_in == 0 and not self._fill():
            raise self._error(f"gzip stream is truncated at offset {self._totin}")
        if not self.members:
            self._member_starts()
        s.next_out = ctypes.addressof(self._out)
        s.avail_out = _OUT_CHUNK
        before = s.avail_in
        ret = _zlib.inflate(ctypes.byref(s), _Z_BLOCK)
        used = before - s.avail_in
        produced = _OUT_CHUNK - s.avail_out
        if used:
            self._hashes.update(memoryview(self._chunk)[self._chunk_at:self._chunk_at + used])
            self._chunk_at += used
            self._totin += used
            # The byte a boundary inside a byte shares with the next span.
            self._last_byte = self._chunk[self._chunk_at - 1:self._chunk_at]
            self._stalled = 0
        elif not produced and ret == _Z_OK:
            # inflate always moves on; guard against looping if it did not.
            self._stalled += 1
            if self._stalled > 3:
                raise self._error(f"invalid gzip data at offset {self._totin}: no progress")
        data = ctypes.string_at(self._out, produced) if produced else b""
        if produced:
            self._totout += produced
            self._tail = (self._tail + data)[-WINDOW:]
        if ret not in (_Z_OK, _Z_STREAM_END, _Z_BUF_ERROR):
            why = s.msg.decode("utf-8", "replace") if s.msg else f"zlib error {ret}"
            if ret == _Z_NEED_DICT:
                why = "needs a preset dictionary"
            raise self._error(f"invalid gzip data at offset {self._totin}: {why}")
        if ret == _Z_BUF_ERROR and s.avail_in:
            raise self._error(f"invalid gzip data at offset {self._totin}: no progress")
        if ret == _Z_STREAM_END:
            # Another member follows, or the layer ends (soci resets inflate
            # for the next member, and fails on anything after the last).
            if s.avail_in or self._fill():
                _zlib.inflateReset2(ctypes.byref(s), _AUTO_HEADER)
                self._member_starts()
            else:
                self._hashes.finish()
                self._done = True
                self.close()
            return data
        kind = s.data_type
        if (kind & 128 and not kind & 64
                and (self._totout == 0 or self._totout - self._last > self._span)):
            bits = kind & 7
            self._hashes.start(self._last_byte if bits else b"")
            self.checkpoints.append(Checkpoint(self._totin, self._totout, bits, self._tail))
            self._last = self._totout
        return data


class PlainSpanWalk:
    """A plain tar layer read once: the bytes pass through unchanged and each
    fixed ``span_size`` slice is hashed (soci's TarZinfo spans)."""

    def __init__(self, read: Callable[[int], bytes], span_size: int) -> None:
        if span_size <= 0:
            raise InvalidInput(f"span size {span_size} is not positive")
        self._read_raw = read
        self._span = span_size
        self._hashes = SpanHashes([])
        self._left = 0
        self.compressed_size = 0

    @property
    def span_digests(self) -> list[str]:
        """``sha256:`` digests of each span (final at the end)."""
        return self._hashes.digests

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes of the layer; ``b""`` at its end."""
        check_cancelled()
        data = self._read_raw(n if n >= 0 else 1 << 30)
        if not data:
            self._hashes.finish()
            return b""
        view = memoryview(data)
        while view:
            if self._left == 0:
                self._hashes.start()
                self._left = self._span
            take = min(self._left, len(view))
            self._hashes.update(view[:take])
            self._left -= take
            view = view[take:]
        self.compressed_size += len(data)
        return data
