"""Our SOCI prefetch artifacts against soci v0.16.1's own (``soci convert
--standalone --prefetch-file``, built by scripts/build-go.sh through the
Go module proxy): for one file, the same bytes and so the same descriptor as
soci puts in its index; for several, the same spans, ours in first-access
order and without soci's extra span after a file that ends where a span
starts.

The layer is an uncompressed tar, whose zTOC spans soci cuts every
``span_size`` bytes of the tar (ztoc/compression/tar_zinfo.go:
``UncompressedOffsetToSpanID`` is ``offset / spanSize``), so the file table
and span boundaries are known here without a zTOC reader.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from estargz.image.loadorder import (
    SOCI_PREFETCH_MEDIA_TYPE,
    FileLoad,
    LayerLoad,
    layer_prefetch,
    parse_soci_prefetch,
)
from gobuild import build_go

SPAN = 4096
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class Entry:
    name: str
    uncompressed_offset: int
    uncompressed_size: int


@dataclass(frozen=True)
class Member(Entry):
    """An entry with soci's FileMetadata ``type`` and ``linkname``."""

    type: str
    linkname: str


@dataclass(frozen=True)
class TarZtoc:
    """A tar layer's zTOC as soci builds it: spans every SPAN bytes."""

    files: tuple[Entry, ...]
    size: int

    def span_of(self, uncompressed_offset: int) -> int:
        return uncompressed_offset // SPAN

    def span_range(self, span_id: int) -> tuple[int, int]:
        return span_id * SPAN, min((span_id + 1) * SPAN, self.size)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def soci() -> Path:
    return build_go("soci")


