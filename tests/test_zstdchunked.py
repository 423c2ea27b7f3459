"""zstd:chunked: our blobs against the reference's newest readers and plain
consumers, the reference's blobs against ours, and hostile blobs.

The reference is tests/interop/goref-v018's ``verify-zstdchunked`` and
``convert-zstdchunked`` (stargz-snapshotter's estargz v0.18.x with its
``zstdchunked`` decompressor and compressor, and tar-split's own ``asm``
package to rebuild the layer as containers/storage does from the tar-split
data); see docs/format.md for the layout.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard

import estargz
from conftest import CHUNK, Spec, build_tar, every_kind_specs, pattern, run_cli, write
from daemons import build_images
from estargz import BytesSource, EstargzError, FileSource
from estargz.cli.base import MIN_CHUNK_SIZE
from estargz.layer import zstdchunked as zc
from estargz.layer.zstdreader import open_layer, verify_layer
from gobuild import build_go
from test_interop import CASES, expected_entries


def convert(tmp_path: Path, tar: bytes | Path, *args: str) -> tuple[Path, Path, dict]:
    src = tar if isinstance(tar, Path) else write(tmp_path / "in.tar", tar)
    out = tmp_path / "out.zst"
    if args[:1] == ("--chunk-size",) and int(args[1]) < MIN_CHUNK_SIZE:
        # Below the CLI's floor: the library still takes it.
        return src, out, estargz.convert_layer(str(src), str(out), estargz.ConvertOptions(
            chunk_size=int(args[1]), format="zstd:chunked")).to_dict()
    r = run_cli("layer", "convert", src, out, "--zstdchunked", "--json", *args)
    assert r.code == 0, r.err
    return src, out, r.json()


def reference_verifies(goref_v018: Path, blob: Path, result: dict) -> dict:
    p = subprocess.run([goref_v018, "verify-zstdchunked", blob, result["toc_digest"],
                        result["annotations"][zc.TARSPLIT_POSITION], result["diff_id"]],
                       capture_output=True, text=True)
    assert p.returncode == 0, f"reference rejected our blob: {p.stderr}"
    return json.loads(p.stdout)


def plain_tree(blob: Path) -> dict[str, tuple]:
    """What `zstd -dc | tar` sees: name -> (type, size, sha256, link)."""
    p = subprocess.run(["zstd", "-dc", blob], capture_output=True, check=True)
    out = {}
    with tarfile.open(fileobj=io.BytesIO(p.stdout)) as tf:
        for m in tf:
            f = tf.extractfile(m) if m.isreg() else None
            data = f.read() if f is not None else b""
            out[m.name.rstrip("/")] = (m.type, m.size if m.isreg() else 0,
                                       hashlib.sha256(data).hexdigest(), m.linkname)
    return out


@pytest.mark.parametrize("case", CASES)
def test_reference_and_plain_zstd_read_our_blob(tmp_path, goref_v018, case):
    specs, args = CASES[case]
    src, out, result = convert(tmp_path, build_tar(specs), *args)
    ann = result["annotations"]
    assert zc.MANIFEST_CHECKSUM in ann and zc.TARSPLIT_POSITION in ann
    assert estargz.TOC_DIGEST_ANNOTATION not in ann
    got = reference_verifies(goref_v018, out, result)
    want = expected_entries(src)
    # Hardlinks are read as their target; +1: the landmark.
    assert got["files"] == sum(1 for r in want.values()
                               if r["type"] in ("reg", "hardlink")) + 1
    # The uncompressed stream is a whole tar: GNU tar and zstd read it, and
    # it is what the diff_id says.
    p = subprocess.run(["zstd", "-dc", out], capture_output=True, check=True)
    assert "sha256:" + hashlib.sha256(p.stdout).hexdigest() == result["diff_id"]
    tree = plain_tree(out)
    for name, rec in want.items():
        if rec["type"] == "reg":
            assert tree[name][2] == rec["sha256"], name
    listing = subprocess.run(["tar", "-tf", "-"], input=p.stdout, capture_output=True)
    assert listing.returncode == 0, listing.stderr
    # Our own readers: verify, and every file by range.
    r = run_cli("layer", "verify", out, "--toc-digest", ann[zc.MANIFEST_CHECKSUM], "--json")
    assert r.code == 0, r.err
    with FileSource(str(out)) as source:
        reader = open_layer(source)
        for name, rec in want.items():
            if rec["type"] == "reg":
                data = b"".join(reader.iter_file(name))
                assert hashlib.sha256(data).hexdigest() == rec["sha256"], name


@pytest.fixture(scope="session")
def storage_chunked() -> Path:
    """Current containers/storage's partial-pull applier, built once."""
    return build_go("storage-chunked")


