"""Hostile blobs get a clean error: never a traceback, never unbounded memory.

A clean error is, in the library, an :class:`estargz.EstargzError` (for a
blob, :class:`~estargz.InvalidBlob` or a subclass); on the command line, exit
status 1, exactly one ``estargz: error: ...`` line on stderr, no traceback and
nothing on stdout. Gzip bombs run the CLI in a subprocess whose peak RSS must
stay under 200 MiB.

Most blobs are a small valid conversion (``blobcraft.every_kind_blob``) with
one thing changed; ``blobcraft.Layout`` reassembles the rest around the
change, so the error is the one the change causes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import tarfile
import time
import tracemalloc

import pytest

import blobcraft
import estargz
from blobcraft import (
    GiB,
    Layout,
    MiB,
    assert_clean_failure,
    dump_toc,
    gzip_bomb,
    gzip_member,
    header_span,
    pax_header,
    replace_header,
    run_measured,
    special_header,
    toc_tar,
)
from estargz import (
    FOOTER_SIZE,
    BytesSource,
    DigestMismatch,
    EstargzError,
    FooterError,
    InvalidBlob,
    LayerReader,
    TOCError,
    verify_blob,
)
from estargz.layer.toc import MAX_TOC_JSON_SIZE

RSS_LIMIT_MIB = 200
D0 = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def seed() -> bytes:
    return blobcraft.every_kind_blob()


@pytest.fixture
def layout(seed) -> Layout:
    return Layout.of(seed)


def read_everything(blob: bytes) -> None:
    """Open, list and read every file of ``blob``, as the CLI's commands do."""
    reader = LayerReader(BytesSource(blob))
    for e in reader.entries:
        if e.type == "reg":
            for _ in reader.iter_file(e.name):
                pass


def refused(blob: bytes, error: type = InvalidBlob, match: str = "") -> None:
    """Both opening and verifying ``blob`` raise ``error`` matching ``match``."""
    with pytest.raises(error, match=match):
        LayerReader(BytesSource(blob))
    with pytest.raises(error, match=match):
        verify_blob(BytesSource(blob))


def write(tmp_path, blob: bytes, name: str = "hostile.esgz"):
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def test_the_seed_blob_and_its_reassembly_verify(seed, layout):
    # Without this the refusals below could come from the test's own rebuild.
    assert verify_blob(BytesSource(seed)).entries == 32
    again = layout.blob()
    assert again[:layout.toc_offset()] == seed[:layout.toc_offset()]
    assert (LayerReader(BytesSource(again)).entries
            == LayerReader(BytesSource(seed)).entries)
    layout.edit_member(3, lambda data: data)  # recompressed: other bytes, same content
    assert verify_blob(BytesSource(layout.blob())).entries == 32


# --- random bytes, emptiness, truncation -------------------------------------

@pytest.mark.parametrize("size", [0, 1, 46, 47, 50, 51, 52, 512, 4096, 100_000])
def test_random_bytes_of_any_size_lack_a_footer(size):
    blob = random.Random(size).randbytes(size)
    refused(blob, FooterError, "footer")


def test_random_bytes_behind_a_valid_footer_are_not_a_toc():
    for n in (1, 10, 1000, 100_000):
        body = random.Random(n).randbytes(n)
        refused(body + estargz.footer_bytes(0), TOCError, "gzip")


def test_empty_file_is_too_small_for_a_footer(tmp_path):
    refused(b"", FooterError, "blob of 0 bytes is too small for a footer")
    path = write(tmp_path, b"")
    for args in (["verify"], ["ls"], ["toc"], ["extract", "etc/small"]):
        assert_clean_failure(run_measured("layer", args[0], path, *args[1:]),
                             "too small for a footer")


def test_truncation_at_every_byte_is_refused(seed):
    for n in range(len(seed)):
        cut = seed[:n]
        with pytest.raises(InvalidBlob):
            LayerReader(BytesSource(cut))
        with pytest.raises(InvalidBlob):
            verify_blob(BytesSource(cut))


def test_cutting_out_any_range_before_the_footer_is_refused(seed):
    rnd = random.Random(7)
    body = len(seed) - FOOTER_SIZE
    cuts = [(start, 1) for start in range(body)] + [
        (rnd.randrange(body), rnd.randint(2, 2000)) for _ in range(500)]
    for start, length in cuts:
        blob = seed[:start] + seed[min(start + length, body):]
        with pytest.raises(InvalidBlob):
            verify_blob(BytesSource(blob))
        with contextlib.suppress(EstargzError):
            read_everything(blob)


