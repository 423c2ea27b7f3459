"""`estargz layer convert`: the blob layout, every entry kind, ordering, options.

Layout checks here use plain zlib and tarfile, not our reader, so they do not
trust the code under test to judge itself.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest
import zstandard

import estargz
from conftest import CHUNK, Spec, build_tar, every_kind_specs, member_data, pattern, write
from estargz import clean_name


def member_starts(blob: bytes) -> list[int]:
    """Compressed offsets of every gzip member, found with zlib alone."""
    starts, pos = [], 0
    while pos < len(blob):
        starts.append(pos)
        d = zlib.decompressobj(31)
        d.decompress(blob[pos:])
        assert d.eof, f"gzip member at {pos} is truncated"
        pos = len(blob) - len(d.unused_data)
    return starts


def toc_of(blob: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tf:
        last = tf.getmembers()[-1]
        assert last.name == "stargz.index.json"
        return json.loads(member_data(tf, last))


def convert(tmp_path: Path, tar: bytes, **opts) -> tuple[bytes, estargz.LayerResult]:
    src = write(tmp_path / "in.tar", tar)
    dst = tmp_path / "out.esgz"
    result = estargz.convert_layer(str(src), str(dst), estargz.ConvertOptions(**opts))
    return dst.read_bytes(), result


def test_every_payload_chunk_toc_and_footer_start_a_gzip_member(tmp_path):
    blob, result = convert(tmp_path, build_tar(every_kind_specs()), chunk_size=CHUNK)
    starts = set(member_starts(blob))
    toc = toc_of(blob)
    data_offsets = [e["offset"] for e in toc["entries"]
                    if e["type"] == "chunk" or (e["type"] == "reg" and e.get("size"))]
    assert 0 in starts
    assert data_offsets and set(data_offsets) <= starts
    toc_offset, footer_size = estargz.parse_footer(blob[-51:])
    assert footer_size == 51 and toc_offset in starts
    assert len(blob) - 51 in starts
    # Each payload member begins with exactly that chunk's bytes.
    contents = {s.name: s.data for s in every_kind_specs()}
    contents[".no.prefetch.landmark"] = b"\x0f"
    for e in toc["entries"]:
        if e["type"] in ("reg", "chunk") and e.get("offset"):
            d = zlib.decompressobj(31)
            out = d.decompress(blob[e["offset"]:])
            size = e.get("chunkSize") or (len(contents[e["name"]]) - e.get("chunkOffset", 0))
            want = contents[e["name"]][e.get("chunkOffset", 0):][:size]
            assert out[:size] == want
            assert e["chunkDigest"] == "sha256:" + hashlib.sha256(want).hexdigest()


def test_result_digests_describe_the_blob(tmp_path):
    blob, r = convert(tmp_path, build_tar(every_kind_specs()), chunk_size=CHUNK)
    plain = gzip.decompress(blob)
    assert r.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert r.blob_size == len(blob)
    assert r.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert r.uncompressed_size == len(plain)
    with tarfile.open(fileobj=io.BytesIO(plain)) as tf:
        toc_bytes = tf.extractfile("stargz.index.json").read()
    assert r.toc_digest == "sha256:" + hashlib.sha256(toc_bytes).hexdigest()


def test_toc_has_one_entry_per_tar_entry_and_chunk_with_reference_fields(tmp_path):
    specs = every_kind_specs()
    blob, _ = convert(tmp_path, build_tar(specs), chunk_size=CHUNK)
    toc = toc_of(blob)
    assert toc["version"] == 1
    entries = [e for e in toc["entries"] if e["type"] != "chunk"]
    assert entries[0]["name"] == ".no.prefetch.landmark"
    names = [clean_name(e["name"]) for e in entries[1:]]
    assert names == [clean_name(s.name) for s in specs]
    by = {clean_name(e["name"]): e for e in entries}
    chunks = [e for e in toc["entries"] if e["type"] == "chunk"]
    # multiple = 3 chunks, larger = 6 chunks: 2 + 5 chunk entries after the reg ones
    assert sum(1 for c in chunks if c["name"] == "etc/multiple") == 2
    assert sum(1 for c in chunks if c["name"] == "etc/larger") == 5
    small = by["etc/small"]
    assert small == {**small, "type": "reg", "size": 13, "mode": 0o600, "uid": 1000,
                     "gid": 1000, "userName": "alice", "groupName": "staff",
                     "modtime": "2023-11-14T22:13:20Z",
                     "digest": "sha256:" + hashlib.sha256(b"hello, world\n").hexdigest()}
    assert "chunkSize" not in small  # a short single chunk, as the reference writes
    assert by["etc/exact"]["chunkSize"] == CHUNK
    assert by["etc/empty"]["digest"] == "sha256:" + hashlib.sha256(b"").hexdigest()
    assert "offset" not in by["etc/empty"] and "chunkDigest" not in by["etc/empty"]
    assert by["etc/symlink"]["linkName"] == "small"
    assert by["etc/hardlink"] == {**by["etc/hardlink"], "type": "hardlink",
                                  "linkName": "etc/small"}
    assert (by["dev/null"]["devMajor"], by["dev/null"]["devMinor"]) == (1, 3)
    assert by["dev/loop0"]["type"] == "block" and by["dev/fifo"]["type"] == "fifo"
    assert by["etc/xattr"]["xattrs"] == {"security.capability": "AQAAAv8=",
                                          "user.comment": "aGk="}
    assert (by["etc/bigid"]["uid"], by["etc/bigid"]["gid"]) == (3_000_000, 4_000_000)
    assert by["etc/ünïcødé-名前"]["userName"] == "ユーザー"
    assert "modtime" not in by["etc/old-mtime"]
    assert by["etc/fraction"]["modtime"] == "2020-09-13T12:26:41Z"  # rounded up


def test_gnu_long_names_and_pax_global_headers_are_carried(tmp_path):
    long = "d/" + "n" * 150
    gnu = build_tar([Spec("d/", tarfile.DIRTYPE), Spec(long, data=b"gnu"),
                     Spec("d/l", tarfile.SYMTYPE, linkname="t" * 120)], fmt=tarfile.GNU_FORMAT)
    blob, _ = convert(tmp_path, gnu)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tf:
        assert tf.extractfile(long).read() == b"gnu"
        assert tf.getmember("d/l").linkname == "t" * 120
    glob = build_tar([Spec("a", data=b"x")], pax_global={"comment": "git archive id"})
    blob, _ = convert(tmp_path, glob)
    toc = toc_of(blob)
    assert [e["name"] for e in toc["entries"]] == [".no.prefetch.landmark", "a"]
    # A PAX global header alone (an empty archive as Python writes it).
    blob, _ = convert(tmp_path, build_tar([], pax_global={"comment": "x"}))
    assert [e["name"] for e in toc_of(blob)["entries"]] == [".no.prefetch.landmark"]


def test_sparse_files_become_regular_files(tmp_path):
    root = tmp_path / "sparse"
    root.mkdir()
    with open(root / "holes", "wb") as f:
        f.write(b"head")
        f.seek(3 * 65536)
        f.write(b"middle")
        f.seek(8 * 65536 - 4)
        f.write(b"tail")
    expected = (root / "holes").read_bytes()
    for fmt in ("gnu", "posix"):
        tar = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", "--sparse", f"--format={fmt}", "-C", root, "-cf", tar, "holes"],
                       check=True)
        dst = tmp_path / f"{fmt}.esgz"
        estargz.convert_layer(str(tar), str(dst), estargz.ConvertOptions(chunk_size=65536))
        with tarfile.open(dst) as tf:
            m = tf.getmember("holes")
            assert m.type == tarfile.REGTYPE and m.size == len(expected)
            assert tf.extractfile(m).read() == expected
        estargz.verify_blob(estargz.FileSource(str(dst)))


def test_repeated_name_keeps_the_later_entry_in_its_place(tmp_path):
    tar = build_tar([Spec("a", data=b"first"), Spec("b", data=b"b"), Spec("a", data=b"second")])
    blob, _ = convert(tmp_path, tar)
    toc = toc_of(blob)
    assert [e["name"] for e in toc["entries"]] == [".no.prefetch.landmark", "b", "a"]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tf:
        assert tf.extractfile("a").read() == b"second"


def test_converting_an_estargz_layer_replaces_toc_and_landmarks(tmp_path):
    first, _ = convert(tmp_path, build_tar(every_kind_specs()), chunk_size=CHUNK)
    again_src = write(tmp_path / "again.in", first)
    plist = write(tmp_path / "list", b"etc/small\n")
    out = tmp_path / "again.esgz"
    estargz.convert_layer(str(again_src), str(out),
                          estargz.ConvertOptions(chunk_size=CHUNK, prioritized_files=["etc/small"]))
    toc = toc_of(out.read_bytes())
    names = [e["name"] for e in toc["entries"] if e["type"] != "chunk"]
    assert names.count("stargz.index.json") == 0
    assert ".no.prefetch.landmark" not in names
    assert names[:4] == ["./", "etc/", "etc/small", ".prefetch.landmark"]
    assert plist.exists()


@pytest.mark.parametrize("compress", ["gzip", "zstd", "zstd-frames", "stdin"])
def test_input_compression_is_detected_by_content(tmp_path, compress, cli):
    tar = build_tar(every_kind_specs())
    reference, _ = convert(tmp_path, tar, chunk_size=CHUNK)
    if compress == "gzip":
        data = gzip.compress(tar[:5000]) + gzip.compress(tar[5000:])  # two members
    elif compress == "zstd":
        data = zstandard.ZstdCompressor().compress(tar)
    elif compress == "zstd-frames":
        c = zstandard.ZstdCompressor()
        data = c.compress(tar[:7000]) + c.compress(tar[7000:])
    else:
        data = tar
    src = write(tmp_path / "layer.bin", data)  # a name that says nothing
    out = tmp_path / "o.esgz"
    if compress == "stdin":
        r = cli("layer", "convert", "-", out, "--chunk-size", CHUNK, "--json", stdin=data)
    else:
        r = cli("layer", "convert", src, out, "--chunk-size", CHUNK, "--json")
    assert r.code == 0, r.err
    assert out.read_bytes() == reference
    assert r.json()["blob_digest"] == "sha256:" + hashlib.sha256(reference).hexdigest()


def test_output_is_identical_for_any_worker_count(tmp_path):
    specs = every_kind_specs() + [Spec(f"many/f{i}", data=pattern(i * 37, i)) for i in range(300)]
    tar = build_tar(specs)
    outs = {convert(tmp_path, tar, chunk_size=CHUNK, workers=w)[0] for w in (1, 2, 3, 8)}
    assert len(outs) == 1


def test_prioritized_files_come_first_with_parents_and_hardlink_targets(tmp_path):
    specs = every_kind_specs()
    order = ["/etc/hardlink", "./dev/null", "etc/larger"]
    blob, r = convert(tmp_path, build_tar(specs), chunk_size=CHUNK, prioritized_files=order)
    names = [clean_name(e["name"]) for e in toc_of(blob)["entries"] if e["type"] != "chunk"]
    assert names[:8] == ["", "etc", "etc/small", "etc/hardlink", "dev", "dev/null",
                         "etc/larger", ".prefetch.landmark"]
    assert r.prioritized == 7
    assert sorted(names) == sorted([".prefetch.landmark"] + [clean_name(s.name) for s in specs])


def test_prioritized_path_through_a_symlink_resolves_to_its_target(tmp_path):
    # A usr-merged layout: bin -> usr/bin, and bin/sh -> dash.
    tar = build_tar([Spec("usr/", tarfile.DIRTYPE), Spec("usr/bin/", tarfile.DIRTYPE),
                     Spec("bin", tarfile.SYMTYPE, linkname="usr/bin"),
                     Spec("usr/bin/dash", data=b"#!dash"),
                     Spec("usr/bin/sh", tarfile.SYMTYPE, linkname="dash"),
                     Spec("usr/bin/other", data=b"o")])
    blob, _ = convert(tmp_path, tar, prioritized_files=["bin/sh"])
    names = [e["name"] for e in toc_of(blob)["entries"]]
    assert names == ["bin", "usr/", "usr/bin/", "usr/bin/sh", "usr/bin/dash",
                     ".prefetch.landmark", "usr/bin/other"]


def test_layer_without_parent_directories_invents_none(tmp_path):
    # Diff layers made by umoci omit unchanged parents; the reference fails here.
    tar = build_tar([Spec("usr/lib/x/a.so", data=b"a"), Spec("usr/lib/x/b.so", data=b"b")])
    blob, _ = convert(tmp_path, tar, prioritized_files=["usr/lib/x/b.so"])
    names = [e["name"] for e in toc_of(blob)["entries"]]
    assert names == ["usr/lib/x/b.so", ".prefetch.landmark", "usr/lib/x/a.so"]


def test_missing_prioritized_files_fail_unless_allowed(tmp_path, cli):
    src = write(tmp_path / "in.tar", build_tar(every_kind_specs()))
    plist = write(tmp_path / "list", b"# comment\netc/small\n/not/here\n\nalso-missing\n")
    out = tmp_path / "out.esgz"
    r = cli("layer", "convert", src, out, "--prioritized-files", plist)
    assert r.code == 1
    assert r.err.strip() == ("estargz: error: prioritized file not in the layer: "
                             "'/not/here', 'also-missing' (use --allow-missing to skip "
                             "missing files)")
    assert not out.exists()
    r = cli("layer", "convert", src, out, "--prioritized-files", plist, "--allow-missing",
            "--json")
    assert r.code == 0
    assert "warning: prioritized files not in the layer: /not/here, also-missing" in r.err
    assert r.json()["missing"] == ["/not/here", "also-missing"]
    names = [e["name"] for e in toc_of(out.read_bytes())["entries"]]
    assert names[:4] == ["./", "etc/", "etc/small", ".prefetch.landmark"]


def test_empty_layer_holds_only_the_landmark(tmp_path):
    for data in (b"", bytes(1024)):
        blob, r = convert(tmp_path, data)
        assert [e["name"] for e in toc_of(blob)["entries"]] == [".no.prefetch.landmark"]
        assert r.entries == 0


@pytest.mark.parametrize("tar_bytes, message", [
    (build_tar([Spec("vol", b"V")]), "'vol': unsupported tar entry type b'V'"),
    (b"\x00" * 100 + b"garbage" * 100, "invalid tar header at offset 0"),
    (build_tar([Spec("f", data=b"x" * 5000)])[:2048], "input tar is truncated in the data of 'f'"),
    (b"BZh91AY&SY" + b"\x00" * 600, "bzip2-compressed layers are not supported"),
])
def test_bad_input_is_one_clear_line(tmp_path, cli, tar_bytes, message):
    src = write(tmp_path / "bad", tar_bytes)
    out = tmp_path / "out.esgz"
    r = cli("layer", "convert", src, out)
    assert r.code == 1
    assert r.err.count("\n") == 1 and "Traceback" not in r.err
    assert message in r.err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]  # no temporary left behind


def test_non_utf8_name_is_rejected_naming_the_entry(tmp_path, cli):
    ti = tarfile.TarInfo("caf\udce9")  # a Latin-1 byte, as old tars store names
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tf:
        tf.addfile(ti, io.BytesIO(b""))
    src = write(tmp_path / "in.tar", buf.getvalue())
    r = cli("layer", "convert", src, tmp_path / "o")
    assert r.code == 1
    assert r.err.strip() == "estargz: error: 'caf\\xe9': name is not valid UTF-8"


def test_compression_level_and_chunk_size_options(tmp_path, cli):
    src = write(tmp_path / "in.tar", build_tar([Spec("f", data=pattern(20000))]))
    sizes = {}
    for level in (0, 1, 9):
        out = tmp_path / f"l{level}"
        r = cli("layer", "convert", src, out, "--compression-level", level,
                "--chunk-size", 4096, "--workers", 2, "--json")
        assert r.code == 0, r.err
        sizes[level] = r.json()["blob_size"]
        toc = toc_of(out.read_bytes())
        assert sum(1 for e in toc["entries"] if e["name"] == "f") == 5  # 20000 / 4096
    assert sizes[0] > sizes[1] > sizes[9]
    r = cli("layer", "convert", src, tmp_path / "x", "--compression-level", 10)
    assert r.code == 2 and "--compression-level" in r.err
    r = cli("layer", "convert", src, tmp_path / "x", "--chunk-size", 0)
    assert r.code == 2


def test_cli_prints_what_a_manifest_needs(tmp_path, cli):
    src = write(tmp_path / "in.tar", build_tar(every_kind_specs()))
    out = tmp_path / "out.esgz"
    r = cli("layer", "convert", src, out, "--json")
    assert r.code == 0
    j = r.json()
    blob = out.read_bytes()
    assert j["blob_digest"] == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert j["blob_size"] == len(blob)
    assert j["diff_id"] == "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    assert j["uncompressed_size"] == len(gzip.decompress(blob))
    human = cli("layer", "convert", src, out)
    for label, key in (("blob digest:", "blob_digest"), ("diff id:", "diff_id"),
                       ("TOC digest:", "toc_digest"), ("blob size:", "blob_size"),
                       ("uncompressed size:", "uncompressed_size")):
        line = next(item for item in human.out.splitlines() if item.startswith(label))
        assert line.split()[-1] == str(j[key])
    assert cli("layer", "convert", src, out, "-q").out == ""
