"""Converting whole images: every layer to eStargz, and the manifests to match.

For each selected manifest: each layer is converted by the layer converter
(identical layers once, several layers in parallel), its descriptor gets the
new digest, size, gzip media type and the TOC-digest and uncompressed-size
annotations; the config's ``rootfs.diff_ids`` are rewritten (history kept);
then config, manifest and index are stored with their new digests. The
destination makes the result visible only once everything it references is
stored (see :mod:`.store`).

Index entries that are not image manifests of a selected platform
(attestations, signatures, SBOMs attached by digest, other platforms) are
dropped: they describe the original image's digests, which conversion changes,
so keeping them would leave references to content that is not there.
"""

from __future__ import annotations

import json
import os
import platform as host_platform
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

from .._cancel import cancel_requested, request_cancel
from .._exceptions import Cancelled, EstargzError, InvalidInput, NotFound
from .._fsutil import owned_tempdir, unlink_quietly
from .._progress import reporting_to
from ..layer.converter import ConvertOptions, LayerResult, available_cores, convert_layer
from ..layer.jsondoc import load_json_object
from ..layer.reader import LayerReader
from ..layer.source import FileSource
from ..layer.toc import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION
from ..layer.zstdchunked import ANNOTATION_KEYS as ZSTD_CHUNKED_ANNOTATIONS
from .descriptor import (
    CONVERTIBLE_LAYERS,
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    sha256_digest,
)
from .reference import ImageRef
from .results import ImageResult, LayerProgress, LayerReport, ProgressFn
from .store import ImageDestination, ImageSource, TransportOptions
from .transport import open_destination, open_source, parse_reference

#: On a TOC image's layer: the digest of the eStargz layer whose TOC it is.
TOC_LAYER_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/layer.digest"
_MAX_JSON = 16 << 20  # manifests and configs are small; a bigger one is hostile
#: Seconds a cancelled run waits for a layer job blocked in I/O before it
#: cleans up anyway (the CLI then exits without waiting for it).
_CANCEL_GRACE = 1.0


@dataclass(frozen=True)
class ImageConvertOptions:
    """Options of :func:`convert_image` (the ``estargz convert`` flags)."""

    layer: ConvertOptions = ConvertOptions()
    #: Write OCI media types even for a Docker schema 2 source (the default:
    #: only OCI layer descriptors can carry the TOC digest annotation).
    oci: bool = True
    #: Platforms to convert; empty means the host's. Ignored for a single manifest.
    platforms: tuple[Platform, ...] = ()
    all_platforms: bool = False
    #: Keep layers that already are eStargz with a verifying TOC digest annotation.
    reuse: bool = False
    #: Prioritized paths per (manifest digest, layer index), e.g. from ``--record-in``.
    records: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    #: Prioritized paths for manifests the records do not name (other
    #: platforms of a profiled index): applied to every layer by path.
    fallback_paths: tuple[str, ...] = ()
    #: Layers converted at the same time (0: as many as cores, at most 4).
    parallel_layers: int = 0
    src: TransportOptions = TransportOptions()
    dst: TransportOptions = TransportOptions()


#: A layer job's outcome: the new descriptor, the conversion (``None`` when
#: reused), what was done and how long it took.
_FORMAT_ANNOTATIONS = frozenset(
    (TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION, *ZSTD_CHUNKED_ANNOTATIONS))

_LayerJob = tuple[Descriptor, LayerResult | None, str, float]


def host_platform_default() -> Platform:
    machine = host_platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
            "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
            "riscv64": "riscv64"}.get(machine, machine)
    return Platform("linux", arch, "v7" if machine == "armv7l" else "")


def _dump(obj: dict[str, Any]) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # JSON can escape half a surrogate pair ("\udc00"); UTF-8 cannot hold it.
        raise InvalidInput("an image document holds a string that is not valid "
                           "Unicode (an unpaired surrogate escape)") from None


