"""Records in a registry, attached to their image: :func:`push_record`,
:func:`fetch_record`, :func:`find_record`.

A record travels as an OCI 1.1 artifact (:func:`estargz.image.records.record_artifact`)
whose ``subject`` is the profiled image, as cosign signatures, SBOMs and SOCI
indexes do, so that a pipeline that profiles once converts anywhere:
``convert --record-from-referrers`` finds it by the source image's digest.

Registries without the referrers API (OCI distribution 1.1; Distribution
2.x, Debian's ``docker-registry`` 2.8 among them) get the spec's *referrers
tag schema*: the client keeps an image index under the tag ``sha256-HEX``
(the subject's digest) listing the referrers, and readers fall back to it
when ``GET /v2/REPO/referrers/DIGEST`` answers 404.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any

from .._exceptions import InvalidInput, NotFound
from ..image.descriptor import OCI_INDEX, OCI_MANIFEST, Descriptor, sha256_digest
from ..image.records import (
    CREATED,
    EMPTY_JSON,
    RECORD_ARTIFACT_TYPE,
    RECORD_FILE_NAME,
    record_artifact,
    record_blob,
)
from ..layer.jsondoc import load_json_object
from ..layer.toc import clean_name
from .client import RegistryClient

__all__ = ["RecordPush", "fallback_tag", "fetch_record", "find_record", "push_record",
           "referrers"]

#: Largest record read (a record is about 150 bytes a file).
RECORD_LIMIT = 64 << 20
_ARTIFACT_ACCEPT = (OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json")


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def fallback_tag(digest: str) -> str:
    """The referrers tag schema's tag for ``digest``: ``sha256-HEX``."""
    algorithm, _, hex_part = digest.partition(":")
    return f"{algorithm}-{hex_part}"


@dataclass(frozen=True)
class RecordPush:
    """Where :func:`push_record` put a record."""

    #: ``HOST/REPO@sha256:…`` of the artifact manifest.
    reference: str
    digest: str
    subject: str
    #: ``referrers API`` (the registry indexed the subject itself) or
    #: ``tag sha256-HEX`` (the tag schema index was updated).
    found_by: str


def push_record(client: RegistryClient, repo: str, record: bytes, subject: Descriptor,
                created: str | None = None, tag: str | None = None) -> RecordPush:
    """Push ``record`` (JSON lines) to ``repo`` as an artifact referring to
    ``subject``; also under ``tag`` if given.  Where the registry does not
    index referrers itself, the ``sha256-HEX`` tag index is updated."""
    manifest, desc = record_artifact(record, subject, created)
    for blob in (EMPTY_JSON, record):  # the client uploads files
        with tempfile.NamedTemporaryFile(prefix="estargz-record-") as f:
            f.write(blob)
            f.flush()
            client.upload_blob(repo, sha256_digest(blob), len(blob), f.name)
    digest, indexed = client.put_referrer(repo, manifest, OCI_MANIFEST)
    found_by = "referrers API"
    # OCI-Subject alone is not trusted: some registries send it without
    # serving the API (sigstore-js found ECR doing so), and readers fall
    # back to the tag only on a 404.
    if not indexed or client.get_referrers(repo, subject.digest, RECORD_ARTIFACT_TYPE) is None:
        found_by = f"tag {_add_to_fallback_index(client, repo, subject.digest, desc)}"
    if tag:
        client.put_manifest(repo, tag, manifest, OCI_MANIFEST)
    return RecordPush(f"{client.host}/{repo}@{digest}", digest, subject.digest, found_by)


