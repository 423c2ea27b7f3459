"""The TOC (``stargz.index.json``): records, JSON encoding and decoding.

Pure format logic on bytes and objects; no I/O. The JSON mirrors what the
reference writes: Go's ``json.MarshalIndent(toc, "", "\\t")`` of its
``JTOC``/``TOCEntry`` structs, fields in the same order, zero values omitted,
xattr values base64 (Go encodes ``[]byte`` that way).
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .._exceptions import TOCError
from .jsondoc import load_json

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"

#: Largest TOC JSON the reader accepts. Bounds memory on hostile blobs; a
#: layer of 50 000 files has a TOC of about 20 MiB.
MAX_TOC_JSON_SIZE = 128 << 20

ENTRY_TYPES = frozenset(
    {"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
_INT_FIELDS = ("size", "mode", "uid", "gid", "offset", "innerOffset", "endOffset",
               "devMajor", "devMinor", "chunkOffset", "chunkSize")
# Narrower ranges: the reference keeps a mode as a 32-bit os.FileMode.
_INT_LIMITS = {"mode": 1 << 32}
_STR_FIELDS = ("name", "type", "modtime", "linkName", "userName", "groupName",
               "digest", "chunkDigest")


def clean_name(name: str) -> str:
    """Normalise a tar entry name the way the reference does.

    ``/x``, ``./x``, ``x/`` and ``x`` all become ``x``; the root is ``""``.
    """
    return posixpath.normpath("/" + name.lstrip("/")).lstrip("/")


@dataclass(slots=True)
class TOCEntry:
    """One TOC record: a tar entry, or (``type == "chunk"``) a further chunk
    of the regular file named by the preceding entry."""

    name: str
    type: str
    size: int = 0
    modtime: str = ""
    link_name: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    user_name: str = ""
    group_name: str = ""
    offset: int = 0
    #: Uncompressed offset of the chunk inside the gzip member at ``offset``,
    #: when small files share one (``--min-chunk-size``); 0 when it starts it.
    inner_offset: int = 0
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str = ""
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""
    #: zstd:chunked only: the blob offset just past the file's last frame
    #: (containers/storage's ``endOffset``); never set in eStargz.
    end_offset: int = 0

    def is_data(self) -> bool:
        """True for entries that own compressed bytes (non-empty files, chunks)."""
        return (self.type == "reg" and self.size > 0) or self.type == "chunk"


# (attribute, JSON key) in the reference's field order.
_FIELDS = (
    ("name", "name"), ("type", "type"), ("size", "size"),
    ("modtime", "modtime"), ("link_name", "linkName"), ("mode", "mode"),
    ("uid", "uid"), ("gid", "gid"), ("user_name", "userName"),
    ("group_name", "groupName"), ("offset", "offset"),
    ("inner_offset", "innerOffset"), ("end_offset", "endOffset"),
    ("dev_major", "devMajor"), ("dev_minor", "devMinor"), ("xattrs", "xattrs"),
    ("digest", "digest"), ("chunk_offset", "chunkOffset"),
    ("chunk_size", "chunkSize"), ("chunk_digest", "chunkDigest"),
)
_KEY_TO_ATTR = {key: attr for attr, key in _FIELDS}


# What json.dumps(ensure_ascii=False) escapes: quotes, backslashes and
# control characters. Strings without them (nearly every name and digest)
# are quoted as they are, without the encoder's call (a tenth of the
# converter's main thread on a layer of many small files).
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f"\\]')


def _s(value: str) -> str:
    if _NEEDS_ESCAPE.search(value) is None:
        return f'"{value}"'
    return json.dumps(value, ensure_ascii=False)


def encode_entry(e: TOCEntry) -> str:
    """Encode one entry as the reference's indented JSON object (no trailing comma)."""
    lines = []
    for attr, key in _FIELDS:
        v = getattr(e, attr)
        if not v:
            continue  # Go's omitempty
        if attr == "xattrs":
            inner = ",\n".join(
                f"\t\t\t\t{_s(k)}: {_s(base64.b64encode(v[k]).decode())}"
                for k in sorted(v))
            lines.append(f'\t\t\t"xattrs": {{\n{inner}\n\t\t\t}}')
        elif isinstance(v, str):
            lines.append(f'\t\t\t"{key}": {_s(v)}')
        else:
            lines.append(f'\t\t\t"{key}": {v}')
    return "\t\t{\n" + ",\n".join(lines) + "\n\t\t}"


