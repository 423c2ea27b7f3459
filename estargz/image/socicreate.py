"""``estargz soci create``: a SOCI index for an image, without changing it.

For each selected image manifest, every layer soci can index (gzip or tar,
at least ``min_layer_size`` bytes) gets a zTOC (:mod:`estargz.layer.ztoc`):
its file table and a zran checkpoint every ``span_size`` bytes of its
existing gzip stream.  The zTOCs go into a SOCI index manifest
(:mod:`.sociindex`), bound to the image as v2 (a new image index at the
destination holding the bound manifest and the SOCI index; what the SOCI
Snapshotter looks for first) or v1 (the index refers to the unchanged
manifest by ``subject``, found through the referrers API or its tag
fallback).  Layers and configs are never rewritten.

Each layer is read once: fetched (or read in place from a local layout),
indexed, and, when the destination lacks it, stored from the same copy.
A layer shared by several platforms is indexed once.  No daemon, no root.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, cast

from .._cancel import check_cancelled
from .._exceptions import EstargzError, InvalidInput, NotFound
from .._fsutil import owned_tempdir, unlink_quietly
from .._progress import progress_meter, reporting_to
from .._version import __version__
from ..layer.converter import available_cores
from ..layer.jsondoc import load_json_object
from ..layer.ztoc import Ztoc, build_ztoc, marshal_ztoc, unmarshal_ztoc
from .convert import host_platform_default
from .descriptor import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    sha256_digest,
)
from .loadorder import LayerPrefetch, LoadOrder, layer_prefetch
from .reference import ImageRef
from .results import LayerProgress, ProgressFn
from .sociindex import (
    DEFAULT_MIN_LAYER_SIZE,
    DEFAULT_SPAN_SIZE,
    EMPTY_CONFIG,
    IMAGE_MANIFEST_DIGEST_ANNOTATION,
    LAYER_DIGEST_ANNOTATION,
    PREFETCH_MEDIA_TYPE,
    SOCI_INDEX_V1,
    SOCI_INDEX_V2,
    SPAN_SIZE_ANNOTATION,
    annotated_manifest,
    index_manifest,
    v2_image_index,
    ztoc_descriptor,
    ztoc_layer_kind,
)
from .socilookup import find_soci_indexes
from .store import ImageDestination, ImageSource, TransportOptions
from .transport import open_destination, open_source, parse_reference

__all__ = ["SociIndexReport", "SociLayerReport", "SociOptions", "SociResult",
           "create_soci_index", "soci_destination", "soci_index_source"]

_MAX_ZTOC = 256 << 20  # a reused zTOC larger than this is not one


@dataclass(frozen=True)
class SociOptions:
    """Options of :func:`create_soci_index` (the ``estargz soci create`` flags)."""

    span_size: int = DEFAULT_SPAN_SIZE
    min_layer_size: int = DEFAULT_MIN_LAYER_SIZE
    #: ``"v2"`` (an image index at the destination) or ``"v1"`` (a referrer).
    version: str = "v2"
    platforms: tuple[Platform, ...] = ()
    all_platforms: bool = False
    #: Take zTOCs (same layer, same span size) from SOCI indexes already
    #: bound to the source or the destination instead of building them.
    reuse: bool = False
    build_tool: str = f"estargz v{__version__}"
    #: A workload's load order: each indexed layer it read from gets a SOCI
    #: prefetch artifact, the spans of those reads in first-access order.
    load_order: LoadOrder | None = None
    #: Layer-indexing jobs at once (0: one per core, at most 4).
    parallel_layers: int = 0
    src: TransportOptions = TransportOptions()
    dst: TransportOptions = TransportOptions()


@dataclass
class SociLayerReport:
    """One layer of the image and what its index holds for it."""

    digest: str
    media_type: str
    size: int
    #: ``"built"``, ``"reused"``, ``"shared"`` (built earlier in this run)
    #: or ``"skipped"``.
    action: str
    reason: str = ""
    ztoc: str = ""
    ztoc_size: int = 0
    spans: int = 0
    files: int = 0
    prefetch: str = ""
    #: Spans in the prefetch artifact, and the compressed bytes they cover.
    prefetch_spans: int = 0
    prefetch_bytes: int = 0
    #: Load-order paths this layer's zTOC does not have.
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class SociIndexReport:
    """The SOCI index of one image manifest."""

    platform: str
    #: The image manifest indexed (as the source has it).
    manifest: str
    #: The manifest as bound (v2: annotated; v1: unchanged).
    bound_manifest: str
    index: str
    index_size: int
    layers: list[SociLayerReport] = field(default_factory=list)


@dataclass
class SociResult:
    """What ``estargz soci create`` did; ``--json`` prints :meth:`to_dict`."""

    source: str
    destination: str
    version: str
    span_size: int
    min_layer_size: int
    #: The image the destination reference names now: v2's new image index,
    #: v1's unchanged manifest or index.
    digest: str = ""
    media_type: str = ""
    indexes: list[SociIndexReport] = field(default_factory=list)
    #: v1: how the snapshotter will find each index (referrers API or tag).
    found_by: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "destination": self.destination,
            "version": self.version, "span_size": self.span_size,
            "min_layer_size": self.min_layer_size, "digest": self.digest,
            "media_type": self.media_type, "found_by": self.found_by,
            "notes": self.notes, "seconds": self.seconds,
            "indexes": [{**{k: v for k, v in vars(i).items() if k != "layers"},
                         "layers": [vars(layer) for layer in i.layers]}
                        for i in self.indexes],
        }


def soci_destination(src: ImageRef, version: str) -> ImageRef:
    """Where the index goes when no DST is given: v1 beside the image
    itself; v2 to the same repository or layout under ``TAG-soci``."""
    if version == "v1":
        return src
    if src.name is not None and src.transport == "docker" and not src.name.digest:
        return replace(src, name=replace(src.name, tag=(src.name.tag or "latest") + "-soci"))
    if src.transport == "oci" and src.tag:
        return replace(src, tag=src.tag + "-soci")
    raise InvalidInput(f"{src}: give DST for the v2 index (a new image index); only a "
                       "tagged docker:// or oci:PATH:TAG source has a default (TAG-soci)")


@dataclass
class _Built:
    """A layer's zTOC, built or reused once per run."""

    ztoc: Ztoc
    data: bytes
    action: str
    seconds: float
    prefetch: LayerPrefetch | None = None


