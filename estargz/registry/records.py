"""Records in a registry, attached to their image: :func:`push_record`,
:func:`fetch_record`, :func:`find_record`.

A record travels as an OCI 1.1 artifact (:func:`estargz.image.records.record_artifact`)
whose ``subject`` is the profiled image, as cosign signatures, SBOMs and SOCI
indexes do, so that a pipeline that profiles once converts anywhere:
``convert --record-from-referrers`` finds it by the source image's digest.

How a referrer is stored and found, with or without the registry's
referrers API, is :mod:`.referrers`.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any

from .._exceptions import InvalidInput, NotFound
from ..image.descriptor import OCI_MANIFEST, Descriptor, sha256_digest
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
from .referrers import fallback_tag, push_referrer, referrers

__all__ = ["RecordPush", "fallback_tag", "fetch_record", "find_record", "push_record",
           "referrers"]

#: Largest record read (a record is about 150 bytes a file).
RECORD_LIMIT = 64 << 20
_ARTIFACT_ACCEPT = (OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json")


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
    found_by = push_referrer(client, repo, manifest, desc, subject.digest,
                             RECORD_ARTIFACT_TYPE)
    digest = desc.digest
    if tag:
        client.put_manifest(repo, tag, manifest, OCI_MANIFEST)
    return RecordPush(f"{client.host}/{repo}@{digest}", digest, subject.digest, found_by)


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
