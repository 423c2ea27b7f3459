"""Finding the SOCI indexes bound to an image, as the SOCI Snapshotter does:
v2 indexes listed in the image's index (``artifactType`` v2), v1 indexes
that refer to one of its manifests (referrers API or tag schema, where the
transport can list referrers)."""

from __future__ import annotations

from dataclasses import dataclass

from .._exceptions import InvalidInput
from ..layer.jsondoc import load_json_object
from .descriptor import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    sha256_digest,
)
from .sociindex import (
    IMAGE_MANIFEST_DIGEST_ANNOTATION,
    SOCI_INDEX_V1,
    SOCI_INDEX_V2,
    SociIndex,
    parse_index_manifest,
)
from .store import ImageSource

__all__ = ["BoundIndex", "find_soci_indexes"]


@dataclass(frozen=True)
class BoundIndex:
    """A SOCI index found for an image."""

    #: The index manifest's descriptor (``artifactType`` in ``extra``).
    descriptor: Descriptor
    index: SociIndex
    #: The image manifest it indexes.
    manifest: str


def find_soci_indexes(source: ImageSource, root: bytes, media_type: str) -> list[BoundIndex]:
    """The SOCI indexes bound to the image whose root manifest or index is
    ``root``; a listed index that is not a SOCI index is :class:`InvalidInput`."""
    obj = load_json_object(root, f"{source.name} manifest")
    media_type = media_type or str(obj.get("mediaType") or "") or (
        OCI_INDEX if "manifests" in obj else OCI_MANIFEST)
    if media_type in INDEX_TYPES:
        entries = [Descriptor.from_json(d) for d in obj.get("manifests") or []]
    elif media_type in MANIFEST_TYPES:
        entries = [Descriptor(media_type, sha256_digest(root), len(root))]
    else:
        raise InvalidInput(f"{source.name}: {media_type!r} is not an image manifest or index")
    found: list[BoundIndex] = []
    for d in entries:
        if d.extra.get("artifactType") == SOCI_INDEX_V2:
            index = parse_index_manifest(source.get_manifest(d), f"SOCI index {d.digest}")
            found.append(BoundIndex(d, index, d.annotations.get(
                IMAGE_MANIFEST_DIGEST_ANNOTATION, "")))
    for d in entries:
        if d.media_type in MANIFEST_TYPES and d.extra.get("artifactType") is None:
            for ref in source.referrers(d, SOCI_INDEX_V1):
                index = parse_index_manifest(source.get_manifest(ref), f"SOCI index {ref.digest}")
                found.append(BoundIndex(ref, index, d.digest))
    return found
