"""Image references with the transports people know from skopeo.

``oci:PATH[:TAG]`` (a bare PATH means the same), ``oci-archive:PATH[:TAG]``,
``docker-archive:PATH[:NAME[:TAG]]``, ``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``
and ``docker-daemon:NAME[:TAG]``. Pure parsing; no I/O.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from ._exceptions import InvalidInput

TRANSPORTS = ("oci", "oci-archive", "docker-archive", "docker", "docker-daemon")
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
    tag: Optional[str] = None
    digest: Optional[str] = None

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


def parse_docker_name(text: str, *, default_tag: Optional[str] = "latest") -> DockerName:
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
    tag: Optional[str] = None
    #: Registry or daemon image name (docker, docker-daemon, docker-archive).
    name: Optional[DockerName] = None

    def __str__(self) -> str:
        if self.transport == "docker":
            return f"docker://{self.name}"
        if self.transport == "docker-daemon":
            return f"docker-daemon:{self.name}"
        suffix = f":{self.name}" if self.name else (f":{self.tag}" if self.tag else "")
        return f"{self.transport}:{self.path}{suffix}"


def parse_reference(text: str) -> ImageRef:
    """Parse an image reference; a string without a known transport is an OCI
    layout path. Raises :class:`InvalidInput` naming what is wrong."""
    if text.startswith("docker://"):
        rest = text[len("docker://"):]
        if not rest:
            raise InvalidInput("docker:// reference lacks an image name")
        return ImageRef("docker", name=parse_docker_name(rest))
    transport, sep, rest = text.partition(":")
    if not sep:
        return ImageRef("oci", path=text)
    if transport not in TRANSPORTS:
        if os.path.isdir(transport) or "/" in transport:
            # A bare OCI layout path with a tag: ``./layout:v1``.
            return parse_reference("oci:" + text)
        raise InvalidInput(f"unknown transport {transport!r} in {text!r} "
                           f"(known: {', '.join(t + ':' for t in TRANSPORTS)})")
    if transport == "docker":
        raise InvalidInput(f"use docker://{rest.lstrip('/')} for a registry image")
    if transport == "docker-daemon":
        if not rest:
            raise InvalidInput("docker-daemon: reference lacks an image name")
        return ImageRef("docker-daemon", name=parse_docker_name(rest))
    path, sep, suffix = rest.partition(":")
    if not path:
        raise InvalidInput(f"{transport}: reference lacks a path")
    if transport == "docker-archive":
        return ImageRef(transport, path=path,
                        name=parse_docker_name(suffix) if suffix else None)
    if sep and not _TAG_RE.match(suffix):
        raise InvalidInput(f"invalid tag {suffix!r} in {text!r}")
    return ImageRef(transport, path=path, tag=suffix or None)
