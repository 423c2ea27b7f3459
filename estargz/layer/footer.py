"""The eStargz footer: a tiny empty gzip member that says where the TOC starts.

Layout of the 51-byte footer (all of it one valid, empty RFC 1952 member)::

    1f 8b 08 04 00000000 00 ff     gzip header, FLG=FEXTRA, MTIME 0, OS unknown
    1a 00                          XLEN = 26
    'S' 'G' 16 00                  subfield id "SG", LEN = 22
    %016x 'STARGZ'                 TOC offset in hex, then the magic
    01 00 00 ff ff                 an empty final stored deflate block
    00000000 00000000              CRC32 and ISIZE of nothing

The older stargz format used a 47-byte footer whose extra field holds the
22-byte payload directly, without the subfield header; readers accept both.

A blob whose TOC is kept outside it (``--external-toc``, the reference's
``estargz/externaltoc``) ends in a 46-byte footer instead: the same empty
member whose "SG" subfield holds just ``STARGZEXTERNALTOC`` and no offset.
Pure functions on bytes only.
"""

from __future__ import annotations

import struct
import zlib

from .._exceptions import FooterError

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
_MAGIC = b"STARGZ"
_PAYLOAD_LEN = 16 + len(_MAGIC)
# An empty, final, stored deflate block followed by CRC32 and ISIZE of b"".
_EMPTY_DEFLATE_TRAILER = b"\x01\x00\x00\xff\xff" + b"\x00" * 8
EXTERNAL_TOC_FOOTER_SIZE = 46
_EXTERNAL_MAGIC = b"STARGZEXTERNALTOC"


def _gzip_with_extra(extra: bytes) -> bytes:
    header = b"\x1f\x8b\x08\x04" + b"\x00\x00\x00\x00" + b"\x00\xff"
    return header + struct.pack("<H", len(extra)) + extra + _EMPTY_DEFLATE_TRAILER


def footer_bytes(toc_offset: int) -> bytes:
    """Return the 51-byte footer pointing at ``toc_offset``.

    Byte-identical to the reference implementation's footer.
    """
    if not 0 <= toc_offset < 1 << 63:
        raise ValueError(f"TOC offset out of range: {toc_offset}")
    payload = b"%016x" % toc_offset + _MAGIC
    extra = b"SG" + struct.pack("<H", len(payload)) + payload
    out = _gzip_with_extra(extra)
    assert len(out) == FOOTER_SIZE
    return out


def external_toc_footer_bytes() -> bytes:
    """Return the 46-byte footer of a blob whose TOC is external.

    Byte-identical to the reference's ``externaltoc`` footer.
    """
    extra = b"SG" + struct.pack("<H", len(_EXTERNAL_MAGIC)) + _EXTERNAL_MAGIC
    out = _gzip_with_extra(extra)
    assert len(out) == EXTERNAL_TOC_FOOTER_SIZE
    return out


def is_external_toc_footer(tail: bytes) -> bool:
    """True if ``tail`` (a blob's last bytes) ends in the external-TOC footer."""
    return tail[-EXTERNAL_TOC_FOOTER_SIZE:] == external_toc_footer_bytes()


def _extra_field(footer: bytes) -> bytes:
    """Validate ``footer`` as one empty gzip member; return its FEXTRA field."""
    if footer[:4] != b"\x1f\x8b\x08\x04":
        raise FooterError("footer is not a gzip member with an extra field")
    (xlen,) = struct.unpack_from("<H", footer, 10)
    extra = footer[12:12 + xlen]
    if len(extra) != xlen:
        raise FooterError("footer extra field is truncated")
    d = zlib.decompressobj(31)
    try:
        data = d.decompress(footer, 1)
    except zlib.error as e:
        raise FooterError(f"footer is not a valid gzip member: {e}") from None
    if data or not d.eof or d.unused_data:
        raise FooterError("footer is not one empty gzip member")
    return extra


def _parse_offset(payload: bytes) -> int:
    if len(payload) != _PAYLOAD_LEN or payload[16:] != _MAGIC:
        raise FooterError("footer lacks the STARGZ magic")
    hexdigits = payload[:16]
    if not all(c in b"0123456789abcdefABCDEF" for c in hexdigits):
        raise FooterError("footer TOC offset is not hexadecimal")
    return int(hexdigits, 16)


def parse_footer(tail: bytes) -> tuple[int, int]:
    """Find the TOC offset in the last bytes of a blob.

    ``tail`` is the blob's last :data:`FOOTER_SIZE` bytes (or fewer, for a
    blob shorter than that). Returns ``(toc_offset, footer_size)``; tries the
    current 51-byte footer first, then the legacy 47-byte one.
    Raises :class:`FooterError` when neither is present.
    """
    errors = []
    if len(tail) >= FOOTER_SIZE:
        footer = tail[-FOOTER_SIZE:]
        try:
            extra = _extra_field(footer)
            if len(extra) != 4 + _PAYLOAD_LEN or extra[:2] != b"SG":
                raise FooterError("footer extra field is not an 'SG' subfield")
            if struct.unpack_from("<H", extra, 2)[0] != _PAYLOAD_LEN:
                raise FooterError("footer 'SG' subfield has the wrong length")
            return _parse_offset(extra[4:]), FOOTER_SIZE
        except FooterError as e:
            errors.append(e)
    if len(tail) >= LEGACY_FOOTER_SIZE:
        try:
            extra = _extra_field(tail[-LEGACY_FOOTER_SIZE:])
            return _parse_offset(extra), LEGACY_FOOTER_SIZE
        except FooterError as e:
            errors.append(e)
    if not errors:
        raise FooterError(f"blob of {len(tail)} bytes is too small for a footer")
    raise errors[0]
