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

import math
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol, cast

from .._cancel import check_cancelled
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

# The ranges a header's numbers must fall in. tarfile decodes octal, GNU
# base-256 and PAX numbers of any size and sign, and turns a PAX number it
# cannot parse into 0; a value outside these would be written into a layer
# that our own reader, the reference or the kernel refuses, so the walk
# refuses it instead, naming the field.
#: Go's archive/tar keeps a size in an int64; the stream bounds it anyway.
MAX_SIZE = (1 << 63) - 1
#: uid_t and gid_t are 32 bits, and (uid_t)-1 means "leave unchanged" to
#: chown(2): no file can be owned by it.
MAX_ID = (1 << 32) - 2
#: Permission bits, setuid/setgid/sticky, and the file type bits some writers
#: add (Go's FileInfoHeader sets c_ISREG and friends); nothing is above them.
MAX_MODE = 0o177777
#: Our output is PAX, which has no record for device numbers: a ustar field
#: of 7 octal digits holds them (Linux majors have 12 bits, minors 20).
MAX_DEVICE = 0o7777777
#: The TOC's ``modtime`` is RFC 3339, whose years have four digits: times
#: from 0000-01-01T00:00:00Z to 9999-12-31T23:59:59Z (after rounding to the
#: second, as the TOC does).
MIN_TIME = -62167219200
MAX_TIME = 253402300799

# PAX number records as Go's archive/tar reads them (strconv.ParseInt, and
# parsePAXTime for times); Python's int() and float() would also take
# "1_0", " 5", "nan" or "1e400". ASCII digits only.
_PAX_INT = re.compile(r"[0-9]+\Z", re.ASCII)
_PAX_TIME = re.compile(r"[+-]?[0-9]+(\.[0-9]*)?\Z", re.ASCII)
_PAX_INT_KEYS = ("size", "uid", "gid")
_MAX_DIGITS = len(str(MAX_SIZE))
_PAX_TIME_KEYS = ("mtime", "atime", "ctime")
# Records whose value is a name: a NUL would cut it short in C (Go's
# validPAXRecord refuses it too).
_PAX_NAME_KEYS = ("path", "linkpath", "uname", "gname")
# A ustar number: octal digits padded with spaces or NULs on either side, as
# Go's parseOctal accepts; tarfile's int(..., 8) would also take a sign,
# underscores and anything after a NUL.
_OCTAL = re.compile(rb"[ \x00]*[0-7]*[ \x00]*\Z")
_NUMBER_FIELDS = (("mode", 100, 108), ("uid", 108, 116), ("gid", 116, 124),
                  ("size", 124, 136), ("mtime", 136, 148),
                  ("devmajor", 329, 337), ("devminor", 337, 345))
_NAME_FIELDS = (("name", 0, 100), ("linkname", 157, 257), ("uname", 265, 297),
                ("gname", 297, 329))
# The ustar prefix field, in POSIX headers only (GNU keeps other data
# there); star's headers (a "tar\0" trailer, as Go's reader tells them)
# end it early and keep access and change times after it.
_USTAR_PREFIX = ("prefix", 345, 500)
_STAR_PREFIX = ("prefix", 345, 476)
_POSIX_MAGIC = b"ustar\x0000"
_STAR_TRAILER = b"tar\x00"
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
             tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


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
        # Unread bytes are _buf[_off:]: reading and skipping move _off, so a
        # 512-byte header read does not copy the rest of a 64 KiB buffer
        # (it did, twice per member: a third of indexing a layer).
        self._buf = b""
        self._off = 0
        self._pos = 0
        self._seekable = seekable

    def _buffered(self) -> int:
        return len(self._buf) - self._off

    def peek(self, n: int) -> bytes:
        if self._buffered() < n:
            parts = [self._buf[self._off:]]
            have = len(parts[0])
            while have < n:
                more = self._raw.read(max(n - have, 65536))
                if not more:
                    break
                parts.append(more)
                have += len(more)
            self._buf, self._off = b"".join(parts), 0
        return self._buf[self._off:self._off + n]

    def read(self, n: int) -> bytes:
        if self._buffered() >= n:
            out = self._buf[self._off:self._off + n]
            self._off += n
        else:
            out = self._buf[self._off:] + self._raw.read(n - self._buffered())
            self._buf, self._off = b"", 0
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._pos

    def skip_to(self, pos: int) -> None:
        gap = pos - self._pos
        if gap < 0:
            raise self._error(f"tar stream went backwards to offset {pos}")
        if gap <= self._buffered():
            self._off += gap
            self._pos = pos
            return
        self._pos += self._buffered()
        gap -= self._buffered()
        self._buf, self._off = b"", 0
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
        #: Everything read for the current member, in order: its header
        #: blocks and extended records, for :func:`_raw_problem`.
        self.reads: list[bytes] = []

    def start(self) -> None:
        """Begin a member: a fresh budget, nothing read yet."""
        self.budget = MAX_HEADER_DATA
        self.reads = []

    def read(self, n: int) -> bytes:
        if n > MAX_SPECIAL_SIZE:
            raise _HeaderTooLarge(f"extended header record of {n} bytes exceeds "
                                  f"the {MAX_SPECIAL_SIZE}-byte limit")
        if n > self.budget:
            raise _HeaderTooLarge(f"more than {MAX_HEADER_DATA} bytes of header data")
        self.budget -= n
        data = self._stream.read(n)
        self.reads.append(data)
        return data

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
                 raw: list[bytes] | None = None,
                 ) -> Iterator[tarfile.TarInfo]:
    """Yield each member of the tar archive in ``stream``.

    Between two members the caller may read that member's data from
    ``stream`` (or not); the next header is found by skipping forward.
    ``offset`` and ``offset_data`` of each ``TarInfo`` are stream positions.
    A stream that ends cleanly at a header boundary without end-of-archive
    blocks is accepted, as Go's reader does. A header whose numbers are out
    of range or not numbers, or whose names hold a NUL, is an error
    (:func:`header_problem`), in every walk: converting, verifying, extracting.

    When ``raw`` is given, it holds, at each yield, what was read for that
    member: each extended header block followed by its record, then the
    member's own header block. ``tarfile`` drops trailing slashes from
    directory names; a consumer that must reproduce names exactly as Go's
    archive/tar reports them (the zTOC, :mod:`.ztoc`) reads them from there.
    """
    ctx = _Ctx(_HeaderReader(stream))
    while True:
        check_cancelled()  # the walk of a layer with many files takes a while
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
        ctx.fileobj.start()
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
        problem = _raw_problem(ctx.fileobj.reads) or header_problem(ti)
        if problem:
            raise error(f"invalid tar header at offset {at}"
                        f" ({printable(ti.name)!r}): {problem}")
        if raw is not None:
            raw[:] = ctx.fileobj.reads
        yield ti


