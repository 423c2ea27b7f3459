"""Reading a blob by ranges: `layer toc`, `layer ls`, `layer extract`."""

from __future__ import annotations

import hashlib
import json
import tarfile

import pytest

import estargz
from conftest import CHUNK, Spec, build_tar, every_kind_specs, pattern, write
from estargz import FOOTER_SIZE


@pytest.fixture
def blob(tmp_path):
    specs = every_kind_specs() + [Spec("big", data=pattern(50 * CHUNK + 3, 7))]
    src = write(tmp_path / "in.tar", build_tar(specs))
    out = tmp_path / "out.esgz"
    result = estargz.convert_layer(str(src), str(out), estargz.ConvertOptions(chunk_size=CHUNK))
    return out, result, {s.name: s.data for s in specs}


def test_extract_reads_only_footer_toc_and_the_files_chunks(blob):
    path, result, contents = blob
    data = path.read_bytes()
    counting = estargz.CountingSource(estargz.BytesSource(data))
    reader = estargz.LayerReader(counting)
    toc_offset = reader.toc_offset
    allowed = [(len(data) - FOOTER_SIZE, len(data)), (toc_offset, len(data) - FOOTER_SIZE)]
    assert sum(n for _, n in counting.reads) == len(data) - toc_offset
    counting.reads.clear()
    got = b"".join(reader.iter_file("/etc/multiple"))
    assert got == contents["etc/multiple"]
    chunks = reader.chunks("etc/multiple")
    assert len(chunks) == 3
    ranges = [(c.offset, nxt) for c, _, nxt in chunks]
    for off, n in counting.reads:
        assert any(a <= off and off + n <= b for a, b in ranges), (off, n)
    assert counting.bytes_read <= sum(b - a for a, b in ranges)
    # The whole blob is many times what was read.
    assert counting.bytes_read * 20 < len(data)
    assert all(a <= o < b for o, _ in [(toc_offset, 0)] for a, b in allowed[1:])


def test_extract_follows_hardlinks_and_reads_big_files(blob, cli, tmp_path):
    path, _, contents = blob
    r = cli("layer", "extract", path, "etc/hardlink")
    assert r.code == 0 and r.out == "hello, world\n"
    out = tmp_path / "big.out"
    r = cli("layer", "extract", path, "./big", "-o", out)
    assert r.code == 0 and r.out == ""
    assert out.read_bytes() == contents["big"]
    r = cli("layer", "extract", path, "etc/empty")
    assert r.code == 0 and r.out == ""


@pytest.mark.parametrize("name, message", [
    ("nope", "estargz: error: 'nope' is not in the layer"),
    ("etc", "estargz: error: 'etc' is not a regular file"),
])
def test_extract_of_a_missing_or_non_file_path_fails(blob, cli, tmp_path, name, message):
    path, _, _ = blob
    out = tmp_path / "x"
    r = cli("layer", "extract", path, name, "-o", out)
    assert (r.code, r.err.strip()) == (1, message)
    assert not out.exists()


def test_extract_refuses_a_corrupted_chunk_and_writes_nothing(cli, tmp_path):
    content = pattern(20 * CHUNK, 5)
    src = write(tmp_path / "in.tar", build_tar([Spec("big", data=content)]))
    path = tmp_path / "stored.esgz"
    # Level 0 stores bytes as they are, so one can be changed in place.
    estargz.convert_layer(str(src), str(path),
                          estargz.ConvertOptions(chunk_size=CHUNK, compression_level=0))
    data = bytearray(path.read_bytes())
    reader = estargz.LayerReader(estargz.BytesSource(bytes(data)))
    c, _, _ = reader.chunks("big")[10]
    gzip_header, stored_block_header = 10, 5
    at = c.offset + gzip_header + stored_block_header + 100
    assert data[at] == content[10 * CHUNK + 100]
    data[at] ^= 0xFF
    bad = write(tmp_path / "bad.esgz", bytes(data))
    out = tmp_path / "x"
    r = cli("layer", "extract", bad, "big", "-o", out)
    assert r.code == 1
    # Caught by the chunk digest, or earlier by the gzip member's CRC.
    assert r.err.strip() in (
        f"estargz: error: chunk does not match its chunkDigest (entry 'big', offset {c.offset})",
        "estargz: error: invalid gzip data: Error -3 while decompressing data: incorrect data "
        f"check (entry 'big', offset {c.offset})")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in.tar", "stored.esgz", "bad.esgz"]
    r = cli("layer", "extract", bad, "big")
    assert r.code == 1 and r.out == ""  # nothing unverified reaches stdout


def test_toc_prints_the_exact_json_and_its_digest(blob, cli):
    path, result, _ = blob
    r = cli("layer", "toc", path)
    assert r.code == 0
    assert "sha256:" + hashlib.sha256(r.out.encode()[:-1]).hexdigest() == result.toc_digest
    with tarfile.open(path) as tf:
        assert tf.extractfile("stargz.index.json").read() + b"\n" == r.out.encode()
    r = cli("layer", "toc", path, "--digest")
    assert (r.code, r.out) == (0, result.toc_digest + "\n")


def test_ls_lists_every_entry(blob, cli):
    path, _, contents = blob
    r = cli("layer", "ls", path)
    assert r.code == 0
    lines = r.out.splitlines()
    assert len(lines) == len(every_kind_specs()) + 2  # + big + landmark
    assert any(item.startswith("lrwxrwxrwx") and item.endswith("etc/symlink -> small")
               for item in lines)
    assert any(item.startswith("crw-rw-rw-") and item.endswith("dev/null") for item in lines)
    assert any(item.startswith("-rw------- 1000/1000         13 2023-11-14T22:13:20Z etc/small")
               for item in lines)
    r = cli("layer", "ls", path, "--json")
    recs = [json.loads(item) for item in r.out.splitlines()]
    assert {"name": "etc/small", "type": "reg", "size": 13} .items() <= recs[4].items()


def test_reader_accepts_the_legacy_47_byte_footer(blob):
    path, result, contents = blob
    data = path.read_bytes()
    toc_offset, _ = estargz.parse_footer(data[-FOOTER_SIZE:])
    payload = b"%016xSTARGZ" % toc_offset
    legacy = (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + len(payload).to_bytes(2, "little")
              + payload + b"\x01\x00\x00\xff\xff" + bytes(8))
    assert len(legacy) == 47
    old = data[:-FOOTER_SIZE] + legacy
    assert estargz.parse_footer(old[-FOOTER_SIZE:]) == (toc_offset, 47)
    reader = estargz.LayerReader(estargz.BytesSource(old))
    assert reader.toc_digest == result.toc_digest
    assert b"".join(reader.iter_file("etc/larger")) == contents["etc/larger"]
    estargz.verify_blob(estargz.BytesSource(old), result.toc_digest)
