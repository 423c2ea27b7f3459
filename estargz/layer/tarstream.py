"""The one tar walk: reading tar headers one at a time, strictly, and the
checks every member must pass.

The standard library's ``tarfile`` decodes every header format we need (USTAR,
GNU long names, PAX records and global headers, the GNU and PAX sparse
formats), so we use its public ``TarInfo.fromtarfile``. What we do not use is
``TarFile`` iteration: it keeps every member in a list (unbounded memory) and
it treats a corrupt header in the middle of an archive as the end of it,
which would silently drop the rest of a layer. Here a bad header is an error.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol, cast

from .._exceptions import EstargzError, InvalidInput, UnsupportedEntry

BLOCK = tarfile.BLOCKSIZE
ZERO_BLOCK = bytes(BLOCK)
# Largest PAX global header we look past to see whether the archive ends.
_MAX_PEEK = 1 << 20
# ``TarInfo.fromtarfile`` reads a PAX or GNU long-name record whole, and a
# GNU sparse map block by block, with no limit of its own: a header claiming
# a huge record over a gzip bomb would fill memory. Like Go's archive/tar
# (maxSpecialFileSize), refuse a record above 1 MiB, and more than a few MiB
# of header data for one member in all.
MAX_SPECIAL_SIZE = 1 << 20
MAX_HEADER_DATA = 4 << 20


def padded(size: int) -> int:
    """``size`` rounded up to whole tar blocks."""
    return -(-size // BLOCK) * BLOCK


class Readable(Protocol):
    """What :class:`PeekableStream` reads from: a file, or a decompressor."""

    def read(self, n: int = -1, /) -> bytes: ...


class PeekableStream:
    """Forward-only reading with look-ahead over any ``read``-able object.

    ``tell`` counts bytes consumed; ``skip_to`` moves forward, seeking when the
    underlying object can (a spooled tar file) and reading otherwise.
    """

    def __init__(self, raw: Readable, seekable: bool = False,
                 error: Callable[[str], EstargzError] = InvalidInput) -> None:
        self._raw = raw
        self._error = error
        self._buf = b""
        self._pos = 0
        self._seekable = seekable

    def peek(self, n: int) -> bytes:
        while len(self._buf) < n:
            more = self._raw.read(max(n - len(self._buf), 65536))
            if not more:
                break
            self._buf += more
        return self._buf[:n]

    def read(self, n: int) -> bytes:
        if len(self._buf) >= n:
            out, self._buf = self._buf[:n], self._buf[n:]
        else:
            out = self._buf + self._raw.read(n - len(self._buf))
            self._buf = b""
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._pos

    def skip_to(self, pos: int) -> None:
        gap = pos - self._pos
        if gap < 0:
            raise self._error(f"tar stream went backwards to offset {pos}")
        if gap <= len(self._buf):
            self._buf = self._buf[gap:]
            self._pos = pos
            return
        self._pos += len(self._buf)
        gap -= len(self._buf)
        self._buf = b""
        if self._seekable:
            cast(BinaryIO, self._raw).seek(gap, 1)  # seekable: a real file
            self._pos += gap
            return
        while gap:
            got = self._raw.read(min(gap, 1 << 20))
            if not got:
                raise self._error(f"tar stream is truncated before offset {pos}")
            gap -= len(got)
            self._pos += len(got)


class _HeaderTooLarge(Exception):
    """Raised inside ``fromtarfile`` when a member's header data is too big."""


class _HeaderReader:
    """``stream`` as ``fromtarfile`` sees it: reads counted against a budget."""

    def __init__(self, stream: PeekableStream) -> None:
        self._stream = stream
        self.budget = MAX_HEADER_DATA

    def read(self, n: int) -> bytes:
        if n > MAX_SPECIAL_SIZE:
            raise _HeaderTooLarge(f"extended header record of {n} bytes exceeds "
                                  f"the {MAX_SPECIAL_SIZE}-byte limit")
        if n > self.budget:
            raise _HeaderTooLarge(f"more than {MAX_HEADER_DATA} bytes of header data")
        self.budget -= n
        return self._stream.read(n)

    def tell(self) -> int:
        return self._stream.tell()


