"""Load-order documents and the SOCI prefetch artifact made from them
(estargz/image/loadorder.py): from a profiler record to the document's
bytes and back, and from a document plus a layer's zTOC to the span ranges
soci-snapshotter v0.16.1 prefetches -- which spans, in which order, each
once, only the parts of files read in part -- and one-line errors for
hostile documents and artifacts.

The zTOC here is a stand-in with the interface the artifact needs (file
table, ``span_of``, ``span_range``): checkpoints at irregular uncompressed
offsets, as gzip's deflate blocks put them.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass

import pytest

from estargz import InvalidInput, sha256_digest
from estargz.image.loadorder import (
    LOAD_ORDER_MEDIA_TYPE,
    SOCI_LAYER_DIGEST,
    SOCI_PREFETCH_MEDIA_TYPE,
    ByteRange,
    FileLoad,
    LayerLoad,
    LoadOrder,
    dump_load_order,
    file_spans,
    layer_prefetch,
    load_order_from_record,
    parse_load_order,
    parse_soci_prefetch,
    prefetch_files_json,
    soci_prefetch,
    soci_prefetch_bytes,
    span_ranges,
)
from estargz.image.records import read_records

MANIFEST = "sha256:" + "a" * 64
OTHER_MANIFEST = "sha256:" + "b" * 64
L0, L1, L2 = ("sha256:" + c * 64 for c in "012")


@dataclass(frozen=True)
class Entry:
    name: str
    uncompressed_offset: int
    uncompressed_size: int


@dataclass(frozen=True)
class Link:
    """A zTOC hard-link entry: no bytes of its own (``type``/``linkname`` as
    soci's FileMetadata)."""

    name: str
    linkname: str
    uncompressed_offset: int = 7500
    uncompressed_size: int = 0
    type: str = "hardlink"


@dataclass(frozen=True)
class Ztoc:
    """Span ``i`` starts at uncompressed ``starts[i]`` and compressed ``comp[i]``;
    the last span ends at compressed ``comp[-1]``."""

    files: tuple[Entry | Link, ...]
    starts: tuple[int, ...]
    comp: tuple[int, ...]

    def span_of(self, uncompressed_offset: int) -> int:
        # The last checkpoint at or before the offset, as soci's
        # pt_index_from_ucmp_offset (gzip_zinfo.c) finds it.
        return bisect.bisect_right(self.starts, uncompressed_offset) - 1

    def span_range(self, span_id: int) -> tuple[int, int]:
        return self.comp[span_id], self.comp[span_id + 1]


# Spans: 0 [0,1000) 1 [1000,2500) 2 [2500,4000) 3 [4000,7000) 4 [7000,7100) 5 [7100,...)
STARTS = (0, 1000, 2500, 4000, 7000, 7100)
COMP = (0, 300, 800, 1200, 2000, 2030, 2600)
ZTOC = Ztoc(
    files=(
        Entry("etc/passwd", 512, 100),         # span 0
        Entry("usr/lib/big.so", 1536, 5000),   # spans 1..3 (last byte 6535)
        Entry("usr/bin/app", 7100, 300),       # span 5
        Entry("empty", 7000, 0),               # no bytes at all
        Entry("edge", 2000, 500),              # last byte 2499: span 1 only (2500 starts span 2)
        Entry("dup", 512, 10),                 # replaced by the later entry of that name
        Entry("./dup", 7050, 10),              # span 4
        Link("usr/bin/app-link", "./usr/bin/app"),   # app's bytes: span 5
        Link("loop", "loop"),
    ),
    starts=STARTS,
    comp=COMP,
)


def doc(*files: FileLoad, digest: str = L0) -> LoadOrder:
    return LoadOrder("web", MANIFEST, (LayerLoad(digest, files),))


def one_line(e: pytest.ExceptionInfo[InvalidInput]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


# --- record -> document -> bytes -> document -------------------------------------------

RECORD_LINES = [
    json.dumps({"path": p, "manifestDigest": m, "layerIndex": i})
    for p, m, i in [
        ("usr/bin/app", MANIFEST, 2),
        ("etc/passwd", MANIFEST, 0),
        ("usr/lib/big.so", MANIFEST, 2),
        ("usr/bin/app", MANIFEST, 2),           # again: listed once
        ("ignored", OTHER_MANIFEST, 0),          # another platform's manifest
        ("/etc/../etc/group", MANIFEST, 0),      # cleaned
        ("lib/x.so", MANIFEST, 3),               # layer 3 is the same blob as layer 0
    ]
]


def test_record_to_document_keeps_first_access_order_per_layer() -> None:
    records = read_records(RECORD_LINES)
    parts = {"usr/lib/big.so": [ByteRange(4096, 100), ByteRange(0, 512)]}
    lo = load_order_from_record(records, MANIFEST, [L0, L1, L2, L0], "web", ranges=parts)
    assert lo.workload == "web" and lo.manifest == MANIFEST
    # Layers in manifest order; L1 read nothing; L0 (twice in the manifest) once.
    assert [layer.digest for layer in lo.layers] == [L0, L2]
    assert [f.path for f in lo.layers[0].files] == ["etc/passwd", "etc/group", "lib/x.so"]
    assert lo.layers[1].files == (
        FileLoad("usr/bin/app"),
        FileLoad("usr/lib/big.so", (ByteRange(4096, 100), ByteRange(0, 512))),
    )


def test_document_bytes_are_documented_and_round_trip() -> None:
    model = FileLoad("data/model.bin", (ByteRange(0, 4096), ByteRange(1 << 30, 65536)))
    lo = LoadOrder("web", MANIFEST, (LayerLoad(L0, (FileLoad("etc/passwd"), model)),))
    data = dump_load_order(lo)
    assert json.loads(data) == {
        "mediaType": LOAD_ORDER_MEDIA_TYPE,
        "workload": "web",
        "manifest": MANIFEST,
        "layers": [{"digest": L0, "files": [
            {"path": "etc/passwd"},
            {"path": "data/model.bin", "ranges": [{"offset": 0, "length": 4096},
                                                   {"offset": 1 << 30, "length": 65536}]},
        ]}],
    }
    assert data.endswith(b"}\n") and dump_load_order(parse_load_order(data)) == data
    assert parse_load_order(data) == lo
    # Keys a later version adds are ignored.
    obj = json.loads(data)
    obj["comment"] = "x"
    obj["layers"][0]["files"][0]["mode"] = 1
    assert parse_load_order(json.dumps(obj)) == lo


@pytest.mark.parametrize("records, layers, workload, message", [
    ({(MANIFEST, 5): ["a"]}, [L0], "web", "record names layer 5 but manifest"),
    ({(OTHER_MANIFEST, 0): ["a"]}, [L0], "web", "no entries for manifest"),
    ({(MANIFEST, 0): [".."]}, [L0], "web", "names no file in the layer"),
    ({(MANIFEST, 0): ["a"]}, [L0], "../etc", "workload name '../etc' is not"),
    ({(MANIFEST, 0): ["a"]}, ["sha256:zz"], "web", "layer 0 digest is not a sha256 digest"),
])
def test_bad_record_input(records: dict[tuple[str, int], list[str]], layers: list[str],
                          workload: str, message: str) -> None:
    with pytest.raises(InvalidInput) as e:
        load_order_from_record(records, MANIFEST, layers, workload)
    assert message in one_line(e)


def test_prefetch_files_json_for_soci_create() -> None:
    lo = LoadOrder("web", MANIFEST, (
        LayerLoad(L0, (FileLoad("etc/passwd"), FileLoad("b"))),
        LayerLoad(L1, (FileLoad("b"), FileLoad("c", (ByteRange(0, 1),)))),
    ))
    assert json.loads(prefetch_files_json(lo)) == ["/etc/passwd", "/b", "/c"]


# --- spans ----------------------------------------------------------------------------

def test_file_spans() -> None:
    by = {e.name: e for e in ZTOC.files}
    assert file_spans(ZTOC, by["etc/passwd"]) == [0]
    assert file_spans(ZTOC, by["usr/lib/big.so"]) == [1, 2, 3]
    # Ends on the byte before span 2 starts: soci create's offset+size would add span 2.
    assert file_spans(ZTOC, by["edge"]) == [1]
    assert file_spans(ZTOC, by["empty"]) == []
    big = by["usr/lib/big.so"]
    # Only the parts read, in the order read; the tail first here.
    assert file_spans(ZTOC, big, [ByteRange(4900, 10), ByteRange(0, 10)]) == [3, 1]
    # A range across a boundary; one overlapping another adds nothing new.
    assert file_spans(ZTOC, big, [ByteRange(900, 200), ByteRange(950, 10)]) == [1, 2]
    # Clipped to the file; wholly past its end, nothing.
    assert file_spans(ZTOC, big, [ByteRange(4999, 1 << 40)]) == [3]
    assert file_spans(ZTOC, big, [ByteRange(5000, 1)]) == []


def test_span_ranges_keep_order() -> None:
    assert span_ranges([4, 5, 6, 1, 2, 9, 8]) == [(4, 6), (1, 2), (9, 9), (8, 8)]
    assert span_ranges([]) == []


def test_layer_prefetch_first_access_order_dedup_and_bytes() -> None:
    lo = doc(FileLoad("usr/bin/app"), FileLoad("etc/passwd"), FileLoad("/etc/passwd/"),
             FileLoad("usr/lib/big.so"), FileLoad("not/there"), FileLoad("dup"),
             FileLoad("empty"))
    p = layer_prefetch(lo.layers[0], ZTOC)
    # app (5), passwd (0), big.so (1..3), dup's later entry (4); passwd's span once.
    assert p.spans == (5, 0, 1, 2, 3, 4)
    assert p.missing == ("not/there",)
    assert p.compressed_bytes == (2600 - 2030) + 300 + (800 - 300) + (1200 - 800) \
        + (2000 - 1200) + (2030 - 2000)
    # Byte for byte what Go's json.Marshal writes for soci.PrefetchArtifact
    # (checked against encoding/json with soci/prefetch.go's struct tags).
    assert p.data == (b'{"version":"1.0","prefetch_spans":['
                      b'{"start_span":5,"end_span":5},'
                      b'{"start_span":0,"end_span":4,"priority":1}]}')
    desc = p.descriptor
    assert desc is not None
    assert (desc.media_type, desc.digest, desc.size) == \
        (SOCI_PREFETCH_MEDIA_TYPE, sha256_digest(p.data), len(p.data))
    assert desc.to_json()["annotations"] == {SOCI_LAYER_DIGEST: L0}
    assert parse_soci_prefetch(p.data, max_span=5) == [(5, 5, 0), (0, 4, 1)]


def test_hard_links_fetch_their_targets_bytes() -> None:
    p = layer_prefetch(doc(FileLoad("usr/bin/app-link"), FileLoad("loop")).layers[0], ZTOC)
    assert p.spans == (5,) and p.missing == ()


def test_partial_reads_fetch_only_their_spans() -> None:
    whole = layer_prefetch(doc(FileLoad("usr/lib/big.so")).layers[0], ZTOC)
    head = layer_prefetch(doc(FileLoad("usr/lib/big.so", (ByteRange(0, 64),))).layers[0], ZTOC)
    assert whole.spans == (1, 2, 3) and head.spans == (1,)
    assert head.compressed_bytes == 500 < whole.compressed_bytes


def test_soci_prefetch_per_layer() -> None:
    lo = LoadOrder("web", MANIFEST, (
        LayerLoad(L0, (FileLoad("etc/passwd"),)),
        LayerLoad(L1, (FileLoad("small-layer-file"),)),   # no zTOC: pulled whole, no artifact
        LayerLoad(L2, (FileLoad("empty"),)),              # nothing to fetch: no artifact
    ))
    out = soci_prefetch(lo, {L0: ZTOC, L2: ZTOC})
    assert [(p.layer_digest, p.spans) for p in out] == [(L0, (0,)), (L2, ())]
    assert out[1].data is None and out[1].descriptor is None
    with pytest.raises(ValueError):
        soci_prefetch_bytes([])


def test_go_written_artifact_parses() -> None:
    # As soci create writes it: sorted, merged, no priority.
    data = (b'{"version":"1.0","prefetch_spans":'
            b'[{"start_span":0,"end_span":3},{"start_span":5,"end_span":5}]}')
    assert parse_soci_prefetch(data) == [(0, 3, 0), (5, 5, 0)]


# --- hostile input --------------------------------------------------------------------

GOOD = json.loads(dump_load_order(doc(FileLoad("a", (ByteRange(0, 1),)))))


def mutate(path: tuple[object, ...], value: object) -> bytes:
    obj = json.loads(json.dumps(GOOD))
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return json.dumps(obj).encode()


LAYER = ("layers", 0)
FILE = (*LAYER, "files", 0)
RANGE = (*FILE, "ranges", 0)


@pytest.mark.parametrize("data, message", [
    (b"", "is not valid JSON"),
    (b"\xff{}", "not UTF-8"),
    (b"[" * 5000 + b"]" * 5000, "nested deeper than 64"),
    (b"[]", "is not a JSON object"),
    (b'{"mediaType": NaN}', "is not valid JSON"),
    (mutate(("mediaType",), "application/json"), "mediaType is 'application/json'"),
    (mutate(("workload",), "a/b"), "workload name 'a/b'"),
    (mutate(("workload",), ""), "workload name ''"),
    (mutate(("workload",), 7), "workload name '7'"),
    (mutate(("manifest",), "sha256:" + "x" * 100000), "manifest is not a sha256 digest"),
    (mutate(("layers",), {}), "layers is not a list"),
    (mutate(LAYER, "x"), "layers[0] is not an object"),
    (mutate((*LAYER, "digest"), None), "layers[0].digest is not a sha256 digest"),
    (mutate((*LAYER, "files"), None), "layers[0].files is not a list"),
    (mutate(FILE, []), "files[0] is not an object"),
    (mutate((*FILE, "path"), 5), "files[0].path '5' is not a path string"),
    (mutate((*FILE, "path"), "a\x00b"), "is not a path string"),
    (mutate((*FILE, "path"), "/"), "names no file in the layer"),
    (mutate((*FILE, "path"), "./"), "names no file in the layer"),
    (mutate((*FILE, "ranges"), []), "ranges is empty"),
    (mutate((*FILE, "ranges"), "0-9"), "ranges is not a list"),
    (mutate(RANGE, [0, 1]), "ranges[0] is not an object"),
    (mutate((*RANGE, "offset"), -1), "offset -1 is not an integer"),
    (mutate((*RANGE, "offset"), True), "offset True is not an integer"),
    (mutate((*RANGE, "offset"), 1.5), "offset 1.5 is not an integer"),
    (mutate((*RANGE, "offset"), 1 << 63), "is not an integer in 0.."),
    (mutate((*RANGE, "length"), 0), "length 0 is not a positive integer"),
    (mutate(RANGE, {"offset": 1, "length": (1 << 63) - 1}), "ending within 922"),
    (mutate((*RANGE, "length"), "10"), "length 10 is not"),
])
def test_hostile_load_order_documents(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_load_order(data, "web.loadorder.json")
    msg = one_line(e)
    assert msg.startswith("web.loadorder.json") and message in msg


def test_hostile_duplicates() -> None:
    obj = json.loads(json.dumps(GOOD))
    obj["layers"].append(obj["layers"][0])
    with pytest.raises(InvalidInput) as e:
        parse_load_order(json.dumps(obj))
    assert f"layer {L0} is listed twice" in one_line(e)
    obj = json.loads(json.dumps(GOOD))
    obj["layers"][0]["files"].append({"path": "./a"})
    with pytest.raises(InvalidInput) as e:
        parse_load_order(json.dumps(obj))
    assert "'a' is listed twice" in one_line(e)


def test_oversized_document() -> None:
    with pytest.raises(InvalidInput) as e:
        parse_load_order(b" " * (64 << 20) + b"{}")
    assert "exceeds the 67108864-byte limit" in one_line(e)


@pytest.mark.parametrize("data, message", [
    (b'{"version":"1.1","prefetch_spans":[{"start_span":0,"end_span":0}]}', "version '1.1'"),
    (b'{"prefetch_spans":[{"start_span":0,"end_span":0}]}', "version 'None'"),
    (b'{"version":"1.0","prefetch_spans":[]}', "has no spans"),
    (b'{"version":"1.0","prefetch_spans":{}}', "prefetch_spans is not a list"),
    (b'{"version":"1.0","prefetch_spans":[7]}', "prefetch_spans[0] is not an object"),
    # What would make v0.16.1 index its span table at -1 (a panic) or expand
    # two billion span IDs before checking any.
    (b'{"version":"1.0","prefetch_spans":[{"start_span":-1,"end_span":0}]}', "spans -1..0"),
    (b'{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":2147483647}]}',
     "<= 9"),
    (b'{"version":"1.0","prefetch_spans":[{"start_span":3,"end_span":2}]}', "spans 3..2"),
    (b'{"version":"1.0","prefetch_spans":[{"start_span":false,"end_span":0}]}', "spans False..0"),
    (b'{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":0,"priority":0.5}]}',
     "priority 0.5"),
    (b"[" * 100 + b"]" * 100, "nested deeper"),
    (b"[]", "is not a JSON object"),
])
def test_hostile_prefetch_artifacts(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_soci_prefetch(data, max_span=9)
    assert message in one_line(e)