def test_body_truncated_before_the_toc_is_refused(layout):
    # The TOC and footer are intact but name data past the shortened body.
    toc, members = layout.fixed_toc(), layout.members
    for keep in (0, 1, len(members) // 2, len(members) - 1):
        layout.members = members[:keep]
        with pytest.raises(TOCError, match="outside the blob"):
            LayerReader(BytesSource(layout.blob(toc=toc)))


# --- the footer --------------------------------------------------------------

@pytest.mark.parametrize("where", ["past the end", "at the footer", "inside the footer",
                                   "2**63-1"])
def test_footer_offset_outside_the_payload_is_refused(seed, where, tmp_path):
    body = seed[:-FOOTER_SIZE]
    offset = {"past the end": len(seed) + 1000, "at the footer": len(body),
              "inside the footer": len(body) + 20, "2**63-1": 2**63 - 1}[where]
    blob = body + estargz.footer_bytes(offset)
    refused(blob, FooterError, re.escape(f"footer points at TOC offset {offset}, outside "
                                         f"the {len(seed)}-byte blob"))
    assert_clean_failure(run_measured("layer", "ls", write(tmp_path, blob)),
                         f"TOC offset {offset}")


def test_legacy_footer_offset_outside_the_payload_is_refused(seed):
    payload = b"%016xSTARGZ" % len(seed)
    legacy = (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + len(payload).to_bytes(2, "little")
              + payload + b"\x01\x00\x00\xff\xff" + bytes(8))
    refused(seed[:-FOOTER_SIZE] + legacy, FooterError, "outside the")


@pytest.mark.parametrize("offset, message", [
    (0, "tar entry at the TOC offset is '.no.prefetch.landmark', not 'stargz.index.json'"),
    (1, "invalid gzip data"),
    ("a payload member", "invalid tar header"),
    ("the last byte", "gzip stream is truncated"),
])
def test_footer_offset_at_something_other_than_the_toc_is_refused(seed, layout, offset,
                                                                 message):
    if offset == "a payload member":
        offset = layout.entry("etc/larger")["offset"]
    elif offset == "the last byte":
        offset = len(seed) - FOOTER_SIZE - 1
    refused(seed[:-FOOTER_SIZE] + estargz.footer_bytes(offset), TOCError, message)


def test_footer_with_a_non_hex_offset_is_refused(seed):
    footer = bytearray(seed[-FOOTER_SIZE:])
    footer[16:18] = b"zz"
    refused(seed[:-FOOTER_SIZE] + bytes(footer), FooterError, "not hexadecimal")


# --- TOC entries pointing at the wrong bytes ----------------------------------

@pytest.mark.parametrize("offset", ["toc offset", "end of blob", 2**62])
def test_toc_data_offset_outside_the_blob_is_refused(layout, offset):
    toc = layout.fixed_toc()
    last = [e for e in toc["entries"] if e.get("offset")][-1]
    last["offset"] = {"toc offset": layout.toc_offset(),
                      "end of blob": len(layout.blob()) + 10}.get(offset, offset)
    refused(layout.blob(toc=toc), TOCError,
            rf"data offset is out of order or outside the blob \(entry '{last['name']}'")


def test_toc_data_offset_inside_a_gzip_member_is_refused(layout, tmp_path):
    toc = layout.fixed_toc()
    chunk = [e for e in toc["entries"] if e["name"] == "etc/larger"][2]
    chunk["offset"] += 1  # still in order, but not where a member starts
    blob = layout.blob(toc=toc)
    reader = LayerReader(BytesSource(blob))
    with pytest.raises(InvalidBlob, match=r"invalid gzip data.*\(entry 'etc/larger', offset"):
        b"".join(reader.iter_file("etc/larger"))
    with pytest.raises(InvalidBlob, match="chunk offset does not start the gzip member "
                                          r"holding the chunk \(entry 'etc/larger'"):
        verify_blob(BytesSource(blob))
    path = write(tmp_path, blob)
    assert_clean_failure(run_measured("layer", "extract", path, "etc/larger"),
                         "invalid gzip data", "'etc/larger'")


def test_file_size_claiming_terabytes_is_refused_without_reading_them(layout, tmp_path):
    toc = layout.fixed_toc()
    small = next(e for e in toc["entries"] if e["name"] == "etc/small")
    small["size"] = 2 << 40  # one chunk of 2 TiB, of which 13 bytes exist
    blob = layout.blob(toc=toc)
    reader = LayerReader(BytesSource(blob))
    with pytest.raises(InvalidBlob, match=r"chunk data ends \d+ bytes early \(entry 'etc/small'"):
        b"".join(reader.iter_file("etc/small"))
    with pytest.raises(InvalidBlob, match="disagree on size: 13 vs 2199023255552"):
        verify_blob(BytesSource(blob))
    path = write(tmp_path, blob)
    run = run_measured("layer", "extract", path, "etc/small")
    assert_clean_failure(run, "chunk data ends", "'etc/small'")
    assert run.rss_mib < RSS_LIMIT_MIB


@pytest.mark.parametrize("field, value, message", [
    ("chunkSize", 2 << 40, "chunk size is outside the file"),
    ("size", 2**63, "'size' is not a non-negative integer"),
    ("chunkSize", 2**64, "'chunkSize' is not a non-negative integer"),
])
def test_sizes_beyond_the_file_or_64_bits_are_refused(layout, field, value, message):
    toc = layout.fixed_toc()
    next(e for e in toc["entries"] if e["name"] == "etc/exact")[field] = value
    refused(layout.blob(toc=toc), TOCError, message)


def test_file_of_100k_chunks_is_listed_in_linear_time():
    # A hostile TOC may cut one file into as many chunks as the blob has
    # bytes; finding each chunk's end must not rescan the rest of the TOC.
    n = 100_000
    entries = [{"name": "f", "type": "reg", "size": n, "offset": 10, "digest": D0,
                "chunkSize": 1, "chunkDigest": D0}]
    entries += [{"name": "f", "type": "chunk", "offset": 10 + k, "chunkOffset": k,
                 "chunkSize": 1, "chunkDigest": D0} for k in range(1, n)]
    body = bytes(n + 20)
    blob = (body + gzip_member(toc_tar(json.dumps({"version": 1, "entries": entries}).encode()))
            + estargz.footer_bytes(len(body)))
    reader = LayerReader(BytesSource(blob))
    started = time.perf_counter()
    chunks = reader.chunks("f")
    # Quadratic before: 8 s here, hours for a TOC at its size limit.
    assert time.perf_counter() - started < 1.0
    assert len(chunks) == n and chunks[-1][2] == len(body)
    with pytest.raises(InvalidBlob, match="gzip stream is truncated"):
        b"".join(reader.iter_file("f"))  # the body is zeros


# --- malformed TOC JSON -----------------------------------------------------

def toc_with(entries_json: str) -> bytes:
    return b'{"version": 1, "entries": [' + entries_json.encode() + b"]}"


MALFORMED = [
    (b"not json", "TOC is not valid JSON"),
    (b"", "TOC is not valid JSON"),
    (b"[]", "TOC JSON is not an object"),
    (b'"text"', "TOC JSON is not an object"),
    (b'{"entries": []}', "TOC JSON has no integer 'version'"),
    (b'{"version": "1", "entries": []}', "TOC JSON has no integer 'version'"),
    (b'{"version": 1.0, "entries": []}', "TOC JSON has no integer 'version'"),
    (b'{"version": 2, "entries": []}', "unsupported TOC version 2"),
    (b'{"version": 1, "entries": {}}', "TOC 'entries' is not a list"),
    (toc_with("7"), "TOC entry 0 is not a JSON object"),
    (toc_with('{"name": "a"}'), "TOC entry 0 lacks a name or type"),
    (toc_with('{"name": "a", "type": "reg", "size": "12"}'), "'size' is not a non-negative"),
    (toc_with('{"name": "a", "type": "reg", "size": true}'), "'size' is not a non-negative"),
    (toc_with('{"name": "a", "type": "reg", "size": -1}'), "'size' is not a non-negative"),
    (toc_with('{"name": "a", "type": "dir", "mode": 4294967296}'),
     "'mode' is not a non-negative integer below 2**32"),
    (toc_with('{"name": ["a"], "type": "dir"}'), "'name' is not a string"),
    (toc_with('{"name": "a\\ud800", "type": "dir"}'), "'name' is not valid Unicode"),
    (toc_with('{"name": "a", "type": "symlink", "linkName": "\\udcff"}'),
     "'linkName' is not valid Unicode"),
    (toc_with('{"name": "a", "type": "dir", "xattrs": []}'), "'xattrs' is not an object"),
    (toc_with('{"name": "a", "type": "dir", "xattrs": {"k": "!!"}}'), "xattr 'k' is not base64"),
    (toc_with('{"name": "a", "type": "socket"}'), "unknown entry type 'socket'"),
    (toc_with('{"name": "a", "type": "dir"}, {"name": "a", "type": "fifo"}'),
     "name occurs twice"),
    (toc_with('{"name": "h", "type": "hardlink", "linkName": "x"}'), "not an earlier entry"),
    (toc_with(f'{{"name": "c", "type": "chunk", "offset": 1, "chunkDigest": "{D0}"}}'),
     "chunk does not follow its file"),
    (b'{"version": 1, "entries": []} {}', "TOC is not valid JSON"),
    (b'{"version": 1, "entries": []}\n', "TOC JSON is followed by trailing bytes"),
    (b'{"version": 1, "entries": [], "x": NaN}', "TOC is not valid JSON: NaN is not JSON"),
    (b'{"version": 1, "entries": [], "x": -Infinity}', "-Infinity is not JSON"),
    (b'\xef\xbb\xbf{"version": 1, "entries": []}', "TOC is not valid JSON: Unexpected UTF-8 BOM"),
    ('{"version": 1, "entries": []}'.encode("utf-16"), "TOC is not valid JSON: not UTF-8"),
    (b'{"version": 1, "entries": [], "x": "\xff"}', "TOC is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "TOC is nested deeper than 64 levels"),
    (b'{"version": 1, "entries": [], "x": ' + b"[" * 65 + b"]" * 65 + b"}",
     "TOC is nested deeper than 64 levels"),
    (b'{"version": 1, "entries": [], "x": 1e400}', "TOC is not valid JSON: number 1e400"),
    (b'{"version": 1' + b"0" * 5000 + b', "entries": []}', "TOC is not valid JSON"),
    (b'{"version": 1, "entries": [' + b'{"name": "d", "type": "dir"},' * 50_000 + b"7]}",
     "TOC entry 50000 is not a JSON object"),
]


@pytest.mark.parametrize("raw, message", MALFORMED,
                         ids=[f"{i}-{m[:30]}" for i, (_, m) in enumerate(MALFORMED)])
def test_malformed_toc_json_in_a_blob_is_refused(layout, raw, message):
    refused(layout.blob(toc_json=raw), TOCError, re.escape(message))


@pytest.mark.parametrize("raw, message", [
    (toc_with('{"name": "a\\ud800", "type": "dir"}'), "'name' is not valid Unicode"),
    (toc_with('{"name": "a", "type": "dir", "mode": 1099511627776}'), "'mode' is not"),
    (b"[" * 100_000 + b"]" * 100_000, "TOC is nested deeper than 64 levels"),
    (b'{"version": 2, "entries": []}', "unsupported TOC version 2"),
], ids=["lone surrogate", "40-bit mode", "deep nesting", "version 2"])
def test_malformed_toc_json_is_one_line_from_every_command(layout, tmp_path, raw, message):
    # A lone surrogate or a 40-bit mode once made `ls` crash while printing.
    path = write(tmp_path, layout.blob(toc_json=raw))
    for args in (["ls"], ["ls", "--json"], ["toc"], ["verify"], ["extract", "etc/small"]):
        assert_clean_failure(run_measured("layer", args[0], path, *args[1:]), message)


# --- a gigantic TOC and gzip bombs --------------------------------------------

def assert_refused_in_bounded_memory(path, *fragments, commands=("ls", "toc", "verify")):
    for cmd in commands:
        run = run_measured("layer", cmd, path)
        assert_clean_failure(run, *fragments)
        assert run.rss_mib < RSS_LIMIT_MIB, (cmd, run.rss_mib)


def test_toc_header_claiming_more_than_the_limit_is_refused_before_reading(layout, tmp_path):
    toc_json = dump_toc(layout.fixed_toc())
    member = gzip_member(toc_tar(toc_json, size=MAX_TOC_JSON_SIZE + 1)[:-1024])
    blob = layout.blob(toc_member=member)
    refused(blob, TOCError, f"TOC JSON of {MAX_TOC_JSON_SIZE + 1} bytes exceeds the "
                            f"{MAX_TOC_JSON_SIZE}-byte limit")
    assert_refused_in_bounded_memory(write(tmp_path, blob), "exceeds the")


def test_gzip_bomb_toc_is_refused_in_bounded_memory(layout, tmp_path):
    # 1 GiB of zeros in ~1 MB; the header admits to all of it.
    header = toc_tar(b"", size=GiB)[:512]
    blob = layout.blob(toc_member=gzip_bomb(header, GiB))
    assert len(blob) < 2 * MiB
    path = write(tmp_path, blob)
    assert_refused_in_bounded_memory(path, f"TOC JSON of {GiB} bytes exceeds the")


def test_zero_filled_toc_at_the_size_limit_costs_a_few_times_the_limit(layout, tmp_path):
    # The largest TOC accepted is read whole, so memory is proportional to
    # the limit; check it is about twice the limit (read pieces and their
    # join), not more.
    header = toc_tar(b"", size=MAX_TOC_JSON_SIZE)[:512]
    path = write(tmp_path, layout.blob(toc_member=gzip_bomb(header, MAX_TOC_JSON_SIZE + 1536)))
    run = run_measured("layer", "ls", path)
    assert_clean_failure(run, "TOC is not valid JSON")
    assert run.rss_mib < 2.5 * MAX_TOC_JSON_SIZE / MiB + 64


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                                  tarfile.GNUTYPE_LONGLINK, tarfile.XGLTYPE])
def test_gzip_bomb_in_an_extended_header_before_the_toc_is_refused_in_bounded_memory(
        layout, tmp_path, kind):
    # tarfile reads such a record whole, whatever size the header claims.
    blob = layout.blob(toc_member=gzip_bomb(special_header(kind, GiB), GiB))
    refused(blob, TOCError, f"extended header record of {GiB} bytes exceeds the "
                            "1048576-byte limit")
    assert_refused_in_bounded_memory(write(tmp_path, blob), "extended header record")