class _Run:
    """One ``soci create``: the layer jobs and what they share."""

    def __init__(self, source: ImageSource, dest: ImageDestination, options: SociOptions,
                 work: str, progress: ProgressFn | None, *, copy_image: bool) -> None:
        self.source, self.dest, self.options = source, dest, options
        self.work, self.progress, self.copy_image = work, progress, copy_image
        self.parallel = options.parallel_layers or max(1, min(available_cores(), 4))
        self.pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="estargz-soci")
        self.jobs: dict[str, Future[_Built | None]] = {}
        self.copied: set[str] = set()
        #: Existing zTOCs by (layer digest, span size): where to fetch them.
        self.known: dict[tuple[str, int], tuple[Descriptor, ImageSource]] = {}
        self.notes: list[str] = []
        #: Sources opened for ``--reuse`` only (closed with the run).
        self.known_sources: list[ImageSource] = []

    # --- blobs ------------------------------------------------------------

    def _fetch(self, desc: Descriptor) -> tuple[str, bool]:
        """A file holding blob ``desc`` and whether it is our temporary copy."""
        local = (self.source.local_blob_path(desc)
                 if self.source.verbatim_local_blobs else None)
        if local is not None:
            return local, False
        fd, path = tempfile.mkstemp(dir=self.work, suffix=".blob")
        try:
            with os.fdopen(fd, "wb") as f:
                self.source.fetch_blob(desc, f)
        except BaseException:
            unlink_quietly(path)
            raise
        return path, True

    def _store(self, desc: Descriptor, path: str | None = None) -> None:
        """Make sure the destination holds image blob ``desc`` (from ``path``
        if the caller already has it; mounted within one registry)."""
        if not self.copy_image or desc.digest in self.copied:
            return
        self.copied.add(desc.digest)
        if self.dest.has_blob(desc):
            return
        origin = self.source.origin
        if path is None and origin is not None and origin[0] == self.dest.registry_host:
            self.dest.put_blob(desc, "", mount_from=origin[1])
            return
        own = False
        if path is None:
            path, own = self._fetch(desc)
        try:
            self.dest.put_blob(desc, path)
        finally:
            if own:
                unlink_quietly(path)

    def _put_bytes(self, desc: Descriptor, data: bytes) -> None:
        if self.dest.has_blob(desc):
            return
        fd, path = tempfile.mkstemp(dir=self.work, suffix=".blob")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.dest.put_blob_file(desc, path)

    # --- zTOCs ------------------------------------------------------------

    def learn_existing(self, source: ImageSource, root: bytes, media_type: str) -> None:
        """Remember the zTOCs of SOCI indexes bound to an image, for ``--reuse``."""
        try:
            bound = find_soci_indexes(source, root, media_type)
        except (NotFound, InvalidInput) as e:
            self.notes.append(f"--reuse: not reusing from {source.name}: {e}")
            return
        for b in bound:
            for z in b.index.ztocs:
                key = (z.annotations[LAYER_DIGEST_ANNOTATION],
                       int(z.annotations[SPAN_SIZE_ANNOTATION]))
                self.known.setdefault(key, (z, source))

    def layer(self, layer: Descriptor) -> Future[_Built | None]:
        """The zTOC job for ``layer``, started once per run."""
        fut = self.jobs.get(layer.digest)
        if fut is None:
            fut = self.pool.submit(self._layer_job, layer)
            self.jobs[layer.digest] = fut
        return fut

    def _layer_job(self, layer: Descriptor) -> _Built | None:
        check_cancelled()
        started = time.monotonic()

        def sink(phase: str, done: int, total: int | None) -> None:
            if self.progress is not None:
                self.progress("bytes", LayerProgress(layer.digest, phase, done, total))

        with reporting_to(sink if self.progress is not None else None):
            reused = self._reused(layer) if self.options.reuse else None
            if reused is not None:
                self._store(layer)
                built = _Built(reused[0], reused[1], "reused", 0.0)
            else:
                built = self._build(layer)
        doc = self.options.load_order
        wanted = [x for x in doc.layers if x.digest == layer.digest] if doc else []
        if wanted:
            built.prefetch = layer_prefetch(wanted[0], built.ztoc)
        built.seconds = round(time.monotonic() - started, 3)
        return built

    def _reused(self, layer: Descriptor) -> tuple[Ztoc, bytes] | None:
        hit = self.known.get((layer.digest, self.options.span_size))
        if hit is None:
            return None
        desc, where = hit
        if desc.size > _MAX_ZTOC:
            return None
        path = os.path.join(self.work, desc.digest[7:] + ".ztoc")
        with open(path, "wb") as f:
            where.fetch_blob(desc, f)
        with open(path, "rb") as f:
            data = f.read()
        os.unlink(path)
        return unmarshal_ztoc(data), data

    def _build(self, layer: Descriptor) -> _Built:
        kind = ztoc_layer_kind(layer.media_type)
        assert kind is not None  # zstd layers are skipped before
        path, own = self._fetch(layer)
        try:
            with open(path, "rb") as f:
                stream = cast("BinaryIO", _Metered(f, layer.size))
                ztoc = build_ztoc(stream, span_size=self.options.span_size,
                                  build_tool=self.options.build_tool, compression=kind)
            self._store(layer, path)
        finally:
            if own:
                unlink_quietly(path)
        return _Built(ztoc, marshal_ztoc(ztoc), "built", 0.0)