class _Ctx:
    """The few attributes ``TarInfo.fromtarfile`` reads from a ``TarFile``."""

    def __init__(self, fileobj: _HeaderReader) -> None:
        self.fileobj = fileobj
        self.offset = 0
        self.encoding = "utf-8"
        self.errors = "surrogateescape"
        self.pax_headers: dict[str, str] = {}


def iter_headers(stream: PeekableStream,
                 error: Callable[[str], EstargzError] = InvalidInput,
                 ) -> Iterator[tarfile.TarInfo]:
    """Yield each member of the tar archive in ``stream``.

    Between two members the caller may read that member's data from
    ``stream`` (or not); the next header is found by skipping forward.
    ``offset`` and ``offset_data`` of each ``TarInfo`` are stream positions.
    A stream that ends cleanly at a header boundary without end-of-archive
    blocks is accepted, as Go's reader does.
    """
    ctx = _Ctx(_HeaderReader(stream))
    while True:
        stream.skip_to(ctx.offset)
        head = stream.peek(BLOCK)
        if not head:
            return
        if len(head) < BLOCK:
            raise error(f"tar stream is truncated in a header at offset {ctx.offset}")
        if head == ZERO_BLOCK:
            return
        if head[156:157] == tarfile.XGLTYPE and _global_then_end(stream, head):
            return
        at = ctx.offset
        ctx.fileobj.budget = MAX_HEADER_DATA
        try:
            # _Ctx has what fromtarfile uses of a TarFile (duck typing).
            ti = tarfile.TarInfo.fromtarfile(ctx)  # type: ignore[arg-type]
        except (tarfile.HeaderError, ValueError, UnicodeError, OverflowError,
                _HeaderTooLarge) as e:
            raise error(f"invalid tar header at offset {at}: {e or 'bad header'}") from None
        except RecursionError:
            # fromtarfile recurses once per PAX or GNU long-name header in
            # front of a member; a long run of them exhausts the stack.
            raise error(f"invalid tar header at offset {at}: "
                        "too many extended headers in a row") from None
        yield ti


def _global_then_end(stream: PeekableStream, head: bytes) -> bool:
    """True for a PAX global header directly followed by the archive's end.

    ``fromtarfile`` insists on a member after a global header, yet tar writers
    produce one alone for an archive with no members.
    """
    try:
        size = tarfile.nti(head[124:136])  # type: ignore[attr-defined]  # not in typeshed
    except tarfile.HeaderError:
        return False
    if not 0 <= size <= _MAX_PEEK:
        return False
    after = BLOCK + padded(size)
    nxt = stream.peek(after + BLOCK)[after:]
    return nxt in (b"", ZERO_BLOCK)


# --- member checks and the index of a seekable tar ---------------------------

# Kinds eStargz represents; GNU sparse and contiguous files become regular files.
SUPPORTED_TYPES = frozenset({
    tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE,
    tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
    tarfile.DIRTYPE, tarfile.FIFOTYPE,
})


def printable(name: str) -> str:
    """A name as people should see it on one line: undecodable bytes and
    control characters shown as ``\\xNN`` escapes."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def check_member(ti: tarfile.TarInfo) -> None:
    """Raise :class:`UnsupportedEntry` unless eStargz can represent ``ti``."""
    if ti.type not in SUPPORTED_TYPES:
        raise UnsupportedEntry(printable(ti.name), f"unsupported tar entry type {ti.type!r}")
    if not ti.name.strip("/") and not ti.isdir():
        raise UnsupportedEntry(ti.name, "entry has an empty name")
    for what, value in (("name", ti.name), ("link target", ti.linkname)):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # The TOC is JSON: a name that is not UTF-8 cannot be stored
            # there faithfully (Go would silently replace the bytes).
            raise UnsupportedEntry(printable(ti.name),
                                   f"{what} is not valid UTF-8") from None
    if "\x00" in ti.name:
        raise UnsupportedEntry(printable(ti.name), "name contains a NUL byte")


def index_tar(f: BinaryIO) -> list[tarfile.TarInfo]:
    """Read every header of the seekable uncompressed tar ``f``."""
    size = os.fstat(f.fileno()).st_size
    stream = PeekableStream(f, seekable=True)
    members = []
    for ti in iter_headers(stream):
        check_member(ti)
        members.append(ti)
    if stream.tell() > size:
        last = printable(members[-1].name) if members else "?"
        raise InvalidInput(f"input tar is truncated in the data of {last!r}")
    return members
