"""Indexing an uncompressed input tar: one header record per entry, no data.

The index keeps each entry's ``tarfile.TarInfo`` (with ``offset_data``), so
the converter later reads payloads with ``pread`` in whatever order it needs.
Entries eStargz cannot represent are rejected here, naming the entry.
"""

from __future__ import annotations

import os
import tarfile
from typing import BinaryIO

from ._exceptions import InvalidInput, UnsupportedEntry
from ._tarstream import PeekableStream, iter_headers

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
    if not ti.name.strip("/"):
        if not ti.isdir():
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