def encode_toc(encoded_entries: Iterable[str | bytes], version: int = 1,
               extra: dict[str, str] | None = None) -> bytes:
    """Assemble entries encoded with :func:`encode_entry` (as text, or as
    UTF-8 bytes) into the TOC JSON, copying them once: for a large layer the
    TOC is the converter's biggest allocation. ``extra`` string fields follow
    the entries (zstd:chunked's ``tarSplitDigest``)."""
    parts = [b'{\n\t"version": %d,\n\t"entries": [' % version]
    sep = b"\n"
    try:
        for e in encoded_entries:
            parts.append(sep)
            parts.append(e.encode("utf-8") if isinstance(e, str) else e)
            sep = b",\n"
    except UnicodeEncodeError:
        # Names with undecodable bytes reach here only if a caller skipped
        # the converter's checks; say so instead of writing broken JSON.
        raise TOCError("TOC contains a name that is not valid UTF-8") from None
    parts.append(b"\n\t]" if len(parts) > 1 else b"]")
    for key, value in (extra or {}).items():
        parts.append(f',\n\t{_s(key)}: {_s(value)}'.encode())
    parts.append(b"\n}")
    return b"".join(parts)


def _check_unicode(i: int, key: str, value: str) -> None:
    """Reject a lone surrogate (JSON's ``"\\ud800"``): no conforming writer
    produces one (Go writes U+FFFD), and it cannot be printed or encoded."""
    if value.isascii():  # constant time; the usual case
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TOCError(f"TOC entry {i}: {key!r} is not valid Unicode") from None


def _entry_from_json(i: int, obj: Any) -> TOCEntry:
    if not isinstance(obj, dict):
        raise TOCError(f"TOC entry {i} is not a JSON object")
    kw: dict[str, Any] = {}
    for key, value in obj.items():
        attr = _KEY_TO_ATTR.get(key)
        if attr is None:
            continue  # unknown fields are ignored, as Go does
        if value is None:
            continue
        if key in _INT_FIELDS:
            if type(value) is not int or not 0 <= value < _INT_LIMITS.get(key, 1 << 63):
                raise TOCError(f"TOC entry {i}: {key!r} is not a non-negative integer"
                               + (" below 2**32" if key in _INT_LIMITS else ""))
        elif key in _STR_FIELDS:
            if not isinstance(value, str):
                raise TOCError(f"TOC entry {i}: {key!r} is not a string")
            _check_unicode(i, key, value)
        else:  # xattrs
            if not isinstance(value, dict):
                raise TOCError(f"TOC entry {i}: 'xattrs' is not an object")
            decoded = {}
            for k, v in value.items():
                _check_unicode(i, "xattrs", k)
                if not isinstance(v, str):
                    raise TOCError(f"TOC entry {i}: xattr {k!r} is not base64 text")
                try:
                    decoded[k] = base64.b64decode(v, validate=True)
                except (binascii.Error, ValueError):
                    raise TOCError(f"TOC entry {i}: xattr {k!r} is not base64") from None
            value = decoded
        kw[attr] = value
    if "name" not in kw or "type" not in kw:
        raise TOCError(f"TOC entry {i} lacks a name or type")
    return TOCEntry(**kw)


@dataclass(slots=True)
class TOC:
    """A parsed TOC: its entries in order, plus the digest of its JSON bytes."""

    version: int
    entries: list[TOCEntry]
    digest: str = ""