class _Metered:
    """A layer file as :func:`build_ztoc` reads it, its bytes counted as the
    ``decompress`` phase (the walk inflates as it reads)."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self._meter = progress_meter("decompress", size)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._meter.add(len(data))
        if not data:
            self._meter.finish()
        return data


def _platform_of_config(source: ImageSource, manifest: Mapping[str, Any],
                        what: str) -> Platform:
    """A single-manifest image's platform, from its config (as soci does)."""
    config = Descriptor.from_json(manifest.get("config"))
    if config.size > 16 << 20:
        raise InvalidInput(f"{what}: config {config.digest} is {config.size} bytes")
    path = tempfile.mkstemp(suffix=".json")[1]
    try:
        with open(path, "wb") as f:
            source.fetch_blob(config, f)
        with open(path, "rb") as f:
            cfg = load_json_object(f.read(), f"config {config.digest}")
    finally:
        unlink_quietly(path)
    return Platform(str(cfg.get("os", "")), str(cfg.get("architecture", "")),
                    str(cfg.get("variant", "") or ""),
                    {k: cfg[k] for k in ("os.version", "os.features") if cfg.get(k)})


def _select(entries: Sequence[Descriptor], options: SociOptions) -> list[Descriptor]:
    wanted = options.platforms or (host_platform_default(),)
    selected = [d for d in entries
                if d.media_type in MANIFEST_TYPES and d.platform is not None
                and d.platform.os != "unknown"
                and d.extra.get("artifactType") not in (SOCI_INDEX_V1, SOCI_INDEX_V2)
                and (options.all_platforms or any(p.matches(d.platform) for p in wanted))]
    if not selected:
        have = ", ".join(sorted({str(d.platform) for d in entries if d.platform})) or "none"
        raise NotFound(f"no manifest for {', '.join(map(str, wanted))} in the index "
                       f"(platforms: {have})")
    return selected