def _add_to_fallback_index(client: RegistryClient, repo: str, subject: str,
                           desc: Descriptor) -> str:
    tag = fallback_tag(subject)
    try:
        data, _, _ = client.get_manifest(repo, tag, (OCI_INDEX,))
    except NotFound:
        index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    else:
        index = load_json_object(data, f"referrers index {client.host}/{repo}:{tag}")
    manifests = [m for m in _list(index.get("manifests")) if isinstance(m, dict)]
    if not any(m.get("digest") == desc.digest for m in manifests):
        index["manifests"] = [*manifests, desc.to_json()]
        client.put_manifest(repo, tag, json.dumps(index, indent=2).encode(), OCI_INDEX)
    return tag


def referrers(client: RegistryClient, repo: str, subject: str,
              artifact_type: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """The manifests in ``repo`` that refer to ``subject`` (of
    ``artifact_type`` if given): ``(descriptors, how they were found)``,
    by the referrers API or, where it is missing, the tag schema."""
    found = client.get_referrers(repo, subject, artifact_type)
    if found is not None:
        return found, "referrers API"
    tag = fallback_tag(subject)
    try:
        data, _, _ = client.get_manifest(repo, tag, (OCI_INDEX,))
    except NotFound:
        return [], f"tag {tag}"
    index = load_json_object(data, f"referrers index {client.host}/{repo}:{tag}")
    return [m for m in _list(index.get("manifests")) if isinstance(m, dict)
            and (artifact_type is None or m.get("artifactType") == artifact_type)], f"tag {tag}"


def fetch_record(client: RegistryClient, repo: str, reference: str) -> bytes:
    """The record held by the artifact ``repo`` ``reference`` (tag or
    digest): ours, or stargz-snapshotter PR #642's record file image."""
    data, _, _ = client.get_manifest(repo, reference, _ARTIFACT_ACCEPT)
    manifest = load_json_object(data, f"manifest {client.host}/{repo}:{reference}")
    desc, packed = record_blob(manifest)
    if desc.size > RECORD_LIMIT:
        raise InvalidInput(f"the record {desc.digest} in {client.host}/{repo} is "
                           f"{desc.size} bytes, more than a record can plausibly be")
    buf = io.BytesIO()
    client.download_blob(repo, desc.digest, desc.size, buf)
    return _unpack(buf.getvalue(), desc.digest) if packed else buf.getvalue()


def _unpack(blob: bytes, digest: str) -> bytes:
    """``stargz.record.json`` from a record file image's tar+gzip layer."""
    try:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob)), mode="r:") as tar:
            for member in tar:
                if member.isreg() and clean_name(member.name) == RECORD_FILE_NAME:
                    f = tar.extractfile(member)
                    assert f is not None  # a regular file
                    return f.read(RECORD_LIMIT)
    except (OSError, EOFError, tarfile.TarError) as e:
        raise InvalidInput(f"record layer {digest} is not a tar+gzip: {e}") from None
    raise InvalidInput(f"record layer {digest} holds no {RECORD_FILE_NAME}")


def find_record(client: RegistryClient, repo: str,
                subject: str) -> tuple[bytes, str, list[str]]:
    """The record attached to ``subject`` in ``repo``: ``(record, artifact
    digest, notes)``.  Of several, the newest by ``created`` annotation is
    taken, and a note says so; none is :class:`NotFound`."""
    found, how = referrers(client, repo, subject, RECORD_ARTIFACT_TYPE)
    if not found:
        raise NotFound(f"no estargz record refers to {subject} in {client.host}/{repo} "
                       f"(looked up by {how}); push one with optimize --record-out "
                       f"docker://{client.host}/{repo}")

    def created(m: dict[str, Any]) -> str:
        ann = m.get("annotations")
        value = ann.get(CREATED) if isinstance(ann, dict) else None
        return value if isinstance(value, str) else ""

    chosen = max(found, key=created)  # RFC 3339 in UTC sorts as text
    notes = []
    if len(found) > 1:
        notes.append(f"{len(found)} records refer to {subject}; using the newest, "
                     f"{chosen.get('digest')} ({created(chosen) or 'no date'})")
    digest = str(chosen.get("digest"))
    return fetch_record(client, repo, digest), digest, notes
