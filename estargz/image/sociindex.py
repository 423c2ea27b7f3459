"""SOCI index documents: the index manifest, the zTOC and prefetch
descriptors in it, and the v2 binding (the image index that carries it).

The SOCI Snapshotter (github.com/awslabs/soci-snapshotter, v0.16.1 read for
these facts, ``soci/soci_index.go`` and ``soci/soci_convert.go``) lazily
loads an *unchanged* image with the help of a SOCI index: an OCI image
manifest whose config descriptor's media type names the index version, whose
layers are one zTOC per indexed image layer (``application/octet-stream``,
annotated with the layer's digest and media type and the span size) followed
by prefetch artifacts, and whose annotations name the build tool.

* **v1** binds the index to the image by ``subject`` (the image manifest):
  the snapshotter finds it with the referrers API or its tag-schema fallback.
* **v2** (soci's default since v0.10) binds it the other way round: a new image
  index lists the image manifest, annotated with
  ``com.amazon.soci.index-digest``, and the SOCI index manifest (with
  ``artifactType`` and the platform).  The snapshotter reads that annotation
  from the manifest it pulls.  Adding an annotation gives the manifest a new
  digest (soci's ``convert`` also rewrites a Docker manifest with OCI media
  types, which it needs to carry one); the layers and the config stay
  byte for byte, and the original manifest stays where it was.

All JSON is written as Go's ``encoding/json`` writes these structs (field
order, no spaces, sorted annotation keys, ``<>&`` escaped), so that the
same inputs give the same digests as ``soci``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._exceptions import InvalidInput
from ..layer.jsondoc import load_json_object
from .descriptor import (
    DOCKER_LAYER_GZIP,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    sha256_digest,
)

__all__ = [
    "BUILD_TOOL_ANNOTATION",
    "DEFAULT_MIN_LAYER_SIZE",
    "DEFAULT_SPAN_SIZE",
    "DISABLE_XATTRS_ANNOTATION",
    "EMPTY_CONFIG",
    "IMAGE_MANIFEST_DIGEST_ANNOTATION",
    "INDEX_DIGEST_ANNOTATION",
    "LAYER_DIGEST_ANNOTATION",
    "LAYER_MEDIA_TYPE_ANNOTATION",
    "PREFETCH_MEDIA_TYPE",
    "SOCI_INDEX_V1",
    "SOCI_INDEX_V2",
    "SPAN_SIZE_ANNOTATION",
    "ZTOC_MEDIA_TYPE",
    "SociIndex",
    "annotated_manifest",
    "go_json",
    "index_manifest",
    "parse_index_manifest",
    "v2_image_index",
    "ztoc_descriptor",
    "ztoc_layer_kind",
]

SOCI_INDEX_V1 = "application/vnd.amazon.soci.index.v1+json"
SOCI_INDEX_V2 = "application/vnd.amazon.soci.index.v2+json"
#: The media type of a zTOC blob in an index.
ZTOC_MEDIA_TYPE = "application/octet-stream"
PREFETCH_MEDIA_TYPE = "application/vnd.amazon.soci.prefetch.v1+json"
LAYER_MEDIA_TYPE_ANNOTATION = "com.amazon.soci.image-layer-mediaType"
LAYER_DIGEST_ANNOTATION = "com.amazon.soci.image-layer-digest"
SPAN_SIZE_ANNOTATION = "com.amazon.soci.span-size"
BUILD_TOOL_ANNOTATION = "com.amazon.soci.build-tool-identifier"
DISABLE_XATTRS_ANNOTATION = "com.amazon.soci.disable-xattrs"
#: On a v2 SOCI index's descriptor in the image index: the manifest it indexes.
IMAGE_MANIFEST_DIGEST_ANNOTATION = "com.amazon.soci.image-manifest-digest"
#: On a v2-bound image manifest: the digest of its SOCI index manifest.
INDEX_DIGEST_ANNOTATION = "com.amazon.soci.index-digest"
#: The config of every SOCI index manifest (OCI 1.0 manifests need one).
EMPTY_CONFIG = b"{}"
DEFAULT_SPAN_SIZE = 4 << 20
DEFAULT_MIN_LAYER_SIZE = 10 << 20

#: Layer media types soci indexes, by compression (soci v0.16.1 accepts tar,
#: gzip and the "unknown" of a Docker layer; it skips zstd layers).
_GZIP_LAYERS = (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP,
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")
_TAR_LAYERS = (OCI_LAYER, "application/vnd.oci.image.layer.nondistributable.v1.tar",
               "application/vnd.docker.image.rootfs.diff.tar")
_ZSTD_LAYERS = ("application/vnd.oci.image.layer.v1.tar+zstd",
                "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd")


def ztoc_layer_kind(media_type: str) -> str | None:
    """How soci treats a layer of ``media_type``: ``"gzip"`` or
    ``"uncompressed"`` (indexed, the zTOC's compression algorithm), ``None``
    for a layer it skips (zstd); anything that is not a layer at all is
    :class:`InvalidInput`, as in ``soci create``."""
    if media_type in _GZIP_LAYERS:
        return "gzip"
    if media_type in _TAR_LAYERS:
        return "uncompressed"
    if media_type in _ZSTD_LAYERS:
        return None
    raise InvalidInput(f"{media_type!r} is not a layer media type soci knows")


def go_json(obj: Any) -> bytes:
    """``obj`` serialized as Go's ``json.Marshal`` does: compact, UTF-8,
    with ``<``, ``>``, ``&``, U+2028 and U+2029 escaped.  Field order is
    the caller's (dicts keep it); annotation maps must come sorted."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text.encode()


def _go_platform(p: Platform) -> dict[str, Any]:
    out: dict[str, Any] = {"architecture": p.architecture, "os": p.os}
    for key in ("os.version", "os.features"):
        if p.extra.get(key):
            out[key] = p.extra[key]
    if p.variant:
        out["variant"] = p.variant
    return out


def _go_descriptor(d: Descriptor, artifact_type: str = "") -> dict[str, Any]:
    """A descriptor in image-spec v1.1's Go field order."""
    out: dict[str, Any] = {"mediaType": d.media_type, "digest": d.digest, "size": d.size}
    if d.extra.get("urls"):
        out["urls"] = d.extra["urls"]
    if d.annotations:
        out["annotations"] = dict(sorted(d.annotations.items()))
    if d.extra.get("data"):
        out["data"] = d.extra["data"]
    if d.platform is not None:
        out["platform"] = _go_platform(d.platform)
    artifact_type = artifact_type or str(d.extra.get("artifactType") or "")
    if artifact_type:
        out["artifactType"] = artifact_type
    return out


def ztoc_descriptor(ztoc: bytes, layer: Descriptor, span_size: int,
                    disable_xattrs: bool = False) -> Descriptor:
    """The descriptor of zTOC blob ``ztoc`` for image layer ``layer``."""
    ann = {LAYER_MEDIA_TYPE_ANNOTATION: layer.media_type,
           LAYER_DIGEST_ANNOTATION: layer.digest,
           SPAN_SIZE_ANNOTATION: str(span_size)}
    if disable_xattrs:
        ann[DISABLE_XATTRS_ANNOTATION] = "true"
    return Descriptor(ZTOC_MEDIA_TYPE, sha256_digest(ztoc), len(ztoc), ann)


def index_manifest(version: str, blobs: Sequence[Descriptor], build_tool: str,
                   subject: Descriptor | None = None) -> bytes:
    """The SOCI index manifest (``version`` ``"v1"`` or ``"v2"``): zTOC and
    prefetch descriptors in ``blobs``; v1 needs ``subject``, v2 has none."""
    if version not in ("v1", "v2"):
        raise InvalidInput(f"SOCI index version {version!r} is not v1 or v2")
    if (version == "v1") != (subject is not None):
        raise InvalidInput("a v1 SOCI index refers to its image manifest; a v2 one does not")
    config = {"mediaType": SOCI_INDEX_V1 if version == "v1" else SOCI_INDEX_V2,
              "digest": sha256_digest(EMPTY_CONFIG), "size": len(EMPTY_CONFIG)}
    manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                "config": config,
                                "layers": [_go_descriptor(b) for b in blobs]}
    if subject is not None:
        manifest["subject"] = {"mediaType": subject.media_type, "digest": subject.digest,
                               "size": subject.size}
    manifest["annotations"] = {BUILD_TOOL_ANNOTATION: build_tool}
    return go_json(manifest)


