"""The ``docker://`` transport: images in a registry, through :mod:`estargz.registry`.

Blobs are pushed first, then child manifests by digest, and the tag last
(in :meth:`RegistryDestination.commit`), so a tag never names an image whose
content is not all there.
"""

from __future__ import annotations

from typing import BinaryIO

from .._exceptions import InvalidInput
from ..image.descriptor import INDEX_TYPES, MANIFEST_TYPES, Descriptor
from ..image.reference import ImageRef, parse_docker_name
from ..image.store import ImageDestination, ImageSource, TransportOptions
from ..image.transport import Transport, register_transport
from ..layer.source import RangeSource
from ..registry.client import RegistryClient, client_for
from ..registry.referrers import push_referrer, referrers

ACCEPT = (*INDEX_TYPES, *MANIFEST_TYPES)


def _client(ref: ImageRef, options: TransportOptions) -> RegistryClient:
    assert ref.name is not None
    return client_for(ref.name.registry, options)


class RegistrySource(ImageSource):
    """An image in a registry."""

    def __init__(self, ref: ImageRef, options: TransportOptions) -> None:
        assert ref.name is not None
        self.ref = ref.name
        self.repo = ref.name.repository
        self.name = f"docker://{ref.name}"
        self.origin = (ref.name.registry, ref.name.repository)
        self.client = _client(ref, options)

    def root(self) -> tuple[bytes, str]:
        data, media_type, _ = self.client.get_manifest(self.repo, self.ref.reference, ACCEPT)
        return data, media_type

    def get_manifest(self, desc: Descriptor) -> bytes:
        data, _, _ = self.client.get_manifest(self.repo, desc.digest, ACCEPT)
        if len(data) != desc.size:
            raise InvalidInput(f"{self.name}: manifest {desc.digest} is {len(data)} bytes, "
                               f"its descriptor says {desc.size}")
        return data

    def fetch_blob(self, desc: Descriptor, dst: BinaryIO) -> None:
        self.client.download_blob(self.repo, desc.digest, desc.size, dst)

    def range_source(self, desc: Descriptor) -> RangeSource | None:
        """Read a blob by HTTP range requests (e.g. an eStargz layer's TOC)."""
        return self.client.blob_source(self.repo, desc.digest, desc.size)

    def referrers(self, subject: Descriptor, artifact_type: str) -> list[Descriptor]:
        found, _ = referrers(self.client, self.repo, subject.digest, artifact_type)
        return [Descriptor.from_json(d) for d in found]

    def close(self) -> None:
        self.client.close()


class RegistryDestination(ImageDestination):
    """Push an image to a registry, tagging it last."""

    def __init__(self, ref: ImageRef, options: TransportOptions) -> None:
        assert ref.name is not None
        if ref.name.digest:
            raise InvalidInput(f"destination docker://{ref.name} names a digest; "
                               "push to a tag")
        self.ref = ref.name
        self.repo = ref.name.repository
        self.name = f"docker://{ref.name}"
        self.registry_host = ref.name.registry
        self.client = _client(ref, options)

    def has_blob(self, desc: Descriptor) -> bool:
        return self.client.head_blob(self.repo, desc.digest) is not None

    def put_blob(self, desc: Descriptor, path: str, *, mount_from: str | None = None) -> None:
        self.client.upload_blob(self.repo, desc.digest, desc.size, path, mount_from=mount_from)

    def put_manifest(self, data: bytes, desc: Descriptor) -> None:
        self.client.put_manifest(self.repo, desc.digest, data, desc.media_type)

    def commit(self, root: Descriptor, root_data: bytes) -> None:
        self.client.put_manifest(self.repo, self.ref.tag or "latest", root_data, root.media_type)

    holds_referrers = True

    def put_referrer(self, data: bytes, desc: Descriptor, subject: Descriptor) -> str:
        return push_referrer(self.client, self.repo, data, desc, subject.digest,
                             str(desc.extra.get("artifactType", "")))

    def close(self) -> None:
        self.client.close()


class DockerTransport(Transport):
    """``docker://[HOST[:PORT]/]REPO[:TAG|@DIGEST]``."""

    name = "docker"

    def parse(self, rest: str, text: str) -> ImageRef:
        if not rest.startswith("//"):
            raise InvalidInput(f"use docker://{rest.lstrip('/')} for a registry image")
        if not rest[2:]:
            raise InvalidInput("docker:// reference lacks an image name")
        return ImageRef(self.name, name=parse_docker_name(rest[2:]), separator="://")

    def open_source(self, ref: ImageRef, options: TransportOptions) -> ImageSource:
        return RegistrySource(ref, options)

    def open_destination(self, ref: ImageRef, options: TransportOptions) -> ImageDestination:
        return RegistryDestination(ref, options)


register_transport(DockerTransport())
