"""OCI image layouts (``oci:PATH[:TAG]``), read and written.

A layout is a directory with an ``oci-layout`` file, ``index.json`` and
``blobs/sha256/<hex>``. Writing stores each blob under a temporary name and
renames it, and writes ``index.json`` last, so a reader never sees a tag that
points at missing content. A tag is the ``org.opencontainers.image.ref.name``
annotation of an ``index.json`` entry, as skopeo and umoci use it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any, BinaryIO

from .._exceptions import DigestMismatch, InvalidInput, NotFound, StorageError
from .._fsutil import atomic_output, unlink_quietly
from ..image.descriptor import OCI_INDEX, Descriptor, check_digest, sha256_digest
from ..image.reference import ImageRef, check_tag, split_path
from ..image.store import ImageDestination, ImageSource, TransportOptions, copy_verified
from ..image.transport import Transport, register_transport

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}


def blob_path(root: str, digest: str) -> str:
    algo, hexdigest = check_digest(digest).split(":", 1)
    return os.path.join(root, "blobs", algo, hexdigest)


def read_index(root: str) -> dict[str, Any]:
    """Read and sanity-check a layout's ``index.json``."""
    if not os.path.isfile(os.path.join(root, LAYOUT_FILE)):
        raise NotFound(f"{root} is not an OCI image layout (no {LAYOUT_FILE} file)")
    try:
        with open(os.path.join(root, "index.json"), "rb") as f:
            index = json.load(f)
    except OSError as e:
        raise StorageError(f"cannot read {root}/index.json: {e.strerror}") from None
    except ValueError as e:
        raise InvalidInput(f"{root}/index.json is not valid JSON: {e}") from None
    if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
        raise InvalidInput(f"{root}/index.json is not an OCI index")
    return index


class OCILayoutSource(ImageSource):
    """Read an image from an OCI layout directory."""

    def __init__(self, root: str, tag: str | None) -> None:
        self.root_dir = root
        self.tag = tag
        self.name = f"oci:{root}" + (f":{tag}" if tag else "")
        self._index = read_index(root)

    def root_descriptor(self) -> Descriptor:
        entries = [Descriptor.from_json(d) for d in self._index.get("manifests", [])]
        if self.tag is not None:
            found = [d for d in entries if d.annotations.get(REF_NAME) == self.tag]
            if not found:
                raise NotFound(f"tag {self.tag!r} is not in OCI layout {self.root_dir}")
            return found[-1]
        if len(entries) != 1:
            tags = sorted(d.annotations.get(REF_NAME, "?") for d in entries)
            raise InvalidInput(f"OCI layout {self.root_dir} holds {len(entries)} images; name "
                               f"one as oci:{self.root_dir}:TAG (tags: {', '.join(tags)})")
        return entries[0]

    def root(self) -> tuple[bytes, str]:
        desc = self.root_descriptor()
        return self.get_manifest(desc), desc.media_type

    def get_manifest(self, desc: Descriptor) -> bytes:
        if desc.size > 16 << 20:
            raise InvalidInput(f"manifest {desc.digest} is implausibly large ({desc.size} bytes)")
        try:
            with open(blob_path(self.root_dir, desc.digest), "rb") as f:
                data = f.read(desc.size + 1)
        except OSError as e:
            raise NotFound(f"{self.name}: manifest {desc.digest} is missing: "
                           f"{e.strerror}") from None
        if len(data) != desc.size or sha256_digest(data) != desc.digest:
            raise DigestMismatch(f"{self.name}: manifest {desc.digest} does not match its digest")
        return data

    def fetch_blob(self, desc: Descriptor, dst: BinaryIO) -> None:
        try:
            f = open(blob_path(self.root_dir, desc.digest), "rb")  # noqa: SIM115  (with f: below)
        except OSError as e:
            raise NotFound(f"{self.name}: blob {desc.digest} is missing: {e.strerror}") from None
        with f:
            copy_verified(f, dst, desc, self.name)

    def local_blob_path(self, desc: Descriptor) -> str | None:
        path = blob_path(self.root_dir, desc.digest)
        with open(os.devnull, "wb") as sink:
            self.fetch_blob(desc, sink)  # verified before anyone converts it
        return path