def _raw_problem(reads: list[bytes]) -> str | None:
    """What is wrong with the raw header blocks and extended records of one
    member (``reads``: the extended headers, each followed by its record, then
    the member's own header), or ``None``.

    Looks at what ``tarfile`` decodes leniently: octal fields with a sign,
    underscores or bytes after a NUL, and names (ustar fields, GNU long
    names) with bytes after a NUL, which tarfile, Go and GNU tar cut there
    but another reader need not.
    """
    i = 0
    while i < len(reads) and len(reads[i]) == BLOCK:
        block = reads[i]
        for what, start, end in _NUMBER_FIELDS:
            field = block[start:end]
            if field[0] not in (0x80, 0xFF) and not _OCTAL.match(field):
                shown = printable(field.rstrip(b"\x00").decode("latin-1"))
                return f"{what} field '{shown}' is not an octal number"
        names: tuple[tuple[str, int, int], ...] = _NAME_FIELDS
        if block[257:265] == _POSIX_MAGIC:
            names += (_STAR_PREFIX if block[508:512] == _STAR_TRAILER else _USTAR_PREFIX,)
        for what, start, end in names:
            if _nul_inside(block[start:end]):
                return f"{what} field holds a NUL byte"
        kind = block[156:157]
        if kind not in _EXTENDED:
            return None  # the member's own header; what follows is sparse data
        if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) and i + 1 < len(reads):
            size = tarfile.nti(block[124:136])  # type: ignore[attr-defined]  # not in typeshed
            if _nul_inside(reads[i + 1][:size]):
                return "GNU long name holds a NUL byte"
        i += 2
    return None


def _nul_inside(field: bytes) -> bool:
    """True if anything but NULs follows the first NUL of ``field``."""
    at = field.find(0)
    return at >= 0 and field.count(0, at) != len(field) - at


def _shown(value: str) -> str:
    """``value`` for a one-line message: printable, and not too long."""
    return printable(value if len(value) <= 40 else value[:37] + "...")


def header_problem(ti: tarfile.TarInfo) -> str | None:
    """What makes member ``ti`` unfit for a layer, or ``None``: a PAX number
    that is not one, a number outside the ranges above, a NUL in a name or
    in a PAX keyword."""
    for key, value in ti.pax_headers.items():
        if "\x00" in key:
            return f"PAX keyword {printable(key)!r} holds a NUL byte"
        if key in _PAX_INT_KEYS:
            if not _PAX_INT.match(value):
                return f"PAX {key} {_shown(value)!r} is not a non-negative integer"
            # More digits than 2**63 has: tarfile's int() would refuse
            # (4300 digits at most) and make it 0, or it is out of range.
            if len(value.lstrip("0")) > _MAX_DIGITS:
                return f"PAX {key} {_shown(value)} is too large"
        if key in _PAX_TIME_KEYS:
            if not _PAX_TIME.match(value):
                return f"PAX {key} {_shown(value)!r} is not a time in seconds"
            seconds = value.split(".")[0].lstrip("+-").lstrip("0")
            if len(seconds) > _MAX_DIGITS or not (
                    MIN_TIME <= int(value.split(".")[0]) <= MAX_TIME):
                return f"PAX {key} {_shown(value)} is outside years 0000 to 9999"
        if key in _PAX_NAME_KEYS and "\x00" in value:
            return f"PAX {key} holds a NUL byte"
    for what, number, top in (("size", ti.size, MAX_SIZE), ("uid", ti.uid, MAX_ID),
                              ("gid", ti.gid, MAX_ID), ("mode", ti.mode, MAX_MODE),
                              ("devmajor", ti.devmajor, MAX_DEVICE),
                              ("devminor", ti.devminor, MAX_DEVICE)):
        if not 0 <= number <= top:
            return f"{what} {number} is outside 0 to {top}"
    mtime = ti.mtime
    if isinstance(mtime, float):
        if not math.isfinite(mtime):
            return f"mtime {mtime} is not a time"
        mtime = math.floor(mtime + 0.5)
    if not MIN_TIME <= mtime <= MAX_TIME:
        return f"mtime {mtime} is outside years 0000 to 9999"
    for what, name in (("name", ti.name), ("link target", ti.linkname),
                       ("user name", ti.uname), ("group name", ti.gname)):
        if "\x00" in name:
            return f"{what} holds a NUL byte"
    return None


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