class _Run:
    """One conversion: the state shared by its manifests and layers."""

    def __init__(self, source: ImageSource, dest: ImageDestination,
                 options: ImageConvertOptions, work: str,
                 progress: ProgressFn | None, result: ImageResult) -> None:
        self.source = source
        self.dest = dest
        self.options = options
        self.work = work
        self.progress = progress
        self.result = result
        cores = available_cores()
        self.parallel = options.parallel_layers or max(1, min(cores, 4))
        workers = options.layer.workers or max(1, cores // self.parallel)
        self.layer_options = replace(options.layer, workers=workers, prioritized_files=None)
        self.pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="estargz-layer")
        self._lock = threading.Lock()
        self._converted: dict[tuple[str, tuple[str, ...]], Future[_LayerJob]] = {}
        #: External TOCs: (layer descriptor, TOC blob file) of each converted layer.
        self.toc_blobs: list[tuple[Descriptor, str, LayerResult]] = []

    def stop(self, cancelled: bool) -> None:
        """Stop the layer jobs after an error. Cancelled (Ctrl-C), each job
        stops at its next check (:mod:`estargz._cancel`), and one blocked in
        a socket read is given at most ``_CANCEL_GRACE`` seconds; otherwise
        the running jobs are awaited, so that nothing writes after the
        destination is cleaned up."""
        if cancelled:
            request_cancel()
        with self._lock:
            running = list(self._converted.values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        wait(running, timeout=_CANCEL_GRACE if cancelled else None)

    # --- layers -----------------------------------------------------------

    def _layer_job(self, layer: Descriptor, prioritized: tuple[str, ...], by_path: bool,
                   ) -> _LayerJob:
        progress = self.progress
        if progress is None:
            return self._convert_layer(layer, prioritized, by_path)

        def sink(phase: str, done: int, total: int | None) -> None:
            progress("bytes", LayerProgress(layer.digest, phase, done, total))
        with reporting_to(sink):
            return self._convert_layer(layer, prioritized, by_path)

    def _convert_layer(self, layer: Descriptor, prioritized: tuple[str, ...], by_path: bool,
                       ) -> _LayerJob:
        started = time.monotonic()
        if self.options.reuse and self._reusable(layer):
            origin = self.source.origin
            mount = origin[1] if origin and origin[0] == self.dest.registry_host else None
            if not self.dest.has_blob(layer):
                path = self._blob_file(layer)
                self.dest.put_blob(layer, path, mount_from=mount)
                if path.startswith(self.work):
                    os.unlink(path)
            return layer, None, "reused", time.monotonic() - started
        if layer.media_type not in CONVERTIBLE_LAYERS:
            raise InvalidInput(f"layer {layer.digest} has unsupported media type "
                               f"{layer.media_type!r}")
        src_path = self._blob_file(layer)
        # Written where the destination can rename it in (an OCI layout's
        # blob directory) instead of copying it there.
        fd, out = tempfile.mkstemp(dir=self.dest.staging_dir() or self.work,
                                   prefix=".estargz-", suffix=".esgz.tmp")
        os.close(fd)
        opts = replace(self.layer_options,
                       prioritized_files=list(prioritized) if prioritized else None,
                       allow_missing=True)
        toc_out = None
        if opts.external_toc:
            fd, toc_out = tempfile.mkstemp(dir=self.work, prefix=".estargz-", suffix=".toc")
            os.close(fd)
        try:
            res = convert_layer(src_path, out, opts, tmpdir=self.work, toc_dst=toc_out)
        except BaseException:
            unlink_quietly(out)
            raise
        if res.missing and not by_path:
            self.result.warnings.append(
                f"layer {layer.digest}: recorded paths not in the layer: "
                + ", ".join(res.missing[:5]) + (" …" if len(res.missing) > 5 else ""))
        if res.annotations:
            # zstd:chunked: its own annotations and never the eStargz TOC
            # digest beside them (containers/storage refuses both).
            desc = Descriptor(OCI_LAYER_ZSTD, res.blob_digest, res.blob_size,
                              dict(res.annotations))
        else:
            desc = Descriptor(OCI_LAYER_GZIP, res.blob_digest, res.blob_size, {
                TOC_DIGEST_ANNOTATION: res.toc_digest,
                UNCOMPRESSED_SIZE_ANNOTATION: str(res.uncompressed_size)})
        self.dest.put_blob_file(desc, out)
        if toc_out is not None:
            with self._lock:
                self.toc_blobs.append((desc, toc_out, res))
        if src_path.startswith(self.work):
            os.unlink(src_path)
        return desc, res, "converted", time.monotonic() - started

    def write_toc_image(self, ref: ImageRef) -> Descriptor:
        """Store the TOC blobs as the reference's "TOC image": one gzip
        layer per TOC blob, each naming its eStargz layer in the
        ``containerd.io/snapshot/stargz/layer.digest`` annotation, an empty
        config, sorted by digest (as nativeconverter/estargz/externaltoc)."""
        dest = open_destination(ref, self.options.dst)
        try:
            layers = {}
            for desc, path, res in self.toc_blobs:
                toc = Descriptor(OCI_LAYER_GZIP, res.toc_blob_digest, res.toc_blob_size,
                                 {TOC_LAYER_DIGEST_ANNOTATION: desc.digest})
                if toc.digest not in layers:
                    dest.put_blob(toc, path)
                layers[toc.digest] = toc
            config = b"{}"
            config_desc = Descriptor(OCI_CONFIG, sha256_digest(config), len(config))
            cpath = os.path.join(self.work, "toc-image-config.json")
            with open(cpath, "wb") as f:
                f.write(config)
            dest.put_blob(config_desc, cpath)
            manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                        "config": config_desc.to_json(),
                        "layers": [layers[d].to_json() for d in sorted(layers)]}
            raw = _dump(manifest)
            root = Descriptor(OCI_MANIFEST, sha256_digest(raw), len(raw))
            dest.put_manifest(raw, root)
            dest.commit(root, raw)
        except BaseException:
            dest.abort()
            raise
        finally:
            dest.close()
        return root

    def _blob_file(self, desc: Descriptor) -> str:
        local = self.source.local_blob_path(desc)
        if local is not None:
            return local
        fd, path = tempfile.mkstemp(dir=self.work, suffix=".blob")
        with os.fdopen(fd, "wb") as f:
            self.source.fetch_blob(desc, f)
        return path

    def _reusable(self, layer: Descriptor) -> bool:
        want = layer.annotations.get(TOC_DIGEST_ANNOTATION)
        if not want or layer.media_type not in (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP) \
                or self.layer_options.format != "estargz":
            return False
        # Only the footer and the TOC are read: by range, from a registry.
        remote = self.source.range_source(layer)
        if remote is not None:
            try:
                return LayerReader(remote).toc_digest == want
            except EstargzError:
                return False
        path = self._blob_file(layer)
        try:
            with FileSource(path) as src:
                ok = LayerReader(src).toc_digest == want
        except EstargzError:
            ok = False
        if path.startswith(self.work):
            os.unlink(path)
        return ok

    def layer(self, layer: Descriptor, prioritized: tuple[str, ...],
              by_path: bool = False) -> tuple[Future[_LayerJob], bool]:
        """Convert ``layer`` once per (digest, prioritized list) in this run.

        Returns the job and whether an earlier manifest already asked for it.
        """
        key = (layer.digest, prioritized)
        with self._lock:
            fut = self._converted.get(key)
            if fut is not None:
                return fut, True
            fut = self.pool.submit(self._layer_job, layer, prioritized, by_path)
            self._converted[key] = fut
            return fut, False

    # --- manifests --------------------------------------------------------

    def manifest(self, desc: Descriptor, data: bytes) -> tuple[Descriptor, bytes]:
        m = load_json_object(data, f"manifest {desc.digest}")
        media_type = desc.media_type or m.get("mediaType") or OCI_MANIFEST
        if media_type not in MANIFEST_TYPES:
            raise InvalidInput(f"manifest {desc.digest} has unsupported media type {media_type!r}")
        docker = media_type == DOCKER_MANIFEST and not self.options.oci
        config_desc, config, layers = self._config(desc, m)
        rootfs = config["rootfs"]

        records = self.options.records
        by_path = bool(self.options.fallback_paths) and \
            not any(key[0] == desc.digest for key in records)
        jobs = [self.layer(layer, self.options.fallback_paths if by_path
                           else tuple(records.get((desc.digest, i), ())), by_path)
                for i, layer in enumerate(layers)]
        new_layers, diff_ids = [], []
        for i, (old, (fut, shared)) in enumerate(zip(layers, jobs, strict=True)):
            converted, res, action, seconds = fut.result()
            diff_ids.append(rootfs["diff_ids"][i] if res is None else res.diff_id)
            if docker:
                new = Descriptor(DOCKER_LAYER_GZIP, converted.digest, converted.size)
            else:
                # The source's own format annotations go: a stale zstd:chunked
                # one beside an eStargz TOC digest makes containers/storage
                # refuse the layer, and the other way round.
                kept = {k: v for k, v in old.annotations.items()
                        if k not in _FORMAT_ANNOTATIONS}
                media_type = converted.media_type if res is not None else OCI_LAYER_GZIP
                new = Descriptor(media_type, converted.digest, converted.size,
                                 {**kept, **converted.annotations})
            new_layers.append(new)
            report = LayerReport(desc.digest, i, old, new,
                                 "shared" if shared else action,
                                 0.0 if shared else round(seconds, 3), res)
            self.result.layers.append(report)
            if self.progress:
                self.progress("layer", report)

        config["rootfs"] = {**rootfs, "diff_ids": diff_ids}
        new_config = self._put_config(config, config_desc, docker)
        new_m = dict(m)
        new_m["schemaVersion"] = 2
        new_m["mediaType"] = DOCKER_MANIFEST if docker else OCI_MANIFEST
        new_m["config"] = new_config.to_json()
        new_m["layers"] = [layer.to_json() for layer in new_layers]
        raw = _dump(new_m)
        new_desc = Descriptor(new_m["mediaType"], sha256_digest(raw), len(raw),
                              desc.annotations, desc.platform, desc.extra)
        self.dest.put_manifest(raw, new_desc)
        self._warn_annotations(docker)
        return new_desc, raw

    def _config(self, desc: Descriptor,
                m: dict[str, Any]) -> tuple[Descriptor, dict[str, Any], list[Descriptor]]:
        """The config descriptor, the config (its ``rootfs`` checked against
        the layers) and the layer descriptors of manifest ``m``."""
        try:
            config_desc = Descriptor.from_json(m["config"])
            layers = [Descriptor.from_json(layer) for layer in m.get("layers") or []]
        except (KeyError, TypeError):
            raise InvalidInput(f"manifest {desc.digest} lacks a config or layers") from None
        if config_desc.size > _MAX_JSON:
            raise InvalidInput(f"config {config_desc.digest} is implausibly large")
        config_path = self._blob_file(config_desc)
        with open(config_path, "rb") as f:
            config = load_json_object(f.read(), f"config {config_desc.digest}")
        if config_path.startswith(self.work):
            os.unlink(config_path)
        rootfs = config.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        found = len(diff_ids) if isinstance(diff_ids, list) else 0
        if found != len(layers):  # (a rootfs or diff_ids of another type counts none)
            raise InvalidInput(f"config {config_desc.digest} has {found} "
                               f"diff_ids for {len(layers)} layers")
        return config_desc, config, layers

    def _put_config(self, config: dict[str, Any], old: Descriptor, docker: bool) -> Descriptor:
        """Store the rewritten ``config``; its new descriptor."""
        config_bytes = _dump(config)
        new_config = Descriptor(DOCKER_CONFIG if docker else OCI_CONFIG,
                                sha256_digest(config_bytes), len(config_bytes),
                                old.annotations)
        fd, cpath = tempfile.mkstemp(dir=self.work, suffix=".json")
        with os.fdopen(fd, "wb") as f:
            f.write(config_bytes)
        self.dest.put_blob(new_config, cpath)
        os.unlink(cpath)
        return new_config

    def _warn_annotations(self, docker: bool) -> None:
        """Say when the layers' TOC digests could not be stored."""
        if docker:
            self.result.warnings.append(
                "Docker schema 2 manifests cannot carry annotations: lazy pulling this "
                "image needs allow_no_verification in the snapshotter (drop "
                "--docker-media-types to write OCI manifests with TOC digests)")
        elif not self.dest.keeps_annotations:
            self.result.warnings.append(
                f"{self.dest.name} cannot store layer annotations: lazy pulling this "
                "image needs allow_no_verification in the snapshotter")

    def index(self, desc: Descriptor, data: bytes) -> tuple[Descriptor, bytes]:
        idx = load_json_object(data, f"index {desc.digest}")
        entries = [Descriptor.from_json(d) for d in idx.get("manifests") or []]
        wanted = self.options.platforms or (host_platform_default(),)
        selected = []
        for d in entries:
            platform = d.platform
            is_image = d.media_type in MANIFEST_TYPES and platform is not None \
                and platform.os != "unknown"
            if is_image and platform is not None and (
                    self.options.all_platforms or any(p.matches(platform) for p in wanted)):
                selected.append(d)
            else:
                label = str(d.platform) if d.platform else "no platform"
                kind = d.annotations.get("vnd.docker.reference.type") or d.media_type
                self.result.dropped.append(f"{d.digest} ({kind}, {label})")
        if not selected:
            have = ", ".join(sorted({str(d.platform) for d in entries if d.platform})) or "none"
            raise NotFound(f"no manifest for {', '.join(map(str, wanted))} in the index "
                           f"(platforms: {have})")
        new_entries = []
        for d in selected:
            new_entries.append(self.manifest(d, self.source.get_manifest(d))[0])
            self.result.platforms.append(str(d.platform))
        docker = all(d.media_type == DOCKER_MANIFEST for d in new_entries)
        new_idx = dict(idx)
        new_idx["schemaVersion"] = 2
        new_idx["mediaType"] = DOCKER_MANIFEST_LIST if docker else OCI_INDEX
        new_idx["manifests"] = [d.to_json() for d in new_entries]
        raw = _dump(new_idx)
        new_desc = Descriptor(new_idx["mediaType"], sha256_digest(raw), len(raw),
                              desc.annotations)
        self.dest.put_manifest(raw, new_desc)
        return new_desc, raw