def create_soci_index(src: str, dst: str | None = None,
                      options: SociOptions = SociOptions(),
                      progress: ProgressFn | None = None) -> SociResult:
    """Write a SOCI index for image ``src`` (a skopeo-style reference).

    v2 writes a new image index to ``dst`` (default: ``src``'s repository
    or layout, tag ``TAG-soci``); v1 pushes the index as a referrer of the
    image, at ``src`` itself unless ``dst`` names a copy.  The source image
    is only read.  Nothing is visible at the destination before everything
    it references is stored.
    """
    sref = parse_reference(src)
    with open_source(sref, options.src) as source:
        return soci_index_source(source, sref, dst, options, progress)


def soci_index_source(source: ImageSource, sref: ImageRef, dst: str | None,
                      options: SociOptions = SociOptions(),
                      progress: ProgressFn | None = None) -> SociResult:
    """:func:`create_soci_index` from an already open ``source`` (left
    open) of the image at ``sref``: what ``optimize --soci`` calls with the
    staged copy of the image it has profiled."""
    if options.version not in ("v1", "v2"):
        raise InvalidInput(f"SOCI index version {options.version!r} is not v1 or v2")
    if options.span_size <= 0 or options.min_layer_size < 0:
        raise InvalidInput("the span size must be above 0 and the min layer size at least 0")
    started = time.monotonic()
    dref = parse_reference(dst) if dst else soci_destination(sref, options.version)
    copy_image = str(dref) != str(sref)
    result = SociResult(str(sref), str(dref), options.version, options.span_size,
                        options.min_layer_size)
    open_ref = dref
    if not copy_image and dref.name is not None and dref.name.digest:
        # v1 in place stores no tag: the digest only names the image.
        open_ref = replace(dref, name=replace(dref.name, digest=None))
    with owned_tempdir("soci") as owned:
        dest = open_destination(open_ref, options.dst)
        run = _Run(source, dest, options, owned.path, progress, copy_image=copy_image)
        try:
            if options.version == "v1" and not dest.holds_referrers:
                raise InvalidInput(f"{dest.name} cannot hold a v1 SOCI index (it is found "
                                   "through the referrers API): use a docker:// or oci: "
                                   "destination or the v2 index")
            _create(run, result, dref)
            result.notes[:0] = run.notes
        except BaseException:
            for fut in run.jobs.values():
                fut.cancel()
            dest.abort()
            raise
        finally:
            run.pool.shutdown(wait=True)
            dest.close()
            for other in run.known_sources:
                other.close()
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _create(run: _Run, result: SociResult, dref: ImageRef) -> None:
    source, dest, options = run.source, run.dest, run.options
    root, media_type = source.root()
    obj = load_json_object(root, f"{source.name} manifest")
    media_type = media_type or obj.get("mediaType") or (
        OCI_INDEX if "manifests" in obj else OCI_MANIFEST)
    root_desc = Descriptor(media_type, sha256_digest(root), len(root))
    is_index = media_type in INDEX_TYPES
    if not is_index and media_type not in MANIFEST_TYPES:
        raise InvalidInput(f"{source.name}: {media_type!r} is not an image manifest or index")
    if options.reuse:
        run.learn_existing(source, root, media_type)
        if run.copy_image:
            _learn_destination(run, dref)
    if is_index:
        entries = [Descriptor.from_json(d) for d in obj.get("manifests") or []]
        selected = _select(entries, options)
    else:
        platform = _platform_of_config(source, obj, source.name)
        entries = [root_desc.replace(platform=platform)]
        selected = entries
    manifests = {d.digest: (source.get_manifest(d) if is_index else root) for d in selected}

    # Every layer's job starts now; they run in parallel.
    plans: dict[str, list[tuple[Descriptor, Future[_Built | None] | str]]] = {}
    for d in selected:
        m = load_json_object(manifests[d.digest], f"manifest {d.digest}")
        layers = m.get("layers")
        if not isinstance(layers, list):
            raise InvalidInput(f"manifest {d.digest} has no layers list")
        plan: list[tuple[Descriptor, Future[_Built | None] | str]] = []
        for layer in map(Descriptor.from_json, layers):
            if layer.media_type == PREFETCH_MEDIA_TYPE:
                continue
            kind = ztoc_layer_kind(layer.media_type)
            if kind is None:
                plan.append((layer, f"{layer.media_type} is not indexed by soci (zstd)"))
            elif layer.size < options.min_layer_size:
                plan.append((layer, f"size {layer.size} is less than min-layer-size "
                                    f"{options.min_layer_size}"))
            else:
                plan.append((layer, run.layer(layer)))
        plans[d.digest] = plan

    bound: dict[str, tuple[Descriptor, bytes]] = {}
    soci_entries: list[Descriptor] = []
    for d in selected:
        report, blobs = _collect(run, d, plans[d.digest], manifests[d.digest])
        if not blobs:
            result.notes.append(f"{d.platform}: no layer is at least {options.min_layer_size} "
                                "bytes (--min-layer-size): nothing to index")
            continue
        subject = d if options.version == "v1" else None
        data = index_manifest(options.version, blobs, options.build_tool,
                              Descriptor(d.media_type, d.digest, d.size) if subject else None)
        index_desc = Descriptor(OCI_MANIFEST, sha256_digest(data), len(data))
        run._put_bytes(Descriptor(SOCI_INDEX_V1 if subject else SOCI_INDEX_V2,
                                  sha256_digest(EMPTY_CONFIG), len(EMPTY_CONFIG)),
                       EMPTY_CONFIG)
        dest.put_manifest(data, index_desc)
        report.index, report.index_size = index_desc.digest, index_desc.size
        if options.version == "v2":
            raw = annotated_manifest(manifests[d.digest], index_desc.digest,
                                     f"manifest {d.digest}")
            new = Descriptor(OCI_MANIFEST, sha256_digest(raw), len(raw),
                             load_json_object(raw, "bound manifest").get("annotations") or {},
                             d.platform)
            bound[d.digest] = (new, raw)
            report.bound_manifest = new.digest
            soci_entries.append(index_desc.replace(
                annotations={IMAGE_MANIFEST_DIGEST_ANNOTATION: new.digest},
                platform=d.platform, extra={"artifactType": SOCI_INDEX_V2}))
        else:
            report.bound_manifest = d.digest
            result.found_by.append(dest.put_referrer(
                data, index_desc.replace(extra={"artifactType": SOCI_INDEX_V1}), d))
        result.indexes.append(report)
    if not result.indexes:
        raise InvalidInput(f"{source.name}: no layer to index: " + "; ".join(result.notes))

    if options.version == "v1":
        if run.copy_image:
            _copy_image(run, entries, manifests, root, root_desc, is_index)
            dest.commit(root_desc, root)
        result.digest, result.media_type = root_desc.digest, media_type
        return
    # v2: the image index of the binding, with every manifest of the source
    # (the indexed ones bound), then the SOCI indexes.
    listed: list[Descriptor] = []
    for d in entries:
        if d.digest in bound:
            new, raw = bound[d.digest]
            _copy_manifest_blobs(run, raw)
            dest.put_manifest(raw, new)
            listed.append(new)
        elif is_index and d.extra.get("artifactType") == SOCI_INDEX_V2:
            continue  # an older binding's index for a platform indexed now
        else:
            if run.copy_image:
                child = source.get_manifest(d)
                if d.media_type in MANIFEST_TYPES:
                    _copy_manifest_blobs(run, child)
                dest.put_manifest(child, d)
            listed.append(d)
    raw_index = v2_image_index(obj if is_index else None, listed + soci_entries)
    new_root = Descriptor(OCI_INDEX, sha256_digest(raw_index), len(raw_index))
    dest.put_manifest(raw_index, new_root)
    dest.commit(new_root, raw_index)
    result.digest, result.media_type = new_root.digest, OCI_INDEX


