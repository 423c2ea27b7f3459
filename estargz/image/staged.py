"""An image source read once: for callers that read the same image twice.

``estargz optimize`` reads an image to build the root filesystem it profiles,
then converts it. Reading the underlying source twice would resolve the tag
twice (converting something else if it moved in between), download each
layer twice and decompress it in both passes. :class:`StagedSource` sits in
front of the source instead:

* the root manifest or index is resolved once and pinned: every later
  :meth:`~StagedSource.root` returns the same bytes, so profiling and
  conversion see one image, named by :attr:`~StagedSource.pinned` digest;
* child manifests and small blobs (configs) are fetched once and kept;
* each convertible layer is fetched once (or read where the source keeps it
  locally) and decompressed once, into ``work/<hex>.tar``, which
  :meth:`~StagedSource.local_blob_path` hands to every reader: extraction,
  the flat root filesystem and the converter all take an uncompressed tar
  in place (:func:`~estargz.layer.layerinput.open_tar` spools nothing).

A layer that carries a TOC digest annotation is kept compressed (fetched
once all the same): ``--reuse`` must read its footer and TOC.  With
``keep_compressed`` every layer's original bytes are kept beside its tar,
and :meth:`~StagedSource.fetch_blob` serves them from there: a SOCI index
(``optimize --soci``) is built on the compressed stream the profile's
extraction already fetched.
"""

from __future__ import annotations

import io
import os
import threading
from typing import BinaryIO

from .._exceptions import StorageError
from .._fsutil import unlink_quietly
from ..layer.layerinput import decompress_file, detect_compression
from ..layer.source import RangeSource
from ..layer.toc import TOC_DIGEST_ANNOTATION
from .descriptor import CONVERTIBLE_LAYERS, Descriptor, sha256_digest
from .store import ImageSource, copy_verified

#: Blobs up to this size that are not layers (configs) are kept in memory.
_SMALL = 16 << 20


class StagedSource(ImageSource):
    """``inner`` read at most once per manifest and blob, staged under ``work``.

    ``work`` (created if missing) is the caller's to delete, after
    :meth:`close`; closing does not close ``inner``.
    """

    #: Layers come out of :meth:`local_blob_path` decompressed.
    verbatim_local_blobs = False

    def __init__(self, inner: ImageSource, work: str, *, keep_compressed: bool = False) -> None:
        self.inner = inner
        self.keep_compressed = keep_compressed
        #: Layer digest -> a local file of its original (compressed) bytes.
        self._kept: dict[str, str] = {}
        self.name = inner.name
        self.origin = inner.origin
        self.work = work
        os.makedirs(work, 0o700, exist_ok=True)
        self._root: tuple[bytes, str] | None = None
        self._manifests: dict[str, bytes] = {}
        self._small: dict[str, bytes] = {}
        self._files: dict[str, str] = {}
        self._lock = threading.Lock()
        self._layer_locks: dict[str, threading.Lock] = {}

    @property
    def pinned(self) -> str:
        """The digest of the root manifest or index (resolving it if not yet)."""
        return sha256_digest(self.root()[0])

    def root(self) -> tuple[bytes, str]:
        with self._lock:
            if self._root is None:
                self._root = self.inner.root()
            return self._root

    def get_manifest(self, desc: Descriptor) -> bytes:
        with self._lock:
            data = self._manifests.get(desc.digest)
        if data is None:
            data = self.inner.get_manifest(desc)
            with self._lock:
                self._manifests[desc.digest] = data
        return data

    def fetch_blob(self, desc: Descriptor, dst: BinaryIO) -> None:
        if desc.size <= _SMALL and desc.media_type not in CONVERTIBLE_LAYERS:
            with self._lock:
                data = self._small.get(desc.digest)
            if data is None:
                buf = io.BytesIO()
                self.inner.fetch_blob(desc, buf)
                data = buf.getvalue()
                with self._lock:
                    self._small[desc.digest] = data
            dst.write(data)
            return
        if self.keep_compressed and desc.media_type in CONVERTIBLE_LAYERS:
            self.local_blob_path(desc)  # staged once, its original kept
            with open(self._kept[desc.digest], "rb") as f:
                copy_verified(f, dst, desc, f"staged layer {desc.digest}")
            return
        # A layer's original bytes are wanted only off the usual path (the
        # staged copy is uncompressed): read them from the source.
        self.inner.fetch_blob(desc, dst)

    def local_blob_path(self, desc: Descriptor) -> str | None:
        """The staged copy of layer ``desc`` (uncompressed, unless it carries
        a TOC digest), made on first use; other blobs as the source has them."""
        if desc.media_type not in CONVERTIBLE_LAYERS:
            return self.inner.local_blob_path(desc)
        with self._lock:
            lock = self._layer_locks.setdefault(desc.digest, threading.Lock())
        with lock:
            path = self._files.get(desc.digest)
            if path is None:
                path = self._stage(desc)
                self._files[desc.digest] = path
        return path

    def _stage(self, desc: Descriptor) -> str:
        hexdigest = desc.digest.split(":", 1)[-1]
        compressed = self.inner.local_blob_path(desc)
        fetched = None
        try:
            if compressed is None:
                fetched = compressed = os.path.join(self.work, hexdigest + ".blob")
                with open(fetched, "wb") as f:
                    self.inner.fetch_blob(desc, f)
            if self.keep_compressed:
                self._kept[desc.digest] = compressed
                if fetched is not None:
                    # Renamed so that a plain tar's staged copy (below) is another file.
                    os.rename(fetched, fetched + ".orig")
                    self._kept[desc.digest] = compressed = fetched + ".orig"
                    fetched = None
            if TOC_DIGEST_ANNOTATION in desc.annotations:
                fetched = None  # kept as it is
                return compressed
            tar = os.path.join(self.work, hexdigest + ".tar")
            with open(compressed, "rb") as f:
                plain = detect_compression(f.read(8)) == "tar"
            if plain and fetched is None:
                return compressed  # the source's own (or the kept) tar, in place
            if plain and fetched is not None:
                os.rename(fetched, tar)
                fetched = None
                return tar
            with open(tar, "wb") as out:
                decompress_file(compressed, out)
            return tar
        except OSError as e:
            raise StorageError(f"cannot stage layer {desc.digest} in {self.work}: "
                               f"{e.strerror or e}") from None
        finally:
            if fetched is not None:
                unlink_quietly(fetched)

    def range_source(self, desc: Descriptor) -> RangeSource | None:
        return self.inner.range_source(desc)

    def close(self) -> None:
        """Forget the staged files (the caller deletes ``work``)."""
        self._files.clear()
        self._small.clear()