def tar_layer() -> tuple[bytes, TarZtoc]:
    # Sizes put "edge"'s end exactly on a span boundary (soci's offset+size
    # then names the next span).
    files = [("a.bin", 10000), ("b.txt", 3000), ("c.bin", 20000), ("d", 5), ("edge", 4096),
             ("tail.bin", 9000)]
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for i, (name, size) in enumerate(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = size, 0o644, 0
            t.addfile(info, io.BytesIO(bytes([i + 1]) * size))
    data = bio.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        entries = tuple(Entry(m.name, m.offset_data, m.size) for m in t)
    edge = next(e for e in entries if e.name == "edge")
    assert (edge.uncompressed_offset + edge.uncompressed_size) % SPAN == 0
    return data, TarZtoc(entries, len(data))


def write_layout(root: Path, layer: bytes) -> None:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        (blobs / sha(data)[7:]).write_bytes(data)
        return {"digest": sha(data), "size": len(data)}

    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
        "layers": [{"mediaType": OCI_TAR, **put(layer)}],
    }).encode()
    (root / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", **put(manifest),
                       "platform": {"architecture": "amd64", "os": "linux"}}]}))
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def soci_prefetch_of(soci: Path, tmp: Path, layer: bytes, files: list[str]) -> dict:
    """soci's prefetch blob descriptor for ``layer`` (with its bytes under "data")."""
    src, out = tmp / "in", tmp / "out"
    write_layout(src, layer)
    args = [str(soci), "--root", str(tmp / "root"), "convert", "--standalone",
            "--format", "oci-dir", "--min-layer-size", "0", "--span-size", str(SPAN)]
    for f in files:
        args += ["--prefetch-file", f]
    p = subprocess.run([*args, str(src), str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]

    def blob(digest: str) -> bytes:
        return (out / "blobs" / "sha256" / digest[7:]).read_bytes()

    outer = json.loads((out / "index.json").read_text())
    image_index = json.loads(blob(outer["manifests"][0]["digest"]))
    soci_desc = next(m for m in image_index["manifests"] if m.get("artifactType"))
    soci_index = json.loads(blob(soci_desc["digest"]))
    [desc] = [b for b in soci_index["layers"] if b["mediaType"] == SOCI_PREFETCH_MEDIA_TYPE]
    return {**desc, "data": blob(desc["digest"])}


def test_one_file_same_bytes_as_soci(soci: Path, tmp_path: Path) -> None:
    layer, ztoc = tar_layer()
    theirs = soci_prefetch_of(soci, tmp_path, layer, ["/c.bin"])
    ours = layer_prefetch(LayerLoad(sha(layer), (FileLoad("c.bin"),)), ztoc)
    assert ours.spans == (3, 4, 5, 6, 7, 8)
    assert ours.data == theirs.pop("data")
    assert ours.descriptor is not None and ours.descriptor.to_json() == theirs


def test_several_files_same_spans_in_access_order(soci: Path, tmp_path: Path) -> None:
    layer, ztoc = tar_layer()
    access = ["tail.bin", "edge", "d", "a.bin"]
    theirs = soci_prefetch_of(soci, tmp_path, layer, access)
    ours = layer_prefetch(LayerLoad(sha(layer), tuple(FileLoad(p) for p in access)), ztoc)
    soci_spans = [s for a, b, _ in parse_soci_prefetch(theirs["data"]) for s in range(a, b + 1)]
    # soci: sorted and merged; "edge" (span 9) ends where span 10 starts and
    # soci names span 10 too (offset+size); tail.bin starts in span 10 anyway.
    assert soci_spans == sorted(set(soci_spans))
    assert set(ours.spans) == set(soci_spans)
    # Ours: in the order the workload read them, each once.
    assert ours.spans == (10, 11, 12, 9, 8, 0, 1, 2)
    assert parse_soci_prefetch(ours.data or b"") == [(10, 12, 0), (9, 9, 1), (8, 8, 2), (0, 2, 3)]


def test_file_ending_on_a_span_boundary(soci: Path, tmp_path: Path) -> None:
    layer, ztoc = tar_layer()
    theirs = soci_prefetch_of(soci, tmp_path, layer, ["edge"])
    ours = layer_prefetch(LayerLoad(sha(layer), (FileLoad("edge"),)), ztoc)
    # soci also fetches the span after the file's last byte; ours does not.
    assert parse_soci_prefetch(theirs["data"]) == [(9, 10, 0)]
    assert ours.spans == (9,) and ours.compressed_bytes == SPAN


def test_dot_slash_names_and_hard_links(soci: Path, tmp_path: Path) -> None:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, size in [("./x.bin", 9000), ("./y", 100)]:
            info = tarfile.TarInfo(name)
            info.size = size
            t.addfile(info, io.BytesIO(b"z" * size))
        link = tarfile.TarInfo("./hl")
        link.type, link.linkname = tarfile.LNKTYPE, "./x.bin"
        t.addfile(link)
        link = tarfile.TarInfo("hl2")
        link.type, link.linkname = tarfile.LNKTYPE, "./x.bin"
        t.addfile(link)
    layer = bio.getvalue()
    with tarfile.open(fileobj=io.BytesIO(layer)) as t:
        members = t.getmembers()
    theirs = soci_prefetch_of(soci, tmp_path, layer, ["/x.bin", "hl", "hl2"])
    ztoc = TarZtoc(tuple(Member(m.name, m.offset_data, m.size,
                                "hardlink" if m.islnk() else "reg", m.linkname)
                         for m in members), len(layer))
    ours = layer_prefetch(LayerLoad(sha(layer), (FileLoad("hl2"),)), ztoc)
    # soci compares raw tar names ("./x.bin", "./hl": not found) and takes a
    # link's own entry: only the span where hl2's header sits.
    hl2 = members[-1]
    assert parse_soci_prefetch(theirs["data"]) == [(hl2.offset_data // SPAN,) * 2 + (0,)]
    # Ours: the bytes of x.bin, which hl2 is.
    assert ours.spans == (0, 1, 2)
    assert layer_prefetch(LayerLoad(sha(layer), (FileLoad("/x.bin"), FileLoad("hl"))),
                          ztoc).spans == (0, 1, 2)