def _collect(run: _Run, d: Descriptor,
             plan: list[tuple[Descriptor, Future[_Built | None] | str]],
             manifest: bytes) -> tuple[SociIndexReport, list[Descriptor]]:
    """Wait for a manifest's layer jobs: its report and the index's blobs
    (zTOCs in layer order, then prefetch artifacts), stored at the destination."""
    report = SociIndexReport(str(d.platform), d.digest, d.digest, "", 0)
    ztocs: list[Descriptor] = []
    prefetch: list[Descriptor] = []
    seen: set[str] = set()
    seen_prefetch: set[str] = set()
    for layer, job in plan:
        check_cancelled()
        if isinstance(job, str):
            report.layers.append(SociLayerReport(layer.digest, layer.media_type, layer.size,
                                                 "skipped", reason=job))
            continue
        built = job.result()
        assert built is not None
        desc = ztoc_descriptor(built.data, layer, run.options.span_size)
        run._put_bytes(desc, built.data)
        action = "shared" if layer.digest in seen else built.action
        seen.add(layer.digest)
        lr = SociLayerReport(layer.digest, layer.media_type, layer.size, action,
                             ztoc=desc.digest, ztoc_size=desc.size,
                             spans=built.ztoc.max_span_id + 1, files=len(built.ztoc.files),
                             seconds=built.seconds)
        ztocs.append(desc)
        pre = built.prefetch
        if pre is not None and layer.digest not in seen_prefetch:
            seen_prefetch.add(layer.digest)
            lr.missing = list(pre.missing)
            pdesc = pre.descriptor
            if pre.data is not None and pdesc is not None:
                run._put_bytes(pdesc, pre.data)
                prefetch.append(pdesc)
                lr.prefetch, lr.prefetch_spans = pdesc.digest, len(pre.spans)
                lr.prefetch_bytes = pre.compressed_bytes
        report.layers.append(lr)
    return report, ztocs + prefetch


