"""The footer on bytes alone: layout, both formats, and bad footers."""

from __future__ import annotations

import gzip
import struct

import pytest

from estargz import FooterError, footer_bytes, parse_footer


def test_footer_is_one_empty_gzip_member_with_the_sg_subfield():
    f = footer_bytes(0x1234)
    assert len(f) == 51
    assert gzip.decompress(f) == b""
    assert f[3] == 0x04  # FEXTRA
    assert struct.unpack_from("<H", f, 10)[0] == 26
    assert f[12:16] == b"SG\x16\x00"
    assert f[16:38] == b"0000000000001234STARGZ"


@pytest.mark.parametrize("offset", [0, 1, 51, 2**40 + 7, 2**63 - 1])
def test_footer_round_trips(offset):
    assert parse_footer(footer_bytes(offset)) == (offset, 51)
    # The footer is found in the last 51 bytes of any longer tail.
    assert parse_footer(b"junk" + footer_bytes(offset)) == (offset, 51)


def test_footer_offset_out_of_range_is_refused():
    with pytest.raises(ValueError):
        footer_bytes(-1)


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f[:16] + b"g" + f[17:], "not hexadecimal"),
    (lambda f: f[:32] + b"STARGX" + f[38:], "STARGZ magic"),
    (lambda f: f[:12] + b"XG" + f[14:], "'SG' subfield"),
    (lambda f: f[:-8] + b"\x01" + f[-7:], "not a valid gzip member"),
    (lambda f: b"\x00" + f[1:], "not a gzip member"),
    (lambda f: f[:20], "too small"),
])
def test_bad_footers_are_named(mutate, message):
    with pytest.raises(FooterError, match=message):
        parse_footer(mutate(footer_bytes(99)))