class OCILayoutDestination(ImageDestination):
    """Write an image into an OCI layout directory, new or existing."""

    def __init__(self, root: str, tag: str | None) -> None:
        self.root_dir = root
        self.tag = tag
        self.name = f"oci:{root}" + (f":{tag}" if tag else "")
        self._created_root = not os.path.exists(root)
        self._new_blobs: list[str] = []
        if self._created_root:
            try:
                os.makedirs(os.path.join(root, "blobs", "sha256"))
            except OSError as e:
                raise StorageError(f"cannot create {root}: {e.strerror}") from None
            self._index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                           "manifests": []}
        else:
            if not os.path.isdir(root):
                raise InvalidInput(f"{root} exists and is not a directory")
            if os.listdir(root):
                self._index = read_index(root)
            else:
                self._index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
            os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)

    def has_blob(self, desc: Descriptor) -> bool:
        try:
            return os.path.getsize(blob_path(self.root_dir, desc.digest)) == desc.size
        except OSError:
            return False

    def put_blob(self, desc: Descriptor, path: str, *, mount_from: str | None = None) -> None:
        if self.has_blob(desc):
            return
        target = blob_path(self.root_dir, desc.digest)
        self._store(target, lambda out: _copy_file(path, out))

    def staging_dir(self) -> str:
        # Beside the blobs: one filesystem, so put_blob_file is a rename.
        return os.path.join(self.root_dir, "blobs", "sha256")

    def put_blob_file(self, desc: Descriptor, path: str) -> None:
        target = blob_path(self.root_dir, desc.digest)
        if self.has_blob(desc) or os.path.dirname(os.path.abspath(path)) != \
                os.path.dirname(os.path.abspath(target)):
            super().put_blob_file(desc, path)
            return
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(path, 0o666 & ~umask)  # as a copy through atomic_output gets
            os.replace(path, target)
        except OSError as e:
            unlink_quietly(path)
            raise StorageError(f"cannot store {target}: {e.strerror or e}") from None
        self._new_blobs.append(target)

    def put_manifest(self, data: bytes, desc: Descriptor) -> None:
        if not self.has_blob(desc):
            self._store(blob_path(self.root_dir, desc.digest), lambda out: out.write(data))

    def _store(self, target: str, write: Callable[[BinaryIO], object]) -> None:
        # Blobs are content-addressed: no need to sync each one, the
        # index.json that makes them reachable is synced.
        with atomic_output(target, fsync=False) as out:
            write(out)
        self._new_blobs.append(target)

    def commit(self, root: Descriptor, root_data: bytes) -> None:
        self.put_manifest(root_data, root)
        entry = root.to_json()
        entry.pop("platform", None)
        annotations = dict(entry.get("annotations", {}))
        if self.tag is not None:
            annotations[REF_NAME] = self.tag
        if annotations:
            entry["annotations"] = annotations
        kept = [d for d in self._index.get("manifests", [])
                if (d.get("annotations") or {}).get(REF_NAME) != self.tag]
        self._index["manifests"] = kept + [entry]
        path = os.path.join(self.root_dir, "index.json")
        layout = os.path.join(self.root_dir, LAYOUT_FILE)
        if not os.path.exists(layout):
            with atomic_output(layout) as f:
                f.write(json.dumps(LAYOUT_VERSION).encode())
        with atomic_output(path) as f:
            f.write(json.dumps(self._index, indent=2).encode() + b"\n")
        self._new_blobs = []
        self._created_root = False

    def abort(self) -> None:
        if self._created_root:
            shutil.rmtree(self.root_dir, ignore_errors=True)
            return
        for path in self._new_blobs:
            unlink_quietly(path)
        self._new_blobs = []


def _copy_file(src: str, out: BinaryIO) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 20)


class OCITransport(Transport):
    """``oci:PATH[:TAG]``; a bare ``PATH[:TAG]`` means the same."""

    name = "oci"

    def parse(self, rest: str, text: str) -> ImageRef:
        path, suffix = split_path(self.name, rest)
        if ":" in rest:
            check_tag(suffix, text)
        return ImageRef(self.name, path=path, tag=suffix or None)

    def open_source(self, ref: ImageRef, options: TransportOptions) -> ImageSource:
        return OCILayoutSource(ref.path, ref.tag)

    def open_destination(self, ref: ImageRef, options: TransportOptions) -> ImageDestination:
        return OCILayoutDestination(ref.path, ref.tag)


register_transport(OCITransport())