def toc_image_reference(ref: ImageRef) -> ImageRef:
    """Where the TOC image of an image at ``ref`` goes: the same repository
    or layout, tag ``TAG-esgztoc`` (the reference's name, which the Stargz
    Snapshotter looks up)."""
    if ref.name is not None and ref.transport == "docker" and not ref.name.digest:
        return replace(ref, name=replace(ref.name, tag=(ref.name.tag or "latest") + "-esgztoc"))
    if ref.transport == "oci" and ref.tag:
        return replace(ref, tag=ref.tag + "-esgztoc")
    raise InvalidInput(f"{ref}: an external TOC needs a tagged docker:// or oci:PATH:TAG "
                       "destination, beside which the TOC image is named TAG-esgztoc")


def convert_image(src: str, dst: str, options: ImageConvertOptions = ImageConvertOptions(),
                  progress: ProgressFn | None = None) -> ImageResult:
    """Convert image ``src`` to eStargz at ``dst`` (both skopeo-style references).

    The destination shows nothing until everything is stored; on any error
    (or Ctrl-C) what was written is removed where the transport allows.
    """
    sref = parse_reference(src)
    with open_source(sref, options.src) as source:
        return convert_source(source, dst, options, progress, source_name=str(sref))


def convert_source(source: ImageSource, dst: str,
                   options: ImageConvertOptions = ImageConvertOptions(),
                   progress: ProgressFn | None = None, *,
                   source_name: str | None = None) -> ImageResult:
    """:func:`convert_image` from an already open ``source`` (left open).

    The image converted is whatever ``source.root()`` returns, so a source
    that pins its root (:class:`~estargz.image.staged.StagedSource`) makes
    this convert exactly the image the caller has already read.
    ``source_name`` is how the result names it (default ``source.name``).
    """
    started = time.monotonic()
    dref = parse_reference(dst)
    # Named before any work: a destination without a tag cannot have one.
    toc_ref = toc_image_reference(dref) if options.layer.external_toc else None
    result = ImageResult(source_name or source.name, str(dref))
    # In TMPDIR, named so that the next run removes it if this one is killed.
    with owned_tempdir("convert") as owned:
        work = owned.path
        dest = open_destination(dref, options.dst)
        run = _Run(source, dest, options, work, progress, result)
        try:
            data, media_type = source.root()
            obj = load_json_object(data, f"{source.name} manifest")
            media_type = media_type or obj.get("mediaType") or (
                OCI_INDEX if "manifests" in obj else OCI_MANIFEST)
            root = Descriptor(media_type, sha256_digest(data), len(data))
            if media_type in INDEX_TYPES:
                new_root, raw = run.index(root, data)
            else:
                new_root, raw = run.manifest(root, data)
            dest.commit(new_root, raw)
            if toc_ref is not None:
                result.toc_image = str(toc_ref)
                result.toc_image_digest = run.write_toc_image(toc_ref).digest
        except BaseException as e:
            run.stop(cancelled=isinstance(e, (KeyboardInterrupt, Cancelled)))
            dest.abort()
            raise
        finally:
            run.pool.shutdown(wait=not cancel_requested())
            dest.close()
    result.digest = new_root.digest
    result.media_type = new_root.media_type
    result.warnings = list(dict.fromkeys(result.warnings))
    result.seconds = round(time.monotonic() - started, 3)
    return result