@pytest.mark.skipif(os.geteuid() != 0, reason="containers/storage's overlay driver needs root")
@pytest.mark.parametrize("case", ["every-kind", "one-byte-chunks", "many-files",
                                  "empty-layer"])
def test_current_containers_storage_applies_our_blob_partially(tmp_path, storage_chunked,
                                                                case):
    """go.podman.io/storage's NewDiffer reads our TOC and tar-split by the
    annotations and checks their checksums; PrepareStagedLayer fetches the
    files by range, checks their digests, and rebuilds the tar from the
    tar-split data: its digest must be our diff_id (what podman compares
    with the image config)."""
    specs, args = CASES[case]
    # (every-kind's security.capability value is one the kernel refuses to set)
    specs = [replace(s, pax={k: v for k, v in s.pax.items() if "capability" not in k})
             for s in specs]
    _, out, result = convert(tmp_path, build_tar(specs), *args)
    root = Path(tempfile.mkdtemp(prefix="estargz-cs-", dir="/tmp"))
    try:
        p = subprocess.run([storage_chunked, out, json.dumps(result["annotations"]), root],
                           capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", "-R", "-l", root / "graph" / "overlay"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["uncompressedDigest"] == result["diff_id"]
    assert got["size"] == result["uncompressed_size"]
    assert got["tocDigest"] == result["annotations"][zc.MANIFEST_CHECKSUM]


def test_prioritized_files_come_first_and_the_landmark_marks_them(tmp_path, goref_v018):
    plist = write(tmp_path / "list", b"etc/larger\netc/hardlink\n")
    _, out, result = convert(tmp_path, build_tar(every_kind_specs()), "--chunk-size",
                             str(CHUNK), "--prioritized-files", str(plist))
    reference_verifies(goref_v018, out, result)
    names = [e.name for e in open_layer(FileSource(str(out))).entries if e.type != "chunk"]
    landmark = names.index(".prefetch.landmark")
    assert {"etc/larger", "etc/hardlink"} <= set(names[:landmark])
    assert result["prioritized"] == landmark
    assert 0 < result["prefetch_size"] < result["blob_size"]


def test_output_does_not_depend_on_workers(tmp_path):
    tar = build_tar([Spec(f"f{i}", data=pattern(i * 997, i)) for i in range(60)])
    digests = set()
    for workers in ("1", "3"):
        d = tmp_path / workers
        d.mkdir()
        digests.add(convert(d, tar, "--workers", workers, "--chunk-size", "4096")[2]
                    ["blob_digest"])
    assert len(digests) == 1


def test_debian_rootfs_both_ways(tmp_path, goref_v018, debian_layer):
    _, out, result = convert(tmp_path, debian_layer)
    got = reference_verifies(goref_v018, out, result)
    assert got["files"] > 3000
    ref = tmp_path / "ref.zst"
    p = subprocess.run([goref_v018, "convert-zstdchunked", debian_layer, ref, "3"],
                       capture_output=True, text=True, env={**os.environ, "GOMAXPROCS": "2"})
    assert p.returncode == 0, p.stderr
    built = json.loads(p.stdout)
    r = run_cli("layer", "verify", ref, "--toc-digest", built["tocDigest"], "--json")
    assert r.code == 0, r.err
    assert r.json()["entries"] > 6000
    # Same level as the reference: no larger (docs/benchmarks.md has the numbers).
    assert result["blob_size"] <= built["size"] * 1.001


def test_reference_blobs_read_by_us(tmp_path, goref_v018):
    src = write(tmp_path / "in.tar", build_tar(every_kind_specs(), fmt=tarfile.GNU_FORMAT))
    out = tmp_path / "ref.zst"
    p = subprocess.run([goref_v018, "convert-zstdchunked", src, out, "3", "etc/larger"],
                       capture_output=True, text=True,
                       env={**os.environ, "CHUNK_SIZE": str(CHUNK)})
    assert p.returncode == 0, p.stderr
    built = json.loads(p.stdout)
    r = run_cli("layer", "verify", out, "--toc-digest", built["tocDigest"])
    assert r.code == 0, r.err
    with FileSource(str(out)) as source:
        reader = open_layer(source)
        for name, rec in expected_entries(src).items():
            if rec["type"] == "reg":
                data = b"".join(reader.iter_file(name))
                assert hashlib.sha256(data).hexdigest() == rec["sha256"], name


def test_extract_reads_only_the_footer_toc_and_the_file(tmp_path):
    big = pattern(3 << 20, 5)
    _, out, _ = convert(tmp_path, build_tar([Spec("a", data=big), Spec("b", data=b"small")]))
    source = estargz.CountingSource(FileSource(str(out)))
    reader = open_layer(source)
    assert b"".join(reader.iter_file("b")) == b"small"
    assert source.bytes_read < 4096


def test_bad_combinations_are_one_line_usage_errors(tmp_path):
    src = write(tmp_path / "in.tar", build_tar([Spec("a", data=b"x")]))
    for args, text in [(["--zstdchunked", "--format", "estargz"], "contradicts"),
                       (["--zstdchunked", "--compression-level", "23"], "1-22"),
                       (["--compression-level", "10"], "0-9")]:
        r = run_cli("layer", "convert", src, tmp_path / "o", *args)
        assert r.code == 2 and text in r.err, (args, r.err)
        assert not (tmp_path / "o").exists()
    r = run_cli("convert", "oci:/nonexistent", "oci:/x", "--zstdchunked",
                "--docker-media-types")
    assert r.code == 2 and "OCI media types" in r.err, r.err


# --- hostile blobs -------------------------------------------------------------

def small_blob() -> bytes:
    return estargz_bytes([Spec("d/", tarfile.DIRTYPE), Spec("d/f", data=pattern(5000)),
                          Spec("g", data=b"gg")], chunk_size=1024)


def estargz_bytes(specs: list[Spec], **options) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        src = write(Path(d, "in.tar"), build_tar(specs))
        estargz.convert_layer(str(src), str(Path(d, "out")),
                              estargz.ConvertOptions(format="zstd:chunked", **options))
        return Path(d, "out").read_bytes()


def rebuild(blob: bytes, toc_json: bytes | None = None, tarsplit: bytes | None = None,
            payload: bytes | None = None) -> bytes:
    """``blob`` with its payload frames, TOC JSON or compressed tar-split
    replaced, every position recomputed (and, for a new tar-split, the TOC's
    digest of it)."""
    offset, clen, ulen = _pos(blob)
    if toc_json is None:
        toc_json = zstandard.ZstdDecompressor().decompress(blob[offset:offset + clen],
                                                           max_output_size=ulen)
    if tarsplit is None:
        tarsplit = _tarsplit(blob)
    else:
        toc = json.loads(toc_json)
        toc["tarSplitDigest"] = "sha256:" + hashlib.sha256(tarsplit).hexdigest()
        toc_json = json.dumps(toc).encode()
    body = blob[:offset - 8] if payload is None else payload
    manifest = zstandard.ZstdCompressor().compress(toc_json)
    return (body + zc.skippable_frame(manifest) + zc.skippable_frame(tarsplit)
            + zc.skippable_frame(zc.footer_bytes(len(body) + 8, len(manifest),
                                                 len(toc_json))))


def assert_rejected(blob: bytes, *fragments: str) -> None:
    with pytest.raises(EstargzError) as e:
        verify_layer(BytesSource(blob))
    for f in fragments:
        assert f in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_hostile_blobs_are_one_line_errors():
    blob = small_blob()
    assert verify_layer(BytesSource(blob)).files == 3
    assert verify_layer(BytesSource(rebuild(blob))).files == 3  # the rebuild is faithful
    assert_rejected(blob[:-1], "footer")
    assert_rejected(blob[:-48] + zc.skippable_frame(zc.footer_bytes(10**9, 5, 5)), "outside")
    # A TOC that says more than it holds, and one that is a bomb.
    big = blob[:-48] + zc.skippable_frame(zc.footer_bytes(*_pos(blob)[:2], 1 << 40))
    assert_rejected(big, "limit")
    # A file's data changed behind valid frames: digests catch it.
    source = BytesSource(blob)
    reader = open_layer(source)
    f = reader.lookup("d/f")
    frame = zstandard.ZstdCompressor().compress(b"X" * 1024)
    nxt = reader.chunks("d/f")[0][2]
    tampered = blob[:f.offset] + frame + blob[nxt:]
    # Offsets after the frame moved: fix the TOC so the frames line up again.
    shift = len(frame) - (nxt - f.offset)
    toc = json.loads(reader.toc_json)
    for e in toc["entries"]:
        for key in ("offset", "endOffset"):
            if e.get(key, 0) > f.offset:
                e[key] += shift
    body = tampered[:reader.payload_end + shift]
    # (the tar-split CRC or the chunk digest, whichever sees it first)
    assert_rejected(rebuild(blob, json.dumps(toc).encode(), payload=body), "does not match")
    # tar-split: a wrong CRC, a wrong name, a missing entry, garbage.
    ts = zstandard.ZstdDecompressor().decompress(_tarsplit(blob), max_output_size=1 << 20)
    lines = ts.splitlines()
    for bad, text in [
        (ts.replace(b'"name":"g"', b'"name":"h"'), "TOC entry"),
        (b"\n".join(lines[:-1]) + b"\n", "past the tar-split"),
        (b"not json\n" + ts, "JSON"),
        (_recrc(lines), "CRC-64"),
    ]:
        assert_rejected(rebuild(blob, tarsplit=zstandard.ZstdCompressor().compress(bad)),
                        text)
    # The digest in the TOC must match the tar-split bytes.
    toc = json.loads(reader.toc_json)
    toc["tarSplitDigest"] = "sha256:" + "0" * 64
    other = rebuild(blob, json.dumps(toc).encode())
    assert_rejected(other, "tarSplitDigest")


def test_a_zstd_bomb_in_the_data_is_an_error_not_an_allocation():
    blob = small_blob()
    reader = open_layer(BytesSource(blob))
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(256 << 20))
    assert len(bomb) < 64 << 10
    body = blob[:reader.payload_end] + bomb
    assert_rejected(rebuild(blob, payload=body))


