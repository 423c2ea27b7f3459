"""SOCI zTOCs (issue 14): our bytes are soci's bytes, and soci reads them.

The reference is soci-snapshotter v0.16.1's own ztoc packages, built from
the Go module proxy as tests/interop/soci-ztoc (``scripts/build-go.sh
soci-ztoc``): ``build`` is soci's ztoc builder and marshaler, ``info`` its
unmarshaler with the checkpoints decoded, ``extract`` reads every regular
file back through the zTOC's spans with its cgo zran code.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

from conftest import Spec, build_tar, every_kind_specs, pattern, write
from estargz._exceptions import EstargzError, InvalidInput, UnsupportedEntry
from estargz.layer import zinfo
from estargz.layer.ztoc import (
    DEFAULT_SPAN_SIZE,
    FileMetadata,
    build_ztoc,
    marshal_ztoc,
    unmarshal_ztoc,
)
from gobuild import build_go

SOCI_TOOL = "AWS SOCI CLI v0.2"  # what the checker's build writes, as soci create does
EMPTY_RECORDS = "etc/empty-records"
GZIP_LAYER_TYPES = ("application/vnd.oci.image.layer.v1.tar+gzip",
                    "application/vnd.docker.image.rootfs.diff.tar.gzip")


@pytest.fixture(scope="session")
def soci_ztoc() -> Path:
    """soci's zTOC code as a checker, built once (cached across runs)."""
    return build_go("soci-ztoc")


def layers_of(oci: Path) -> list[Path]:
    """The gzip layer blobs of an OCI layout's first manifest, in order."""
    def blob(digest: str) -> Path:
        return oci / "blobs" / "sha256" / digest.split(":", 1)[1]
    index = json.loads((oci / "index.json").read_text())
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    return [blob(d["digest"]) for d in manifest["layers"] if d["mediaType"] in GZIP_LAYER_TYPES]


def ours(layer: Path, span: int, compression: str = "gzip") -> bytes:
    with open(layer, "rb") as f:
        z = build_ztoc(f, span_size=span, build_tool=SOCI_TOOL, compression=compression)
    data = marshal_ztoc(z)
    assert unmarshal_ztoc(data) == z
    return data


