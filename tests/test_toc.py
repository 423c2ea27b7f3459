"""The TOC on objects and bytes alone: encoding, decoding, consistency checks."""

from __future__ import annotations

import json

import pytest

from estargz import TOCEntry, TOCError, clean_name, decode_toc
from estargz.layer.toc import TOC, check_toc, encode_entry, encode_toc

D = "sha256:" + "ab" * 32


def encode(entries):
    return encode_toc(encode_entry(e) for e in entries)


def test_encoding_matches_the_reference_layout():
    e = TOCEntry(name="bin/", type="dir", mode=0o755, modtime="2024-01-01T00:00:00Z",
                 xattrs={"user.b": b"\x00\xff", "user.a": b"hi"})
    text = encode([e]).decode()
    assert text == (
        '{\n\t"version": 1,\n\t"entries": [\n\t\t{\n'
        '\t\t\t"name": "bin/",\n\t\t\t"type": "dir",\n'
        '\t\t\t"modtime": "2024-01-01T00:00:00Z",\n\t\t\t"mode": 493,\n'
        '\t\t\t"xattrs": {\n\t\t\t\t"user.a": "aGk=",\n\t\t\t\t"user.b": "AP8="\n\t\t\t}\n'
        '\t\t}\n\t]\n}')
    assert json.loads(text)["entries"][0]["xattrs"] == {"user.a": "aGk=", "user.b": "AP8="}


def test_round_trip_keeps_every_field():
    entries = [
        TOCEntry(name="a", type="reg", size=5, modtime="2024-01-01T00:00:00Z", mode=0o644,
                 uid=1, gid=2, user_name="ü", group_name="g", offset=10, digest=D,
                 chunk_digest=D, chunk_size=3),
        TOCEntry(name="a", type="chunk", offset=20, chunk_offset=3, chunk_digest=D),
        TOCEntry(name="dev/x", type="char", dev_major=1, dev_minor=3),
        TOCEntry(name="l", type="symlink", link_name="a"),
    ]
    toc = decode_toc(encode(entries))
    assert toc.entries == entries
    check_toc(toc, 100)


@pytest.mark.parametrize("raw, message", [
    (b"[]", "not an object"),
    (b"{", "not valid JSON"),
    (b'{"version": 2, "entries": []}', "unsupported TOC version 2"),
    (b'{"version": "1", "entries": []}', "integer 'version'"),
    (b'{"version": 1, "entries": {}}', "not a list"),
    (b'{"version": 1, "entries": [{"type": "reg"}]}', "lacks a name"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": -1}]}', "non-negative"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": 1.5}]}', "non-negative"),
    (b'{"version": 1, "entries": [{"name": 7, "type": "reg"}]}', "not a string"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "xattrs": {"k": "!!"}}]}',
     "not base64"),
    (b'{"version": 1, "entries": []} x', "not valid JSON"),
    (b'{"version": 1, "entries": []}\n', "trailing bytes"),
])
def test_malformed_toc_json_is_refused(raw, message):
    with pytest.raises(TOCError, match=message):
        decode_toc(raw)


def reg(name="f", size=10, offset=50, **kw):
    return TOCEntry(**{"name": name, "type": "reg", "size": size, "offset": offset,
                       "digest": D, "chunk_digest": D, **kw})


@pytest.mark.parametrize("entries, message", [
    ([TOCEntry(name="x", type="socket")], "unknown entry type"),
    ([reg(), reg()], "occurs twice"),
    ([TOCEntry(name="h", type="hardlink", link_name="f"), reg()], "not an earlier entry"),
    ([reg(chunk_digest="")], "no valid chunkDigest"),
    ([reg(digest="")], "has no digest"),
    ([reg(offset=500)], "outside the blob"),
    ([reg(name="a", offset=60), reg(name="b", offset=50)], "out of order"),
    ([reg(chunk_size=4)], "chunks cover 4 of 10"),
    ([reg(chunk_size=4), TOCEntry(name="g", type="chunk", offset=60, chunk_offset=4,
                                  chunk_digest=D)], "does not follow its file"),
    ([reg(chunk_size=4), TOCEntry(name="f", type="chunk", offset=60, chunk_offset=5,
                                  chunk_digest=D)], "expected 4"),
    ([TOCEntry(name="d", type="dir", offset=5)], "without data has an offset"),
])
def test_inconsistent_tocs_are_refused(entries, message):
    with pytest.raises(TOCError, match=message):
        check_toc(TOC(1, entries), 100)


@pytest.mark.parametrize("name, clean", [
    ("/x", "x"), ("./x", "x"), ("x/", "x"), ("//a//b/../c", "a/c"), ("./", ""),
    ("../../etc", "etc"), ("", ""),
])
def test_clean_name(name, clean):
    assert clean_name(name) == clean
