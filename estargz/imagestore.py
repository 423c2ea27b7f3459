"""Where images come from and go to: the two small interfaces every transport
implements, and the factory that picks one from an image reference.

An :class:`ImageSource` hands out the root manifest or index the reference
names, child manifests by descriptor, and blobs (verified against their
descriptor's digest and size before use). An :class:`ImageDestination` takes
blobs, then manifests by digest, and makes the result visible only in
:meth:`~ImageDestination.commit` -- an OCI layout's ``index.json`` written
last, an archive renamed into place, a registry tag pushed after everything
it references. :meth:`~ImageDestination.abort` undoes what it can.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import BinaryIO, Optional

from ._exceptions import DigestMismatch
from .descriptor import Descriptor
from .reference import ImageRef
from .source import RangeSource


@dataclass(frozen=True)
class TransportOptions:
    """Connection settings for one side (source or destination)."""

    tls_verify: bool = True
    cert_dir: Optional[str] = None
    credentials: Optional[tuple[str, str]] = None
    auth_file: Optional[str] = None
    docker_host: Optional[str] = None


class ImageSource(ABC):
    """Read side of a transport."""

    #: How the image is named in messages.
    name: str = ""

    @abstractmethod
    def root(self) -> tuple[bytes, str]:
        """The manifest or index the reference names: ``(bytes, media type)``."""

    @abstractmethod
    def get_manifest(self, desc: Descriptor) -> bytes:
        """A child manifest of an index, verified against ``desc``."""

    @abstractmethod
    def fetch_blob(self, desc: Descriptor, dst: BinaryIO) -> None:
        """Write blob ``desc`` to ``dst``, verified against its digest and size."""

    #: ``(registry host, repository)`` for a registry source, so a destination
    #: on the same registry can mount its blobs instead of uploading them.
    origin: Optional[tuple[str, str]] = None

    def local_blob_path(self, desc: Descriptor) -> Optional[str]:
        """A local file already holding the blob, to convert without a copy."""
        return None

    def range_source(self, desc: Descriptor) -> Optional[RangeSource]:
        """Random access to a blob without fetching it all, where possible."""
        return None

    def close(self) -> None:
        """Release temporary files and connections."""

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageDestination(ABC):
    """Write side of a transport."""

    name: str = ""
    #: Whether manifests written here can carry descriptor annotations
    #: (a docker-archive cannot).
    keeps_annotations: bool = True
    #: The registry host, for a registry destination (see ``ImageSource.origin``).
    registry_host: Optional[str] = None

    @abstractmethod
    def has_blob(self, desc: Descriptor) -> bool:
        """True if the destination already holds ``desc``."""

    @abstractmethod
    def put_blob(self, desc: Descriptor, path: str, *, mount_from: Optional[str] = None) -> None:
        """Store the blob held in file ``path``."""

    @abstractmethod
    def put_manifest(self, data: bytes, desc: Descriptor) -> None:
        """Store a manifest or index (a child, or the root before commit)."""

    @abstractmethod
    def commit(self, root: Descriptor, root_data: bytes) -> None:
        """Make ``root`` (already stored) the image the reference names."""

    def abort(self) -> None:
        """Undo whatever is not visible yet; called on any error or Ctrl-C."""

    def close(self) -> None:
        """Release resources."""


def copy_verified(src: BinaryIO, dst: BinaryIO, desc: Descriptor, where: str) -> None:
    """Copy ``src`` to ``dst`` checking it against ``desc``'s digest and size."""
    h = hashlib.sha256()
    n = 0
    while True:
        piece = src.read(1 << 20)
        if not piece:
            break
        n += len(piece)
        if n > desc.size:
            break
        h.update(piece)
        dst.write(piece)
    if n != desc.size or "sha256:" + h.hexdigest() != desc.digest:
        raise DigestMismatch(f"{where}: blob {desc.digest} does not match its descriptor "
                             f"(got {n} bytes{'' if n > desc.size else ', sha256:' + h.hexdigest()})")


def open_source(ref: ImageRef, options: TransportOptions = TransportOptions()) -> ImageSource:
    """The :class:`ImageSource` for ``ref``."""
    if ref.transport == "oci":
        from .ocilayout import OCILayoutSource
        return OCILayoutSource(ref.path, ref.tag)
    if ref.transport == "oci-archive":
        from .archives import OCIArchiveSource
        return OCIArchiveSource(ref.path, ref.tag)
    if ref.transport == "docker-archive":
        from .archives import DockerArchiveSource
        return DockerArchiveSource(ref.path, ref.name)
    if ref.transport == "docker":
        from .registryimage import RegistrySource
        return RegistrySource(ref, options)
    from .daemon import DaemonSource
    return DaemonSource(ref, options)


def open_destination(ref: ImageRef,
                     options: TransportOptions = TransportOptions()) -> ImageDestination:
    """The :class:`ImageDestination` for ``ref``."""
    if ref.transport == "oci":
        from .ocilayout import OCILayoutDestination
        return OCILayoutDestination(ref.path, ref.tag)
    if ref.transport == "oci-archive":
        from .archives import OCIArchiveDestination
        return OCIArchiveDestination(ref.path, ref.tag)
    if ref.transport == "docker-archive":
        from .archives import DockerArchiveDestination
        return DockerArchiveDestination(ref.path, ref.name)
    if ref.transport == "docker":
        from .registryimage import RegistryDestination
        return RegistryDestination(ref, options)
    from .daemon import DaemonDestination
    return DaemonDestination(ref, options)


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