def _copy_manifest_blobs(run: _Run, manifest: bytes) -> None:
    """The config and every layer of ``manifest`` at the destination (layers
    indexed in this run are already there, stored from their one fetch)."""
    m = load_json_object(manifest, "manifest")
    run._store(Descriptor.from_json(m.get("config")))
    for layer in m.get("layers") or []:
        run._store(Descriptor.from_json(layer))


def _copy_image(run: _Run, entries: Sequence[Descriptor], manifests: Mapping[str, bytes],
                root: bytes, root_desc: Descriptor, is_index: bool) -> None:
    """v1 to another place: the image as it is, beside its index."""
    for d in entries:
        child = manifests.get(d.digest) or run.source.get_manifest(d)
        if d.media_type in MANIFEST_TYPES:
            _copy_manifest_blobs(run, child)
        if is_index:
            run.dest.put_manifest(child, d)
    run.dest.put_manifest(root, root_desc)


def _learn_destination(run: _Run, dref: ImageRef) -> None:
    """``--reuse``: also the zTOCs of what the destination tag holds now."""
    try:
        other = open_source(dref, run.options.dst)
    except (NotFound, EstargzError):
        return
    try:
        root, media_type = other.root()
    except NotFound:
        other.close()
        return
    run.known_sources.append(other)
    run.learn_existing(other, root, media_type)

