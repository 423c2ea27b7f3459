"""Image references: the parsed record every transport produces, and the
Docker image names several of them share.

Each transport parses its own ``TRANSPORT:...`` syntax (see
:mod:`estargz.image.transport`); the pieces they have in common live here.
Pure parsing; no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .._exceptions import InvalidInput

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")


@dataclass(frozen=True)
class DockerName:
    """A registry reference: ``registry/repository`` plus a tag or a digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """Host (and port) to talk to: Docker Hub's API lives elsewhere."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """The tag or digest, as the registry API wants it in a manifest URL."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        if self.digest:
            return f"{self.registry}/{self.repository}@{self.digest}"
        return f"{self.registry}/{self.repository}:{self.tag or 'latest'}"


def parse_docker_name(text: str, *, default_tag: str | None = "latest") -> DockerName:
    """Parse ``[HOST[:PORT]/]REPO[:TAG][@DIGEST]`` with Docker's normalisation
    (``busybox`` is ``docker.io/library/busybox:latest``)."""
    name, digest = text, None
    if "@" in text:
        name, digest = text.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise InvalidInput(f"invalid digest {digest!r} in image reference {text!r}")
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG_RE.match(tag):
            raise InvalidInput(f"invalid tag {tag!r} in image reference {text!r}")
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry, path = parts[0], parts[1:]
    else:
        registry, path = DOCKER_HUB, parts
        if len(path) == 1:
            path = ["library", *path]
    if not path or not all(_COMPONENT_RE.match(c) for c in path):
        raise InvalidInput(f"invalid repository name in image reference {text!r}")
    if tag is None and digest is None:
        tag = default_tag
    return DockerName(registry, "/".join(path), tag, digest)


@dataclass(frozen=True)
class ImageRef:
    """A parsed ``TRANSPORT:...`` reference."""

    transport: str
    #: Local path for oci, oci-archive and docker-archive.
    path: str = ""
    #: Tag inside an OCI layout or archive (``org.opencontainers.image.ref.name``).
    tag: str | None = None
    #: Registry or daemon image name (docker, docker-daemon, docker-archive).
    name: DockerName | None = None
    #: What separates the transport from the rest: ``://`` for ``docker://``.
    separator: str = ":"

    def __str__(self) -> str:
        if not self.path:
            return f"{self.transport}{self.separator}{self.name}"
        suffix = f":{self.name}" if self.name else (f":{self.tag}" if self.tag else "")
        return f"{self.transport}{self.separator}{self.path}{suffix}"


def check_tag(tag: str, text: str) -> str:
    """``tag`` if it is a valid tag (of a layout, archive or repository), else raise."""
    if not _TAG_RE.match(tag):
        raise InvalidInput(f"invalid tag {tag!r} in {text!r}")
    return tag


def split_path(transport: str, rest: str) -> tuple[str, str]:
    """``PATH[:SUFFIX]`` of a file-based transport: ``(path, suffix)``."""
    path, _, suffix = rest.partition(":")
    if not path:
        raise InvalidInput(f"{transport}: reference lacks a path")
    return path, suffix
