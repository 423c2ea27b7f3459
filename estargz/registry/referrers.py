"""Artifacts that refer to an image (OCI 1.1 ``subject``): storing them so
readers find them by the image's digest, and listing them.

Registries without the referrers API (OCI distribution 1.1; Distribution
2.x, Debian's ``docker-registry`` 2.8 among them) get the spec's *referrers
tag schema*: the client keeps an image index under the tag ``sha256-HEX``
(the subject's digest) listing the referrers, and readers fall back to it
when ``GET /v2/REPO/referrers/DIGEST`` answers 404.  Records
(:mod:`.records`) and v1 SOCI indexes travel this way.
"""

from __future__ import annotations

import json
from typing import Any

from .._exceptions import NotFound
from ..image.descriptor import OCI_INDEX, OCI_MANIFEST, Descriptor
from ..layer.jsondoc import load_json_object
from .client import RegistryClient

__all__ = ["fallback_tag", "push_referrer", "referrers"]


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def fallback_tag(digest: str) -> str:
    """The referrers tag schema's tag for ``digest``: ``sha256-HEX``."""
    algorithm, _, hex_part = digest.partition(":")
    return f"{algorithm}-{hex_part}"


def push_referrer(client: RegistryClient, repo: str, manifest: bytes, desc: Descriptor,
                  subject: str, artifact_type: str) -> str:
    """Store artifact ``manifest`` (described by ``desc``, which carries its
    ``artifactType``; its blobs already uploaded) in ``repo`` so that readers
    find it from ``subject``: returns how, ``"referrers API"`` or ``"tag
    sha256-HEX"`` (the tag schema index, updated here)."""
    _, indexed = client.put_referrer(repo, manifest, OCI_MANIFEST)
    # OCI-Subject alone is not trusted: some registries send it without
    # serving the API (sigstore-js found ECR doing so), and readers fall
    # back to the tag only on a 404.
    if indexed and client.get_referrers(repo, subject, artifact_type) is not None:
        return "referrers API"
    return f"tag {_add_to_fallback_index(client, repo, subject, desc)}"


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
