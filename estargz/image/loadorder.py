"""Workload load orders: our load-order document, and the SOCI prefetch
artifact made from it.

A *load-order document* (docs/soci.md, "Load-order documents") says, for
one workload of one image, which files of each layer (by layer digest) the
workload read at start-up, in first-access order, with byte ranges for large
files it read only in part.  Several can exist for one image, one per
workload, as the SOCI design describes; nothing in a layer changes.

The *SOCI prefetch artifact* is what soci-snapshotter v0.16.1 reads
(``soci/prefetch.go``): per layer, one JSON blob of media type
:data:`SOCI_PREFETCH_MEDIA_TYPE` listing inclusive span-ID ranges of that
layer's zTOC, carried as a blob of the SOCI index and tied to its layer by the
``com.amazon.soci.image-layer-digest`` annotation.  ``soci create`` sorts
and merges the ranges; we keep the workload's first-access order, each span
once, and rank the ranges with the format's ``priority`` (lower first).

Pure: no I/O.  The zTOC is read through :class:`ZtocView`, which the zTOC
reader satisfies; tests pass stand-ins.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .._exceptions import InvalidInput
from ..layer.jsondoc import load_json, load_json_object
from ..layer.toc import clean_name
from .descriptor import Descriptor, check_digest, sha256_digest

#: Media type of our load-order document (a JSON object; ours, not SOCI's).
LOAD_ORDER_MEDIA_TYPE = "application/vnd.estargz.load-order.v1+json"
#: Media type of a SOCI prefetch artifact (soci/prefetch.go:32).
SOCI_PREFETCH_MEDIA_TYPE = "application/vnd.amazon.soci.prefetch.v1+json"
#: The only ``version`` soci-snapshotter v0.16.1 accepts (soci/prefetch.go:33, 100).
SOCI_PREFETCH_VERSION = "1.0"
#: Annotation tying a SOCI index blob (zTOC or prefetch artifact) to its layer.
SOCI_LAYER_DIGEST = "com.amazon.soci.image-layer-digest"
#: Span IDs are Go ``int32`` (ztoc/compression/types.go:23).
MAX_SPAN_ID = (1 << 31) - 1
#: File offsets and lengths stay within Go's ``int64``, as the zTOC's.
MAX_OFFSET = (1 << 63) - 1
#: A load-order document or prefetch artifact larger than this is refused:
#: a workload reading a million files still fits with room to spare.
MAX_DOCUMENT_SIZE = 64 << 20

# A workload name becomes part of file names and annotations: plain characters only.
_WORKLOAD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --- the load-order document ---------------------------------------------------------

@dataclass(frozen=True)
class ByteRange:
    """``length`` bytes of a file from ``offset`` (both in the file's own bytes)."""

    offset: int
    length: int


@dataclass(frozen=True)
class FileLoad:
    """One file a workload read: its cleaned path in the layer (no leading
    ``/``), and the parts read, in first-access order; no ranges means the
    whole file."""

    path: str
    ranges: tuple[ByteRange, ...] = ()


@dataclass(frozen=True)
class LayerLoad:
    """The files one layer (``digest``) gave the workload, in first-access order."""

    digest: str
    files: tuple[FileLoad, ...]


@dataclass(frozen=True)
class LoadOrder:
    """A load-order document: ``workload`` names it; ``manifest`` is the
    digest of the image manifest it was measured on; ``layers`` in the
    manifest's layer order, each digest once."""

    workload: str
    manifest: str
    layers: tuple[LayerLoad, ...]


def check_workload(name: object) -> str:
    """Return ``name`` if it is a usable workload name (1-128 of
    ``A-Za-z0-9._-``, starting with a letter or digit), else raise
    :class:`InvalidInput`."""
    if not isinstance(name, str) or not _WORKLOAD_RE.match(name):
        raise InvalidInput(f"workload name {str(name)[:80]!r} is not 1-128 characters of "
                           f"A-Z a-z 0-9 . _ - starting with a letter or digit")
    return name


def load_order_from_record(records: Mapping[tuple[str, int], Sequence[str]],
                           manifest_digest: str, layer_digests: Sequence[str], workload: str,
                           ranges: Mapping[str, Sequence[ByteRange]] | None = None,
                           ) -> LoadOrder:
    """The load-order document of ``workload`` from a profiler record.

    ``records`` is what :func:`estargz.image.records.read_records` returns
    (paths in first-access order per ``(manifest digest, layer index)``);
    only ``manifest_digest``'s entries are used.  ``layer_digests`` are that
    manifest's layers in order.  ``ranges`` optionally gives, by cleaned
    path, the parts of files read only in part (the record itself holds whole
    files).  A layer blob that appears more than once in the manifest is
    listed once, its files merged in order.
    """
    check_workload(workload)
    _digest(manifest_digest, "manifest digest")
    for i, d in enumerate(layer_digests):
        _digest(d, f"layer {i} digest")
    ranges = ranges or {}
    per_digest: dict[str, list[FileLoad]] = {}
    seen: set[tuple[str, str]] = set()
    found = False
    for (digest, index), paths in sorted(records.items(), key=lambda kv: kv[0][1]):
        if digest != manifest_digest:
            continue
        found = True
        if not 0 <= index < len(layer_digests):
            raise InvalidInput(f"record names layer {index} but manifest {manifest_digest} "
                               f"has {len(layer_digests)} layers")
        layer = layer_digests[index]
        for raw in paths:
            path = _check_path(raw, "record path")
            if (layer, path) in seen:
                continue
            seen.add((layer, path))
            parts = tuple(_check_range(r.offset, r.length, f"range of {path!r}")
                          for r in ranges.get(path, ()))
            per_digest.setdefault(layer, []).append(FileLoad(path, parts))
    if not found:
        raise InvalidInput(f"the record has no entries for manifest {manifest_digest}")
    order = list(dict.fromkeys(d for d in layer_digests if d in per_digest))
    return LoadOrder(workload, manifest_digest,
                     tuple(LayerLoad(d, tuple(per_digest[d])) for d in order))


def dump_load_order(doc: LoadOrder) -> bytes:
    """The document's JSON bytes (UTF-8, 2-space indent, newline-terminated;
    deterministic, so equal documents have equal digests)."""
    obj: dict[str, Any] = {
        "mediaType": LOAD_ORDER_MEDIA_TYPE,
        "workload": doc.workload,
        "manifest": doc.manifest,
        "layers": [
            {"digest": layer.digest,
             "files": [{"path": f.path,
                        **({"ranges": [{"offset": r.offset, "length": r.length}
                                       for r in f.ranges]} if f.ranges else {})}
                       for f in layer.files]}
            for layer in doc.layers
        ],
    }
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def parse_load_order(data: bytes | str, what: str = "load-order document") -> LoadOrder:
    """Parse and check a load-order document; any fault raises
    :class:`InvalidInput` with one line naming where it is.  Keys this
    version does not know are ignored, so later versions can add some."""
    obj = load_json_object(data, what, max_size=MAX_DOCUMENT_SIZE)
    if obj.get("mediaType") != LOAD_ORDER_MEDIA_TYPE:
        raise InvalidInput(f"{what}: mediaType is {str(obj.get('mediaType'))[:100]!r}, "
                           f"not {LOAD_ORDER_MEDIA_TYPE}")
    try:
        workload = check_workload(obj.get("workload"))
    except InvalidInput as e:
        raise InvalidInput(f"{what}: {e}") from None
    manifest = _digest(obj.get("manifest"), f"{what}: manifest")
    layers_obj = _list(obj.get("layers"), f"{what}: layers")
    layers: list[LayerLoad] = []
    digests: set[str] = set()
    for i, lobj in enumerate(layers_obj):
        where = f"{what}: layers[{i}]"
        if not isinstance(lobj, dict):
            raise InvalidInput(f"{where} is not an object")
        digest = _digest(lobj.get("digest"), f"{where}.digest")
        if digest in digests:
            raise InvalidInput(f"{where}: layer {digest} is listed twice")
        digests.add(digest)
        files: list[FileLoad] = []
        paths: set[str] = set()
        for j, fobj in enumerate(_list(lobj.get("files"), f"{where}.files")):
            fwhere = f"{where}.files[{j}]"
            if not isinstance(fobj, dict):
                raise InvalidInput(f"{fwhere} is not an object")
            path = _check_path(fobj.get("path"), f"{fwhere}.path")
            if path in paths:
                raise InvalidInput(f"{fwhere}: {path!r} is listed twice in layer {digest}")
            paths.add(path)
            parts: list[ByteRange] = []
            if "ranges" in fobj:
                rlist = _list(fobj["ranges"], f"{fwhere}.ranges")
                if not rlist:
                    raise InvalidInput(f"{fwhere}.ranges is empty (omit it for the whole file)")
                for k, robj in enumerate(rlist):
                    rwhere = f"{fwhere}.ranges[{k}]"
                    if not isinstance(robj, dict):
                        raise InvalidInput(f"{rwhere} is not an object")
                    parts.append(_check_range(robj.get("offset"), robj.get("length"), rwhere))
            files.append(FileLoad(path, tuple(parts)))
        layers.append(LayerLoad(digest, tuple(files)))
    return LoadOrder(workload, manifest, tuple(layers))


def prefetch_files_json(doc: LoadOrder) -> bytes:
    """The document's files as ``soci create --prefetch-files-json`` takes
    them (a JSON array of absolute paths, first layer first, each once): the
    closest ``soci`` itself can come, whole files, sorted spans."""
    paths = dict.fromkeys("/" + f.path for layer in doc.layers for f in layer.files)
    return json.dumps(list(paths)).encode()


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(f"{where} is not a list")
    return value


def _check_path(value: object, where: str) -> str:
    if not isinstance(value, str) or "\x00" in value:
        raise InvalidInput(f"{where} {str(value)[:80]!r} is not a path string")
    path = clean_name(value)  # cleaned from "/", so ".." cannot climb out
    if not path:
        raise InvalidInput(f"{where} {value[:200]!r} names no file in the layer")
    return path


def _check_range(offset: object, length: object, where: str) -> ByteRange:
    # type() is not int: JSON true/false arrive as bool, a subclass of int.
    if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:
        raise InvalidInput(f"{where}: offset {str(offset)[:40]} is not an integer "
                           f"in 0..{MAX_OFFSET}")
    if type(length) is not int or not 0 < length <= MAX_OFFSET - offset:
        raise InvalidInput(f"{where}: length {str(length)[:40]} is not a positive integer "
                           f"ending within {MAX_OFFSET}")
    return ByteRange(offset, length)


def _digest(value: object, where: str) -> str:
    try:
        return check_digest(value)
    except InvalidInput:
        # check_digest quotes the whole value; a hostile one can be megabytes.
        raise InvalidInput(f"{where} is not a sha256 digest: {str(value)[:80]!r}") from None


# --- the SOCI prefetch artifact --------------------------------------------------------

class ZtocFile(Protocol):
    """What a zTOC file entry gives: its name in the layer and where its
    bytes are in the layer's uncompressed tar stream."""

    @property
    def name(self) -> str: ...

    @property
    def uncompressed_offset(self) -> int: ...

    @property
    def uncompressed_size(self) -> int: ...


class ZtocView(Protocol):
    """What the prefetch artifact needs of a layer's zTOC."""

    @property
    def files(self) -> Sequence[ZtocFile]: ...

    def span_of(self, uncompressed_offset: int) -> int:
        """The span holding uncompressed byte ``uncompressed_offset``."""
        ...

    def span_range(self, span_id: int) -> tuple[int, int]:
        """The compressed byte range ``[start, end)`` of span ``span_id`` (end
        exclusive), as the snapshotter fetches it."""
        ...


@dataclass(frozen=True)
class LayerPrefetch:
    """The prefetch of one layer: the spans, in first-access order, each
    once; the artifact's bytes (``None`` if there are no spans: soci refuses
    an empty artifact); the compressed bytes those spans cover; and the
    document's paths the zTOC does not have (listed, not fatal, as
    ``soci create`` warns)."""

    layer_digest: str
    spans: tuple[int, ...]
    data: bytes | None
    compressed_bytes: int
    missing: tuple[str, ...]

    @property
    def descriptor(self) -> Descriptor | None:
        """The artifact's descriptor as the SOCI index lists it."""
        if self.data is None:
            return None
        return Descriptor(SOCI_PREFETCH_MEDIA_TYPE, sha256_digest(self.data), len(self.data),
                          annotations={SOCI_LAYER_DIGEST: self.layer_digest})


def file_spans(ztoc: ZtocView, entry: ZtocFile, ranges: Sequence[ByteRange] = ()) -> list[int]:
    """The spans holding ``entry``'s bytes (all of them, or only ``ranges``,
    clipped to the file), in the order they are read; repeats dropped.  An
    empty file, or ranges wholly past its end, need no span."""
    size = entry.uncompressed_size
    parts = [(0, size)] if not ranges else [(r.offset, min(r.length, size - r.offset))
                                             for r in ranges if r.offset < size]
    out: dict[int, None] = {}
    for start, length in parts:
        if length <= 0:
            continue
        first = ztoc.span_of(entry.uncompressed_offset + start)
        # The last byte, not one past it as soci create does (soci_index.go:797),
        # so a file ending on a span boundary does not fetch the next span.
        last = ztoc.span_of(entry.uncompressed_offset + start + length - 1)
        for span in range(first, last + 1):
            out.setdefault(span, None)
    return list(out)


def layer_prefetch(layer: LayerLoad, ztoc: ZtocView) -> LayerPrefetch:
    """The prefetch artifact of one layer of a load-order document."""
    by_name: dict[str, ZtocFile] = {}
    for entry in ztoc.files:
        # A later tar entry of the same name replaces an earlier one.
        by_name[clean_name(entry.name)] = entry
    spans: dict[int, None] = {}
    missing: list[str] = []
    for f in layer.files:
        found = by_name.get(clean_name(f.path))
        if found is None:
            missing.append(f.path)
            continue
        for span in file_spans(ztoc, _link_target(found, by_name), f.ranges):
            spans.setdefault(span, None)
    order = tuple(spans)
    compressed = 0
    for span in order:
        start, end = ztoc.span_range(span)
        compressed += end - start
    return LayerPrefetch(layer.digest, order, soci_prefetch_bytes(order) if order else None,
                         compressed, tuple(missing))


#: Hard links followed at most (a link to itself must not loop).
_MAX_LINK_HOPS = 40


def _link_target(entry: ZtocFile, by_name: Mapping[str, ZtocFile]) -> ZtocFile:
    """The entry holding a hard link's bytes (a zTOC entry of type
    ``hardlink`` has none; soci's file system reads its ``linkname``'s,
    metadata/reader.go, while ``soci create`` prefetches the span where the
    link's entry sits).  ``type`` and ``linkname`` are optional in
    :class:`ZtocFile`: an entry without them is its own data."""
    for _ in range(_MAX_LINK_HOPS):
        if getattr(entry, "type", "") != "hardlink":
            break
        target = by_name.get(clean_name(str(getattr(entry, "linkname", ""))))
        if target is None:
            break
        entry = target
    return entry


def soci_prefetch(doc: LoadOrder, ztocs: Mapping[str, ZtocView]) -> list[LayerPrefetch]:
    """The prefetch artifacts of ``doc``: one per layer that has a zTOC in
    ``ztocs`` (by layer digest), in the document's layer order.  Layers
    without a zTOC are left out: the snapshotter pulls them whole."""
    return [layer_prefetch(layer, ztocs[layer.digest])
            for layer in doc.layers if layer.digest in ztocs]


def span_ranges(spans: Iterable[int]) -> list[tuple[int, int]]:
    """Inclusive ``(start, end)`` ranges of ``spans`` in their order: a span
    one above the previous extends the current range; any other starts a new
    one.  Order and repeats are the caller's (see :func:`file_spans`)."""
    out: list[list[int]] = []
    for span in spans:
        if out and span == out[-1][1] + 1:
            out[-1][1] = span
        else:
            out.append([span, span])
    return [(a, b) for a, b in out]


def soci_prefetch_bytes(spans: Sequence[int]) -> bytes:
    """The artifact's bytes as Go's ``json.Marshal`` writes
    ``soci.PrefetchArtifact`` (compact, its field order), ranges in the given
    order; ``priority`` is the range's rank (0 first, omitted like Go omits 0)."""
    if not spans:
        raise ValueError("a SOCI prefetch artifact needs at least one span")
    items: list[dict[str, int]] = []
    for rank, (start, end) in enumerate(span_ranges(spans)):
        if not 0 <= start <= end <= MAX_SPAN_ID:
            raise ValueError(f"span range {start}..{end} is outside 0..{MAX_SPAN_ID}")
        items.append({"start_span": start, "end_span": end, **({"priority": rank} if rank else {})})
    return json.dumps({"version": SOCI_PREFETCH_VERSION, "prefetch_spans": items},
                      separators=(",", ":")).encode()


def parse_soci_prefetch(data: bytes | str, what: str = "SOCI prefetch artifact",
                        max_span: int | None = None) -> list[tuple[int, int, int]]:
    """Parse a SOCI prefetch artifact into ``(start, end, priority)`` triples
    in its order, refusing (one line, :class:`InvalidInput`) what v0.16.1
    refuses -- another version, no spans -- and what would hurt it: negative
    span IDs, ``start > end``, IDs beyond ``max_span`` (the zTOC's last span)
    or ``int32``."""
    obj = load_json(data, what, max_size=MAX_DOCUMENT_SIZE)
    if not isinstance(obj, dict):
        raise InvalidInput(f"{what} is not a JSON object")
    if obj.get("version") != SOCI_PREFETCH_VERSION:
        raise InvalidInput(f"{what}: version {str(obj.get('version'))[:40]!r} is not "
                           f"{SOCI_PREFETCH_VERSION!r}")
    items = _list(obj.get("prefetch_spans"), f"{what}: prefetch_spans")
    if not items:
        raise InvalidInput(f"{what} has no spans")
    limit = MAX_SPAN_ID if max_span is None else min(max_span, MAX_SPAN_ID)
    out: list[tuple[int, int, int]] = []
    for i, item in enumerate(items):
        where = f"{what}: prefetch_spans[{i}]"
        if not isinstance(item, dict):
            raise InvalidInput(f"{where} is not an object")
        start, end, prio = item.get("start_span"), item.get("end_span"), item.get("priority", 0)
        if type(start) is not int or type(end) is not int or not 0 <= start <= end <= limit:
            raise InvalidInput(f"{where}: spans {str(start)[:20]}..{str(end)[:20]} are not "
                               f"integers with 0 <= start <= end <= {limit}")
        if type(prio) is not int or not -(1 << 63) <= prio < 1 << 63:
            raise InvalidInput(f"{where}: priority {str(prio)[:20]} is not an integer")
        out.append((start, end, prio))
    return out