def test_gzip_bomb_in_an_extended_header_in_the_body_is_refused_by_verify(layout, tmp_path):
    # A PAX header claiming (and holding) 1 GiB goes in front of etc/small's.
    k, old, _ = header_span(layout, "etc/small")
    data = layout.unpacked(k)
    at = data.index(old)
    layout.members[k] = gzip_bomb(data[:at] + special_header(tarfile.XHDTYPE, GiB), GiB,
                                  data[at:])
    blob = layout.blob()
    LayerReader(BytesSource(blob))  # the TOC itself is fine
    with pytest.raises(InvalidBlob, match="extended header record of"):
        verify_blob(BytesSource(blob))
    assert_refused_in_bounded_memory(write(tmp_path, blob), "extended header record",
                                     commands=("verify",))


def test_gzip_bomb_in_a_sparse_map_is_refused_in_bounded_memory(layout, tmp_path):
    # A PAX 1.0 sparse file's map is read line by line from its data.
    pax = pax_header({"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                      "GNU.sparse.name": estargz.TOC_TAR_NAME,
                      "GNU.sparse.realsize": "10"})
    header = toc_tar(b"", size=GiB)[:512]
    lines = (b"123456789012\n" * (MiB // 13 + 1))[:MiB]
    blob = layout.blob(toc_member=gzip_bomb(pax + header + b"99999999999999\n", GiB // 4,
                                            fill=lines))
    refused(blob, TOCError, "more than 4194304 bytes of header data")
    assert_refused_in_bounded_memory(write(tmp_path, blob), "bytes of header data",
                                     commands=("ls",))


def test_run_of_extended_headers_is_refused_not_a_recursion_error(layout):
    headers = b"".join(pax_header({"comment": str(i)}) for i in range(3000))
    toc_json = dump_toc(layout.fixed_toc())
    blob = layout.blob(toc_member=gzip_member(headers + toc_tar(toc_json)))
    refused(blob, TOCError, "too many extended headers in a row")


def test_gzip_bomb_after_the_toc_json_is_refused_by_verify_in_bounded_memory(layout, tmp_path):
    toc_json = dump_toc(layout.fixed_toc())
    member = gzip_bomb(toc_tar(toc_json), GiB)
    blob = layout.blob(toc_member=member)
    with pytest.raises(TOCError, match="data follows the TOC entry"):
        verify_blob(BytesSource(blob))
    run = run_measured("layer", "verify", write(tmp_path, blob))
    assert_clean_failure(run, "data follows the TOC entry")
    assert run.rss_mib < RSS_LIMIT_MIB


def test_run_of_200k_empty_gzip_members_is_verified_in_constant_memory(seed, layout):
    # Every member start used to be recorded (and each cost a copy of the
    # rest of the read buffer) although only those the TOC names matter.
    members = verify_blob(BytesSource(seed)).gzip_members
    layout.members[4] += gzip_member(b"") * 200_000  # 4 MB of nothing
    blob = layout.blob()
    tracemalloc.start()
    try:
        report = verify_blob(BytesSource(blob))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.gzip_members == members + 200_000
    assert peak < 8 * MiB


# --- tar headers a clock or a size cannot hold --------------------------------

@pytest.mark.parametrize("mtime", ["nan", "inf", "-inf", "1e400", "1e300", "-1e30"])
def test_unrepresentable_pax_mtime_is_an_invalid_header_not_a_crash(layout, mtime):
    _, _, ti = header_span(layout, "etc/small")
    ti.pax_headers = {"mtime": mtime}
    replace_header(layout, "etc/small", ti.tobuf(tarfile.PAX_FORMAT))
    with pytest.raises(InvalidBlob, match=r"invalid tar header at offset \d+ \('etc/small'\): "
                                          f"PAX mtime '{mtime}' is not a time in seconds"):
        verify_blob(BytesSource(layout.blob()))


def test_negative_pax_size_is_refused(layout):
    _, _, ti = header_span(layout, "etc/small")
    ti.pax_headers = {"size": "-1024"}
    replace_header(layout, "etc/small", ti.tobuf(tarfile.PAX_FORMAT))
    with pytest.raises(InvalidBlob, match="PAX size '-1024' is not a non-negative integer"):
        verify_blob(BytesSource(layout.blob()))
    toc_json = dump_toc(layout.fixed_toc())
    member = gzip_member(pax_header({"size": "-5"}) + toc_tar(toc_json))
    refused(layout.blob(toc_member=member), TOCError,
            "'stargz.index.json'.*PAX size '-5' is not a non-negative integer")


# --- what only `verify` sees ------------------------------------------------

def test_verify_names_the_file_whose_data_has_a_flipped_byte(layout, tmp_path):
    k = layout.member_of("etc/larger", chunk=2)
    layout.edit_member(k, lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:])
    blob = layout.blob()
    offset = [e for e in layout.fixed_toc()["entries"] if e["name"] == "etc/larger"][2]["offset"]
    LayerReader(BytesSource(blob))  # the TOC is intact
    with pytest.raises(DigestMismatch, match="chunk does not match its chunkDigest "
                                             rf"\(entry 'etc/larger', offset {offset}\)"):
        verify_blob(BytesSource(blob))
    path = write(tmp_path, blob)
    assert_clean_failure(run_measured("layer", "verify", path),
                         "chunk does not match its chunkDigest", "'etc/larger'")
    assert_clean_failure(run_measured("layer", "extract", path, "etc/larger"),
                         "chunk does not match its chunkDigest", "'etc/larger'")
    assert run_measured("layer", "extract", path, "etc/small").code == 0


def test_verify_names_the_member_whose_compressed_bytes_have_a_flipped_byte(layout):
    k = layout.member_of("etc/larger", chunk=1)
    member = bytearray(layout.members[k])
    member[len(member) // 2] ^= 0x10
    layout.members[k] = bytes(member)
    with pytest.raises(InvalidBlob, match="invalid gzip data"):
        verify_blob(BytesSource(layout.blob()))


def test_verify_checks_the_toc_digest_it_is_given(seed, tmp_path):
    actual = "sha256:" + hashlib.sha256(LayerReader(BytesSource(seed)).toc_json).hexdigest()
    with pytest.raises(DigestMismatch, match=f"TOC digest is {actual}, expected {D0}"):
        verify_blob(BytesSource(seed), D0)
    path = write(tmp_path, seed)
    assert_clean_failure(run_measured("layer", "verify", path, "--toc-digest", D0),
                         f"TOC digest is {actual}, expected {D0}")
    assert run_measured("layer", "verify", path, "--toc-digest", actual).code == 0


@pytest.mark.parametrize("name, field, value, message", [
    ("etc/small", "mode", 0o644, "mode: 384 vs 420"),
    ("etc/small", "uid", 0, "uid: 1000 vs 0"),
    ("etc/small", "userName", "mallory", "userName: 'alice' vs 'mallory'"),
    ("etc/small", "modtime", "2000-01-01T00:00:00Z", "modtime"),
    ("etc/symlink", "linkName", "elsewhere", "linkName: 'small' vs 'elsewhere'"),
    ("dev/null", "devMinor", 5, "devMinor: 3 vs 5"),
    ("dev/fifo", "type", "dir", "type: 'fifo' vs 'dir'"),
    ("etc/xattr", "xattrs", {"user.comment": "aGk="}, "xattrs"),
])
def test_verify_catches_a_toc_that_disagrees_with_the_tar_headers(layout, tmp_path, name,
                                                                  field, value, message):
    # The TOC is consistent in itself, so reading it does not notice.
    toc = layout.fixed_toc()
    next(e for e in toc["entries"] if e["name"] == name)[field] = value
    blob = layout.blob(toc=toc)
    read_everything(blob)
    with pytest.raises(InvalidBlob, match=rf"tar header and TOC disagree on {message}.*"
                                          rf"\(entry '{name}'"):
        verify_blob(BytesSource(blob))
    if field == "mode":
        path = write(tmp_path, blob)
        assert_clean_failure(run_measured("layer", "verify", path),
                             "tar header and TOC disagree on mode", f"'{name}'")


@pytest.mark.parametrize("garbage, message", [
    (b"garbage", "invalid gzip data"),
    (b"\x00" * 64, "invalid gzip data"),
    (gzip_member(b"junk"), "bytes follow the TOC JSON in its tar entry"),
    (gzip_member(bytes(512)), "data follows the TOC entry"),
], ids=["raw bytes", "zeros", "member of text", "member of a zero block"])
def test_verify_refuses_garbage_between_the_toc_and_the_footer(layout, tmp_path, garbage,
                                                                message):
    blob = layout.blob(after_toc=garbage)
    with pytest.raises(TOCError, match=message):
        verify_blob(BytesSource(blob))
    assert_clean_failure(run_measured("layer", "verify", write(tmp_path, blob)), message)


def test_verify_accepts_an_empty_gzip_member_between_the_toc_and_the_footer(seed, layout):
    # It adds no byte to the tar stream, so every reader sees the same layer.
    members = verify_blob(BytesSource(seed)).gzip_members
    blob = layout.blob(after_toc=gzip_member(b""))
    assert verify_blob(BytesSource(blob)).gzip_members == members + 1


# --- every command, one line ----------------------------------------------------

def _cases(seed: bytes) -> dict[str, tuple[bytes, set[str]]]:
    """Hostile blobs and the commands that must refuse them (the others read
    only the footer and the TOC, which are intact, and must succeed)."""
    layout = Layout.of(seed)
    flipped = Layout.of(seed)
    k = flipped.member_of("etc/small")
    flipped.edit_member(k, lambda d: bytes([d[0] ^ 1]) + d[1:])
    huge = Layout.of(seed)
    toc = huge.fixed_toc()
    next(e for e in toc["entries"] if e["name"] == "etc/small")["size"] = 2 << 40
    everything = {"verify", "ls", "toc", "extract"}
    return {
        "random": (random.Random(1).randbytes(5000), everything),
        "half": (seed[:len(seed) // 2], everything),
        "footer past the end": (seed[:-FOOTER_SIZE] + estargz.footer_bytes(10**9), everything),
        "toc not json": (layout.blob(toc_json=b"{nope"), everything),
        "flipped data": (flipped.blob(), {"verify", "extract"}),
        "terabyte file": (huge.blob(toc=toc), {"verify", "extract"}),
    }


@pytest.mark.parametrize("case", ["random", "half", "footer past the end", "toc not json",
                                  "flipped data", "terabyte file"])
def test_every_command_reports_a_hostile_blob_in_one_line(seed, tmp_path, case):
    blob, refusing = _cases(seed)[case]
    path = write(tmp_path, blob)
    for cmd in ("verify", "ls", "toc", "extract"):
        args = ["layer", cmd, path] + (["etc/small"] if cmd == "extract" else [])
        run = run_measured(*args)
        if cmd in refusing:
            assert_clean_failure(run)
        else:
            assert (run.code, run.err) == (0, ""), (cmd, run.err)