def decode_toc(data: bytes) -> TOC:
    """Parse TOC JSON bytes into a :class:`TOC` (structure only; see :func:`check_toc`).

    Raises :class:`TOCError` for anything but one JSON object with an integer
    ``version`` and a list of ``entries`` -- including bytes after that object,
    which would make the reference compute a different TOC digest.
    """
    # UTF-8 only (no UTF-16, no byte order mark: the reference refuses
    # them), no NaN, bounded in size and depth.
    obj = load_json(data, "TOC", max_size=MAX_TOC_JSON_SIZE, error=TOCError)
    if data.rstrip(b" \t\r\n") != data:
        raise TOCError("TOC JSON is followed by trailing bytes")
    if not isinstance(obj, dict):
        raise TOCError("TOC JSON is not an object")
    version = obj.get("version")
    if type(version) is not int:
        raise TOCError("TOC JSON has no integer 'version'")
    if version != 1:
        raise TOCError(f"unsupported TOC version {version}")
    raw = obj.get("entries")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise TOCError("TOC 'entries' is not a list")
    return TOC(version=version, entries=[_entry_from_json(i, o) for i, o in enumerate(raw)])


def check_toc(toc: TOC, toc_offset: int) -> None:
    """Check the TOC's internal consistency, as a reader relies on it.

    Every non-empty file has its chunks contiguous from 0 to its size, each
    with a ``sha256`` chunk digest and a blob offset below ``toc_offset``
    (the end of the payload, for an external TOC); hardlinks name an entry;
    no name repeats. A chunk either starts a later gzip member, or (with an
    ``innerOffset``) shares the previous chunk's member and starts after it.
    """
    # Over 60 lines: one pass over the entries carrying the state of the
    # member and the file being read; split, that state would travel in and
    # out of every helper.
    seen: set[str] = set()
    last_offset = 0
    inner_end = 0  # uncompressed end of the last chunk in its member
    pending: TOCEntry | None = None  # the file whose chunks are being read
    next_chunk = 0

    def close_file(at: int) -> None:
        if pending is not None and next_chunk != pending.size:
            raise TOCError(f"chunks cover {next_chunk} of {pending.size} bytes",
                           entry=pending.name, offset=at)

    for e in toc.entries:
        if e.type not in ENTRY_TYPES:
            raise TOCError(f"unknown entry type {e.type!r}", entry=e.name)
        if e.type != "chunk":
            close_file(e.offset)
            pending = None
            name = clean_name(e.name)
            if name in seen and e.type != "dir":
                raise TOCError("name occurs twice in the TOC", entry=e.name)
            seen.add(name)
            if e.type == "reg" and e.digest and not _DIGEST_RE.match(e.digest):
                raise TOCError(f"bad file digest {e.digest!r}", entry=e.name)
            if e.type == "hardlink" and clean_name(e.link_name) not in seen:
                # The reference resolves hardlinks anywhere in the TOC, but
                # writers always put the target first; a later one is suspect.
                raise TOCError(f"hardlink target {e.link_name!r} is not an earlier entry",
                               entry=e.name)
            if not e.is_data():
                if e.offset or e.inner_offset or e.chunk_digest:
                    raise TOCError("entry without data has an offset or chunk digest",
                                   entry=e.name)
                continue
            pending, next_chunk = e, 0
            if not e.digest:
                raise TOCError("file has no digest", entry=e.name)
        else:
            if pending is None or clean_name(e.name) != clean_name(pending.name):
                raise TOCError("chunk does not follow its file", entry=e.name)
        # A data entry: a file's first chunk or a further chunk.
        if e.chunk_offset != next_chunk:
            raise TOCError(f"chunk starts at {e.chunk_offset}, expected {next_chunk}",
                           entry=e.name, offset=e.offset)
        size = e.chunk_size or (pending.size - e.chunk_offset)
        if size <= 0 or e.chunk_offset + size > pending.size:
            raise TOCError("chunk size is outside the file", entry=e.name, offset=e.offset)
        next_chunk += size
        if not _DIGEST_RE.match(e.chunk_digest):
            raise TOCError("chunk has no valid chunkDigest", entry=e.name, offset=e.offset)
        if e.offset > last_offset:
            inner_end = 0  # a new member
        # The first member may start at 0 only with its tar header before the data.
        shared = e.offset == last_offset and (e.offset or e.inner_offset)
        if not (e.offset > last_offset or shared) or e.inner_offset < inner_end \
                or e.offset >= toc_offset:
            raise TOCError("data offset is out of order or outside the blob",
                           entry=e.name, offset=e.offset)
        last_offset = e.offset
        inner_end = e.inner_offset + size
    close_file(toc_offset)