def reference(soci_ztoc: Path, layer: Path, span: int, out: Path) -> bytes:
    p = subprocess.run([soci_ztoc, "build", layer, str(span), out], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    return out.read_bytes()


def info(soci_ztoc: Path, ztoc: Path) -> dict:
    p = subprocess.run([soci_ztoc, "info", ztoc], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def extract(soci_ztoc: Path, ztoc: Path, layer: Path) -> dict[str, str]:
    """name -> sha256 of every regular file, as soci extracts it via the zTOC."""
    p = subprocess.run([soci_ztoc, "extract", ztoc, layer], capture_output=True, text=True,
                       errors="surrogateescape")
    assert p.returncode == 0, p.stderr
    out = {}
    for line in p.stdout.splitlines():
        digest, name = line.split("  ", 1)
        out[name] = digest
    return out


def tar_files(tar: bytes) -> dict[str, str]:
    """name -> sha256 of every regular file of an uncompressed tar."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf:
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                # tarfile takes an empty PAX path as the name; Go keeps the
                # header's (only crafted_tar has one).
                name = EMPTY_RECORDS if m.pax_headers.get("path") == "" else m.name
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def check_same(soci_ztoc: Path, tmp_path: Path, layer: Path, span: int,
               compression: str = "gzip") -> bytes:
    """Our zTOC of ``layer`` equals soci's byte for byte; returns it."""
    ref = reference(soci_ztoc, layer, span, tmp_path / "ref.ztoc")
    got = ours(layer, span, compression)
    if got != ref:
        write(tmp_path / "ours.ztoc", got)
        assert info(soci_ztoc, tmp_path / "ours.ztoc") == info(soci_ztoc, tmp_path / "ref.ztoc")
    assert got == ref, f"{len(got)} bytes, soci's {len(ref)}"
    return got


# --- real layers ----------------------------------------------------------------

@pytest.mark.parametrize("which,span", [(0, DEFAULT_SPAN_SIZE), (1, DEFAULT_SPAN_SIZE),
                                        (1, 128 << 10)])
def test_real_layers_byte_exact(soci_ztoc, test_images, tmp_path, which, span):
    """debian-python3's base layer (50 MB) and python3 layer (16 MB): the
    same bytes as soci, at the default span and at 128 KiB (hundreds of
    checkpoints, boundaries inside bytes among them)."""
    layer = layers_of(test_images.debian_python3)[which]
    data = check_same(soci_ztoc, tmp_path, layer, span)
    z = unmarshal_ztoc(data)
    assert z.max_span_id + 1 == len(z.decoded_checkpoints) == len(z.span_digests)
    if span < DEFAULT_SPAN_SIZE:
        assert z.max_span_id > 100
        assert any(c.bits for c in z.decoded_checkpoints)
        # Small spans keep soci's extraction quick: every file, through ours.
        got = extract(soci_ztoc, write(tmp_path / "ours.ztoc", data), layer)
        assert got == tar_files(gzip.decompress(layer.read_bytes()))


def test_spans_agree_with_soci(soci_ztoc, test_images, tmp_path):
    """span_of / span_range / span_uncompressed_start give the ranges soci
    computes for every span, and span_digests hash exactly those bytes."""
    layer = layers_of(test_images.debian_python3)[1]
    path = write(tmp_path / "z", ours(layer, 1 << 20))
    z = unmarshal_ztoc(path.read_bytes())
    spans = info(soci_ztoc, path)["spans"]
    blob = layer.read_bytes()
    assert len(spans) == z.max_span_id + 1
    for s in spans:
        start, end = z.span_range(s["id"])
        assert (start, end) == (s["compressed_start"], s["compressed_end"])
        assert z.span_uncompressed_start(s["id"]) == s["uncompressed_start"]
        assert z.span_of(s["uncompressed_start"]) == s["id"]
        assert "sha256:" + hashlib.sha256(blob[start:end]).hexdigest() == s["digest"]
        if s["id"]:
            assert z.span_of(s["uncompressed_start"] - 1) == s["id"] - 1
    assert z.span_of(10 ** 12) == z.max_span_id
    starts = [s["uncompressed_start"] for s in spans]

    def soci_span(offset: int) -> int:
        return max(i for i, start in enumerate(starts) if start <= offset)
    for f in z.files:
        want = (range(soci_span(f.uncompressed_offset),
                      soci_span(f.uncompressed_offset + f.uncompressed_size) + 1)
                if f.uncompressed_size else range(0))
        assert z.file_spans(f) == want, f.name
    with pytest.raises(InvalidInput):
        z.span_range(z.max_span_id + 1)


# --- crafted layers ---------------------------------------------------------------

def crafted_tar() -> bytes:
    """Every entry kind, PAX records, long names in three encodings, a V7
    directory (typeflag NUL and a trailing slash), sub-second times."""
    pax = build_tar(every_kind_specs() + [
        Spec("etc/ns-time", data=b"ns", pax={"mtime": "1700000000.123456789"}),
        Spec("etc/neg-time", data=b"neg", pax={"mtime": "-1.5"}),
        # Empty PAX records keep the header's values (Go's mergePAX).
        Spec(EMPTY_RECORDS, data=b"e", uname="bob",
             pax={"path": "", "uname": "", "linkpath": "", "comment": ""}),
        Spec("big", data=pattern(300_000, 7)),
    ])
    gnu = build_tar([
        Spec("gnu/" + "n" * 150, data=b"gnu long name"),
        Spec("gnu/link", tarfile.SYMTYPE, linkname="t" * 150),
        Spec("gnu/dir/", tarfile.DIRTYPE),
    ], fmt=tarfile.GNU_FORMAT)
    ustar = build_tar([
        Spec("u/" + "p" * 90 + "/" + "q" * 60, data=b"prefix field"),
        Spec("v7dir/", tarfile.AREGTYPE),
        Spec("u/file", data=b"ustar"),
    ], fmt=tarfile.USTAR_FORMAT)
    # One archive: the members of all three, one end marker.
    return strip_end(pax) + strip_end(gnu) + ustar


def strip_end(tar: bytes) -> bytes:
    """``tar`` without its end-of-archive blocks and padding."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = tf.getmembers()
    last = members[-1]
    return tar[:last.offset_data + -(-last.size // 512) * 512 if last.isreg() else
               last.offset_data]


@pytest.mark.parametrize("level,span", [(6, DEFAULT_SPAN_SIZE), (9, 4096), (1, 65536),
                                        (0, 8192)])
def test_crafted_layer_byte_exact_and_extractable(soci_ztoc, tmp_path, level, span):
    """A layer of every kind: the same bytes as soci at each span size, and
    soci extracts every regular file through our zTOC intact."""
    tar = crafted_tar()
    layer = write(tmp_path / "layer.gz", gzip.compress(tar, level, mtime=0))
    data = check_same(soci_ztoc, tmp_path, layer, span)
    got = extract(soci_ztoc, write(tmp_path / "ours.ztoc", data), layer)
    assert got == tar_files(tar)


def test_crafted_layer_metadata(soci_ztoc, tmp_path):
    """What the file table says, as soci decodes it: Go's names (trailing
    slashes kept), types, times to the nanosecond, every PAX record."""
    layer = write(tmp_path / "layer.gz", gzip.compress(crafted_tar(), mtime=0))
    path = write(tmp_path / "z", ours(layer, DEFAULT_SPAN_SIZE))
    files = {f["name"]: f for f in info(soci_ztoc, path)["files"]}
    assert files["etc/"]["type"] == "dir"
    assert files["v7dir/"]["type"] == "dir"
    assert files["gnu/dir/"]["type"] == "dir"
    assert files["gnu/" + "n" * 150]["type"] == "reg"
    assert files["gnu/link"]["linkname"] == "t" * 150
    assert files["u/" + "p" * 90 + "/" + "q" * 60]["uncompressed_size"] == len(b"prefix field")
    assert files["etc/hardlink"]["type"] == "hardlink"
    assert (files["dev/null"]["type"], files["dev/null"]["devmajor"],
            files["dev/null"]["devminor"]) == ("char", 1, 3)
    assert files["dev/loop0"]["type"] == "block"
    assert files["dev/fifo"]["type"] == "fifo"
    assert files["etc/ns-time"]["mod_time"] == "2023-11-14T22:13:20.123456789Z"
    assert files["etc/neg-time"]["mod_time"] == "1969-12-31T23:59:58.5Z"
    assert files["etc/xattr"]["pax_headers"]["SCHILY.xattr.user.comment"] == "hi"
    assert files["etc/small"]["uname"] == "alice"
    assert files["etc/empty-records"]["uname"] == "bob"
    assert files["etc/empty-records"]["pax_headers"]["path"] == ""


def test_empty_layers(soci_ztoc, tmp_path):
    """An empty tar, and a gzip holding nothing at all."""
    for name, tar in (("empty-tar", bytes(1024)), ("nothing", b""),
                      ("padded", bytes(10240))):
        layer = write(tmp_path / f"{name}.gz", gzip.compress(tar, mtime=0))
        z = unmarshal_ztoc(check_same(soci_ztoc, tmp_path, layer, DEFAULT_SPAN_SIZE))
        assert z.files == ()
        assert z.max_span_id == 0
        assert z.uncompressed_archive_size == min(len(tar), 1024)


def test_multi_member_gzip(soci_ztoc, tmp_path):
    """Concatenated gzip members (pigz --independent, eStargz, mgzip):
    checkpoints after later members' headers, as soci's walk places them."""
    tar = crafted_tar() + bytes(1024)
    cuts = [0, 777, 20_000, 20_001, 150_000, len(tar)]
    data = b"".join(gzip.compress(tar[a:b], mtime=0) for a, b in itertools.pairwise(cuts))
    layer = write(tmp_path / "multi.gz", data)
    for span in (4096, DEFAULT_SPAN_SIZE):
        z = unmarshal_ztoc(check_same(soci_ztoc, tmp_path, layer, span))
    got = extract(soci_ztoc, write(tmp_path / "ours.ztoc", marshal_ztoc(z)), layer)
    assert got == tar_files(tar)


def test_pigz_layer(soci_ztoc, tmp_path):
    """pigz's output: empty stored blocks between its parallel pieces."""
    p = subprocess.run(["pigz", "-c", "-b", "128"], input=crafted_tar(),
                       capture_output=True, check=True)
    layer = write(tmp_path / "pigz.gz", p.stdout)
    check_same(soci_ztoc, tmp_path, layer, 65536)


def test_uncompressed_layer(soci_ztoc, tmp_path):
    """A plain tar layer: fixed spans of the file, and soci's TarZinfo."""
    tar = crafted_tar()
    layer = write(tmp_path / "layer.tar", tar)
    for span in (4096, 100_000, len(tar)):
        data = check_same(soci_ztoc, tmp_path, layer, span, compression="uncompressed")
    z = unmarshal_ztoc(data)
    assert (z.compression_algorithm, z.max_span_id, z.span_range(0)) == (
        "uncompressed", 0, (0, len(tar)))
    got = extract(soci_ztoc, write(tmp_path / "ours.ztoc",
                                   ours(layer, 4096, "uncompressed")), layer)
    assert got == tar_files(tar)


@pytest.mark.parametrize("in_chunk,out_chunk", [(1, 1), (997, 4099), (1 << 20, 300)])
def test_checkpoints_do_not_depend_on_buffer_sizes(monkeypatch, in_chunk, out_chunk):
    """Where a block ends is in the data: the walk with other input and
    output buffer sizes (one byte at a time included) finds the same
    checkpoints, windows and span digests (docs/soci.md)."""
    blob = gzip.compress(crafted_tar(), 9, mtime=0)
    want = build_ztoc(io.BytesIO(blob), span_size=4096)
    monkeypatch.setattr(zinfo, "_IN_CHUNK", in_chunk)
    monkeypatch.setattr(zinfo, "_OUT_CHUNK", out_chunk)
    assert build_ztoc(io.BytesIO(blob), span_size=4096) == want
    assert want.max_span_id >= 5 and any(c.bits for c in want.decoded_checkpoints)


def test_readers_returning_more_than_asked(tmp_path):
    """A stream whose read returns more than asked (a pipe wrapper, a test
    double) gives the same zTOC: the walk never copies past its buffer."""
    blob = gzip.compress(crafted_tar(), mtime=0)

    class Greedy(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            return super().read(-1 if n is None or n < 0 else 3 * n + 7)

    assert build_ztoc(Greedy(blob), span_size=4096) == build_ztoc(io.BytesIO(blob),
                                                                   span_size=4096)


def test_the_caller_can_hash_the_stream(tmp_path):
    """build_ztoc reads the blob once, all of it: a wrapper sees every byte."""
    blob = gzip.compress(crafted_tar(), mtime=0)

    class Hashing(io.BytesIO):
        def __init__(self, data: bytes) -> None:
            super().__init__(data)
            self.h = hashlib.sha256()

        def read(self, n: int | None = -1) -> bytes:
            data = super().read(n)
            self.h.update(data)
            return data

    f = Hashing(blob)
    z = build_ztoc(f, span_size=4096)
    assert f.h.digest() == hashlib.sha256(blob).digest()
    assert z.compressed_archive_size == len(blob)
    assert z.build_tool_identifier.startswith("estargz v")


# --- what soci refuses, we refuse --------------------------------------------------

def refused_layers() -> dict[str, tuple[bytes, type[EstargzError]]]:
    good = gzip.compress(crafted_tar(), mtime=0)
    sparse = build_tar([Spec("sparse", data=b"x" * 10)], fmt=tarfile.GNU_FORMAT)
    sparse = sparse[:156] + b"S" + sparse[157:]
    chk = sum(sparse[:148]) + 8 * 32 + sum(sparse[156:512])
    sparse = sparse[:148] + f"{chk:06o}\0 ".encode() + sparse[156:]
    return {
        "truncated": (good[:len(good) // 2], InvalidInput),
        "trailing-garbage": (good + b"garbage!", InvalidInput),
        "corrupt": (good[:200] + bytes(b ^ 0x55 for b in good[200:260]) + good[260:],
                    InvalidInput),
        "not-gzip": (crafted_tar(), InvalidInput),
        "global-header": (gzip.compress(build_tar([Spec("a", data=b"a")],
                                                  pax_global={"comment": "x"}), mtime=0),
                          InvalidInput),
        "sparse": (gzip.compress(sparse, mtime=0), UnsupportedEntry),
        "zlib-raw": (zlib.compress(crafted_tar())[2:-4], InvalidInput),
        "zlib-wrapped": (zlib.compress(crafted_tar()), InvalidInput),
        # Go's gzip reader meets the zlib member while the tar needs its data.
        "zlib-member": (gzip.compress(crafted_tar()[:5000], mtime=0)
                        + zlib.compress(crafted_tar()[5000:]), InvalidInput),
    }


@pytest.mark.parametrize("name", sorted(refused_layers()))
def test_refused_like_soci(soci_ztoc, tmp_path, name):
    """Layers soci's builder fails on fail here too, in one line."""
    blob, error = refused_layers()[name]
    layer = write(tmp_path / "bad.gz", blob)
    p = subprocess.run([soci_ztoc, "build", layer, "65536", tmp_path / "ref"],
                       capture_output=True, text=True)
    assert p.returncode == 1, p.stdout
    with open(layer, "rb") as f, pytest.raises(error) as e:
        build_ztoc(f, span_size=65536)
    assert "\n" not in str(e.value)


def test_zlib_after_the_tar_end(soci_ztoc, tmp_path):
    """soci's checkpoint walk inflates zlib streams too, and its tar reader
    stops at the end blocks: a zlib member after them is accepted, by both."""
    layer = write(tmp_path / "z.gz", gzip.compress(crafted_tar(), mtime=0)
                  + zlib.compress(pattern(100_000, 4)))
    z = unmarshal_ztoc(check_same(soci_ztoc, tmp_path, layer, 8192))
    assert z.span_range(z.max_span_id)[1] == layer.stat().st_size


def test_zstd_gets_no_ztoc():
    with pytest.raises(InvalidInput, match="gzip and uncompressed layers only"):
        build_ztoc(io.BytesIO(b""), compression="zstd")


def test_model_round_trips():
    """Fields our builder never writes this way (non-UTF-8 strings, a uid
    above 2**31, PAX records out of order) survive marshal and unmarshal."""
    real = build_ztoc(io.BytesIO(gzip.compress(bytes(1024), mtime=0)), span_size=4096)
    z = dataclasses.replace(
        real, build_tool_identifier="t\udcff",
        files=(FileMetadata("a\udc80", "reg", 512, 3, mode=0o100644, uid=1 << 31,
                            mod_time="2024-01-01T00:00:00.5Z",
                            pax_headers={"z": "1", "a": "\udcfe"}),))
    assert unmarshal_ztoc(marshal_ztoc(z)) == z