@dataclass(frozen=True)
class SociIndex:
    """A parsed SOCI index manifest."""

    version: str
    #: zTOC descriptors, in the index's order.
    ztocs: tuple[Descriptor, ...]
    #: Prefetch artifact descriptors.
    prefetch: tuple[Descriptor, ...]
    subject: Descriptor | None
    annotations: Mapping[str, str]

    def ztoc_for(self, layer_digest: str) -> Descriptor | None:
        """The zTOC descriptor of image layer ``layer_digest``, if indexed."""
        for d in self.ztocs:
            if d.annotations.get(LAYER_DIGEST_ANNOTATION) == layer_digest:
                return d
        return None


def parse_index_manifest(data: bytes, what: str = "SOCI index") -> SociIndex:
    """Read a SOCI index manifest; anything else is :class:`InvalidInput`."""
    m = load_json_object(data, what)
    config = m.get("config")
    kind = config.get("mediaType") if isinstance(config, dict) else None
    versions = {SOCI_INDEX_V1: "v1", SOCI_INDEX_V2: "v2"}
    if not isinstance(kind, str) or kind not in versions:
        raise InvalidInput(f"{what} is not a SOCI index (config media type "
                           f"{str(kind)[:80]!r})")
    layers = m.get("layers")
    if not isinstance(layers, list):
        raise InvalidInput(f"{what} has no layers list")
    blobs = [Descriptor.from_json(d) for d in layers]
    for b in blobs:
        if not all(isinstance(v, str) for v in b.annotations.values()):
            raise InvalidInput(f"{what}: blob {b.digest} has annotations that are not strings")
        if not b.annotations.get(LAYER_DIGEST_ANNOTATION):
            raise InvalidInput(f"{what}: blob {b.digest} names no image layer "
                               f"({LAYER_DIGEST_ANNOTATION})")
        if b.media_type == ZTOC_MEDIA_TYPE:
            span = b.annotations.get(SPAN_SIZE_ANNOTATION, "")
            if not span.isdigit():
                raise InvalidInput(f"{what}: zTOC {b.digest} has no valid span size")
        elif b.media_type != PREFETCH_MEDIA_TYPE:
            raise InvalidInput(f"{what}: blob {b.digest} has media type "
                               f"{b.media_type!r}, not a zTOC or prefetch artifact")
    subject = m.get("subject")
    ann = m.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(v, str) for v in ann.values()):
        raise InvalidInput(f"{what} has malformed annotations")
    return SociIndex(versions[kind],
                     tuple(b for b in blobs if b.media_type == ZTOC_MEDIA_TYPE),
                     tuple(b for b in blobs if b.media_type == PREFETCH_MEDIA_TYPE),
                     Descriptor.from_json(subject) if subject is not None else None, ann)


