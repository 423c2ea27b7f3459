"""Where images come from and go to: the two small interfaces every transport
implements (the registry of transports by name is :mod:`.transport`).

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
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import IO, BinaryIO

from .._cancel import check_cancelled
from .._exceptions import DigestMismatch, InvalidInput
from .._fsutil import unlink_quietly
from .._progress import progress_meter
from ..layer.source import RangeSource
from .descriptor import Descriptor


@dataclass(frozen=True)
class TransportOptions:
    """Connection settings for one side (source or destination)."""

    tls_verify: bool = True
    cert_dir: str | None = None
    credentials: tuple[str, str] | None = None
    auth_file: str | None = None
    docker_host: str | None = None
    #: Registry deadlines (``None``: the client's defaults): seconds per
    #: request, retries included; seconds per wait for bytes; the slowest
    #: average bytes per second a blob transfer may take (it gets
    #: ``timeout + size / min_transfer_rate`` seconds).
    timeout: float | None = None
    read_timeout: float | None = None
    min_transfer_rate: float | None = None


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
    origin: tuple[str, str] | None = None

    def local_blob_path(self, desc: Descriptor) -> str | None:
        """A local file already holding the blob, to convert without a copy."""
        return None

    #: Whether :meth:`local_blob_path` gives blobs byte for byte (a staged
    #: source gives layers decompressed, which converting takes as well).
    verbatim_local_blobs: bool = True

    def referrers(self, subject: Descriptor, artifact_type: str) -> list[Descriptor]:
        """Manifests of ``artifact_type`` that refer to ``subject`` (OCI 1.1
        ``subject``), where the transport can list them; none by default."""
        return []

    def range_source(self, desc: Descriptor) -> RangeSource | None:
        """Random access to a blob without fetching it all, where possible."""
        return None

    def close(self) -> None:  # noqa: B027  (an optional hook: nothing to release by default)
        """Release temporary files and connections."""

    def __enter__(self) -> ImageSource:
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
    registry_host: str | None = None

    @abstractmethod
    def has_blob(self, desc: Descriptor) -> bool:
        """True if the destination already holds ``desc``."""

    @abstractmethod
    def put_blob(self, desc: Descriptor, path: str, *, mount_from: str | None = None) -> None:
        """Store the blob held in file ``path``."""

    def staging_dir(self) -> str | None:
        """A directory on the destination's own filesystem for blobs about to
        be stored, so :meth:`put_blob_file` can rename them in rather than
        copy; ``None`` (the default) when the destination copies anyway."""
        return None

    def put_blob_file(self, desc: Descriptor, path: str) -> None:
        """Store the blob held in file ``path`` and remove ``path``: a
        destination that can take the file over (see :meth:`staging_dir`)
        renames it; the default copies it with :meth:`put_blob`."""
        try:
            self.put_blob(desc, path)
        finally:
            unlink_quietly(path)

    @abstractmethod
    def put_manifest(self, data: bytes, desc: Descriptor) -> None:
        """Store a manifest or index (a child, or the root before commit)."""

    @abstractmethod
    def commit(self, root: Descriptor, root_data: bytes) -> None:
        """Make ``root`` (already stored) the image the reference names."""

    #: Whether :meth:`put_referrer` works here.
    holds_referrers: bool = False

    def put_referrer(self, data: bytes, desc: Descriptor, subject: Descriptor) -> str:
        """Store artifact manifest ``data`` (``desc`` carries its
        ``artifactType``; its blobs stored already) so that readers find it
        from ``subject``; returns how they will find it. A registry takes it
        at once; an OCI layout that does not hold ``subject`` yet lists it
        with :meth:`commit`, so that the layout never names a referrer of
        an image it lacks."""
        raise InvalidInput(f"{self.name} cannot hold artifacts that refer to an image "
                           "(referrers); use a docker:// or oci: destination")

    def abort(self) -> None:  # noqa: B027  (an optional hook: nothing to undo by default)
        """Undo whatever is not visible yet; called on any error or Ctrl-C."""

    def close(self) -> None:  # noqa: B027  (an optional hook: nothing to release by default)
        """Release resources."""


def copy_verified(src: IO[bytes], dst: IO[bytes], desc: Descriptor, where: str) -> None:
    """Copy ``src`` to ``dst`` checking it against ``desc``'s digest and size."""
    h = hashlib.sha256()
    n = 0
    fetched = progress_meter("fetch", desc.size)
    while True:
        check_cancelled()
        piece = src.read(1 << 20)
        if not piece:
            break
        n += len(piece)
        if n > desc.size:
            break
        h.update(piece)
        dst.write(piece)
        fetched.add(len(piece))
    if n != desc.size or "sha256:" + h.hexdigest() != desc.digest:
        got = "" if n > desc.size else ", sha256:" + h.hexdigest()
        raise DigestMismatch(f"{where}: blob {desc.digest} does not match its descriptor "
                             f"(got {n} bytes{got})")