def _pos(blob: bytes) -> tuple[int, int, int]:
    return zc.parse_footer(BytesSource(blob))


def _tarsplit(blob: bytes) -> bytes:
    offset, clen, _ = _pos(blob)
    head = offset + clen
    n = int.from_bytes(blob[head + 4:head + 8], "little")
    return blob[head + 8:head + 8 + n]


def _recrc(lines: list[bytes]) -> bytes:
    out = []
    for line in lines:
        obj = json.loads(line)
        if obj["type"] == 1 and obj.get("size"):
            obj["payload"] = "AAAAAAAAAAA="
        out.append(json.dumps(obj, separators=(",", ":")).encode())
    return b"\n".join(out) + b"\n"


def test_image_convert_writes_oci_zstd_layers_skopeo_copies(tmp_path):
    """`convert --zstdchunked`: tar+zstd layers carrying only zstd:chunked
    annotations, config diff_ids that are the layers' uncompressed digests,
    and an image skopeo copies as it is (annotations kept)."""
    lazy = build_images("lazy-kinds")["lazy-kinds"] / "oci"
    out, copy = tmp_path / "zc", tmp_path / "copy"
    run_cli("convert", f"oci:{lazy}:latest", f"oci:{out}:zc", "--zstdchunked", "-q",
            check=True)
    p = subprocess.run(["skopeo", "copy", f"oci:{out}:zc", f"oci:{copy}:zc"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{copy}:zc"], capture_output=True,
                         text=True, check=True).stdout
    config = json.loads(subprocess.run(["skopeo", "inspect", "--config", f"oci:{copy}:zc"],
                                       capture_output=True, text=True, check=True).stdout)
    layers = json.loads(raw)["layers"]
    for layer, diff_id in zip(layers, config["rootfs"]["diff_ids"], strict=True):
        assert layer["mediaType"] == zc.MEDIA_TYPE
        assert set(layer["annotations"]) == set(zc.ANNOTATION_KEYS)
        blob = copy / "blobs" / "sha256" / layer["digest"].split(":")[1]
        plain = subprocess.run(["zstd", "-dc", blob], capture_output=True, check=True).stdout
        assert "sha256:" + hashlib.sha256(plain).hexdigest() == diff_id
        r = run_cli("layer", "verify", blob, "--toc-digest",
                    layer["annotations"][zc.MANIFEST_CHECKSUM])
        assert r.code == 0, r.err