def annotated_manifest(data: bytes, index_digest: str, what: str = "manifest") -> bytes:
    """Image manifest ``data`` bound to a v2 SOCI index, as ``soci convert``
    writes it: OCI media types for the manifest and its config descriptor
    (layers keep theirs) and the ``com.amazon.soci.index-digest`` annotation.
    Fields Go's ``ocispec.Manifest`` does not know are dropped, as there."""
    m = load_json_object(data, what)
    config = Descriptor.from_json(m.get("config"))
    layers = m.get("layers")
    if not isinstance(layers, list):
        raise InvalidInput(f"{what} has no layers list")
    ann = m.get("annotations") or {}
    if not isinstance(ann, dict):
        raise InvalidInput(f"{what} has malformed annotations")
    ann = {**ann, INDEX_DIGEST_ANNOTATION: index_digest}
    out: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
    if isinstance(m.get("artifactType"), str) and m["artifactType"]:
        out["artifactType"] = m["artifactType"]
    out["config"] = _go_descriptor(config.replace(media_type=OCI_CONFIG))
    out["layers"] = [_go_descriptor(Descriptor.from_json(d)) for d in layers]
    if isinstance(m.get("subject"), dict):
        out["subject"] = _go_descriptor(Descriptor.from_json(m["subject"]))
    out["annotations"] = dict(sorted(ann.items()))
    return go_json(out)


def v2_image_index(original: Mapping[str, Any] | None, entries: Sequence[Descriptor],
                   ) -> bytes:
    """The image index of a v2 binding.

    ``original``: the source's own image index (its other entries and
    annotations are kept, as ``soci convert`` keeps them) or ``None`` for a
    single-manifest image.  ``entries``: every manifest descriptor to list,
    bound manifests and their SOCI indexes (``artifactType`` in ``extra``)
    included, in order."""
    out: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX}
    if original is not None and isinstance(original.get("artifactType"), str) \
            and original["artifactType"]:
        out["artifactType"] = original["artifactType"]
    out["manifests"] = [_go_descriptor(d) for d in entries]
    if original is not None:
        if isinstance(original.get("subject"), dict):
            out["subject"] = _go_descriptor(Descriptor.from_json(original["subject"]))
        ann = original.get("annotations")
        if isinstance(ann, dict) and ann:
            out["annotations"] = dict(sorted(ann.items()))
    return go_json(out)
