"""Records of what a workload read: the ``ctr-remote optimize --record-out``
format that ``estargz convert --record-in`` takes, keyed by manifest digest
and layer index; and the OCI artifact that carries a record in a registry,
referring to the image it was made from (:func:`record_artifact`)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any

from .._exceptions import InvalidInput
from ..layer.jsondoc import load_json
from .descriptor import DOCKER_LAYER_GZIP, OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor, sha256_digest


def read_records(lines: Iterable[str]) -> dict[tuple[str, int], list[str]]:
    """Parse the record format of ``ctr-remote optimize --record-out``: JSON lines
    ``{"path": …, "manifestDigest": …, "layerIndex": …}``, paths kept in order."""
    out: dict[tuple[str, int], list[str]] = {}
    seen: set[tuple[str, int, str]] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = load_json(line, f"record line {n}")
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) \
                or type(rec.get("layerIndex")) is not int \
                or not isinstance(rec.get("manifestDigest"), str):
            raise InvalidInput(f"record line {n} lacks path, manifestDigest or layerIndex")
        key = (rec["manifestDigest"], rec["layerIndex"])
        if (*key, rec["path"]) not in seen:
            seen.add((*key, rec["path"]))
            out.setdefault(key, []).append(rec["path"])
    return out


# --- records as OCI artifacts that refer to their image ------------------------------

#: ``artifactType`` of a record artifact, and the media type of its one blob
#: (the record's JSON lines, as written to a file).
RECORD_ARTIFACT_TYPE = "application/vnd.estargz.record.v1+jsonl"
#: The blob's ``org.opencontainers.image.title`` (``oras pull`` saves it under
#: that name): the file name stargz-snapshotter's PR #642 gives the record in
#: its "record file image", whose one tar+gzip layer holds it.
RECORD_FILE_NAME = "stargz.record.json"
#: OCI 1.1's empty config, for an artifact that has no config of its own.
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"


def record_artifact(record: bytes, subject: Descriptor,
                    created: str | None = None) -> tuple[bytes, Descriptor]:
    """The OCI 1.1 artifact manifest holding ``record`` (JSON lines) and
    referring to ``subject``: ``(manifest bytes, its descriptor)``, the
    descriptor with ``artifactType`` and the annotations, as a referrers
    index lists it.  ``created`` (RFC 3339) lets readers pick the newest of
    several records of one image."""
    annotations = {CREATED: created} if created else {}
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": RECORD_ARTIFACT_TYPE,
        "config": {"mediaType": OCI_EMPTY, "digest": sha256_digest(EMPTY_JSON),
                   "size": len(EMPTY_JSON), "data": base64.b64encode(EMPTY_JSON).decode()},
        "layers": [{"mediaType": RECORD_ARTIFACT_TYPE, "digest": sha256_digest(record),
                    "size": len(record), "annotations": {TITLE: RECORD_FILE_NAME}}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest,
                    "size": subject.size},
        **({"annotations": annotations} if annotations else {}),
    }
    data = json.dumps(manifest, indent=2).encode()
    desc = Descriptor(OCI_MANIFEST, sha256_digest(data), len(data), annotations=annotations,
                      extra={"artifactType": RECORD_ARTIFACT_TYPE})
    return data, desc


def record_blob(manifest: dict[str, Any]) -> tuple[Descriptor, bool]:
    """The blob holding the record in a record artifact, or in PR #642's
    record file image: ``(descriptor, packed)``, ``packed`` when it is that
    image's tar+gzip layer (the record is its ``stargz.record.json``)."""
    layers = manifest.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        raise InvalidInput("not a record artifact: it does not have exactly one layer")
    desc = Descriptor.from_json(layers[0])
    if manifest.get("artifactType") == RECORD_ARTIFACT_TYPE \
            or desc.media_type == RECORD_ARTIFACT_TYPE:
        return desc, False
    if desc.media_type in (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP):
        return desc, True
    raise InvalidInput(f"not a record artifact: artifactType "
                       f"{manifest.get('artifactType')!r}, layer {desc.media_type!r}")
