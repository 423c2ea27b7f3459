"""OCI image layouts (``oci:PATH[:TAG]``), read and written.

A layout is a directory with an ``oci-layout`` file, ``index.json`` and
``blobs/sha256/<hex>``. A tag is the ``org.opencontainers.image.ref.name``
annotation of an ``index.json`` entry, as skopeo and umoci use it. A
referrer (an artifact whose ``subject`` is an image here, such as a SOCI v1
index) is an untagged entry that carries its ``artifactType``, as ``oras
attach --oci-layout`` writes one and ``oras discover --oci-layout`` finds it.

Writing stages blobs in a temporary directory of its own and changes the
layout only at commit: a new layout is renamed into place whole; an existing
one gets its blobs moved in and ``index.json`` rewritten last, under an
exclusive lock on ``index.json.lock`` in the layout, so a reader never sees a
tag that points at missing content and concurrent writers never lose each
other's tags.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from .._cancel import check_cancelled
from .._exceptions import DigestMismatch, InvalidInput, NotFound, StorageError
from .._fsutil import (
    OwnedTempDir,
    atomic_output,
    fsync_dir,
    locked_file,
    reclaim_tempdirs,
    unlink_quietly,
)
from ..image.descriptor import OCI_INDEX, Descriptor, check_digest, sha256_digest
from ..image.reference import ImageRef, check_tag, split_path
from ..image.store import ImageDestination, ImageSource, TransportOptions, copy_verified
from ..image.transport import Transport, register_transport
from ..layer.jsondoc import MAX_JSON_SIZE, load_json

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = "oci-layout"
#: Taken (flock) around every read-modify-write of ``index.json``. Neither
#: containers/image (skopeo, podman) nor umoci locks a layout, so there is no
#: name to share; this one says what it guards.
LOCK_FILE = "index.json.lock"
#: Temporary directories of ours in a layout, or beside a new one.
TEMP_PREFIX = ".estargz-"
_HEX = re.compile(r"[0-9a-f]{64}")
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
            data = f.read(MAX_JSON_SIZE + 1)
    except OSError as e:
        raise StorageError(f"cannot read {root}/index.json: {e.strerror}") from None
    index = load_json(data, f"{root}/index.json")
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
        raw = self._index.get("manifests", [])
        entries = [Descriptor.from_json(d) for d in raw]
        if self.tag is not None:
            found = [d for d in entries if d.annotations.get(REF_NAME) == self.tag]
            if not found:
                raise NotFound(f"tag {self.tag!r} is not in OCI layout {self.root_dir}")
            return found[-1]
        # Untagged: the one image, not counting the referrers beside it.
        images = [d for d, e in zip(entries, raw, strict=True) if not _is_referrer(e)] or entries
        if len(images) != 1:
            tags = sorted(d.annotations.get(REF_NAME, "?") for d in images)
            raise InvalidInput(f"OCI layout {self.root_dir} holds {len(images)} images; name "
                               f"one as oci:{self.root_dir}:TAG (tags: {', '.join(tags)})")
        return images[0]

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

    def referrers(self, subject: Descriptor, artifact_type: str) -> list[Descriptor]:
        """The referrers ``index.json`` lists (see the module's docstring)
        whose manifest names ``subject``."""
        found = []
        for entry in self._index.get("manifests", []):
            d = Descriptor.from_json(entry)
            if _is_referrer(entry) and entry.get("artifactType") == artifact_type:
                manifest = load_json(self.get_manifest(d), f"{self.name}: manifest {d.digest}")
                named = manifest.get("subject") if isinstance(manifest, dict) else None
                if isinstance(named, dict) and named.get("digest") == subject.digest:
                    found.append(d)
        return found

    def local_blob_path(self, desc: Descriptor) -> str | None:
        path = blob_path(self.root_dir, desc.digest)
        with open(os.devnull, "wb") as sink:
            self.fetch_blob(desc, sink)  # verified before anyone converts it
        return path


class OCILayoutDestination(ImageDestination):
    """Write an image into an OCI layout directory, new or existing.

    Nothing in the layout changes before :meth:`commit`. A layout that does
    not exist yet is assembled beside it (``.estargz-*.tmp`` in its parent)
    and renamed into place whole. Into an existing layout, blobs are staged
    in a ``.estargz-*.tmp`` directory inside it; commit then takes the
    layout's lock (:data:`LOCK_FILE`), moves them into ``blobs/`` and adds
    the tag to ``index.json`` as it is *now*, so concurrent writers never
    lose each other's tags. A directory a killed writer left without
    ``index.json`` (empty, or only ``blobs/`` and ``oci-layout``) is
    completed the same way. See :func:`add_to_layout`.
    """

    def __init__(self, root: str, tag: str | None) -> None:
        self.root_dir = root
        self.tag = tag
        self.name = f"oci:{root}" + (f":{tag}" if tag else "")
        self._new = not os.path.lexists(root)
        #: Referrers whose subject is not in the layout yet: listed at commit.
        self._referrers: list[dict[str, Any]] = []
        if self._new:
            parent = os.path.dirname(os.path.abspath(root))
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise StorageError(f"cannot create {parent}: {e.strerror}") from None
            reclaim_tempdirs(parent, TEMP_PREFIX)
            self._tmp = OwnedTempDir(parent, TEMP_PREFIX)
            self._staging = os.path.join(self._tmp.path, "blobs", "sha256")
        else:
            if not os.path.isdir(root):
                raise InvalidInput(f"{root} exists and is not a directory")
            if not is_incomplete_layout(root):
                read_index(root)  # refuse a directory that is not a layout, up front
            reclaim_tempdirs(root, TEMP_PREFIX)
            self._tmp = OwnedTempDir(root, TEMP_PREFIX)
            self._staging = os.path.join(self._tmp.path, "blobs")
        try:
            os.makedirs(self._staging)
        except OSError as e:
            self._tmp.cleanup()
            raise StorageError(f"cannot write {root}: {e.strerror}") from None

    def _staged(self, digest: str) -> str:
        return os.path.join(self._staging, check_digest(digest).split(":", 1)[1])

    def has_blob(self, desc: Descriptor) -> bool:
        paths = [self._staged(desc.digest)]
        if not self._new:
            paths.append(blob_path(self.root_dir, desc.digest))
        for path in paths:
            try:
                if os.path.getsize(path) == desc.size:
                    return True
            except OSError:
                pass
        return False

    def put_blob(self, desc: Descriptor, path: str, *, mount_from: str | None = None) -> None:
        if not self.has_blob(desc):
            self._store(desc.digest, lambda out: _copy_file(path, out))

    def staging_dir(self) -> str:
        # One filesystem with the layout, so put_blob_file is a rename.
        return self._staging

    def put_blob_file(self, desc: Descriptor, path: str) -> None:
        if self.has_blob(desc) or os.path.dirname(os.path.abspath(path)) != \
                os.path.abspath(self._staging):
            super().put_blob_file(desc, path)
            return
        target = self._staged(desc.digest)
        try:
            os.chmod(path, 0o666 & ~_umask())  # as a copy through atomic_output gets
            os.replace(path, target)
        except OSError as e:
            unlink_quietly(path)
            raise StorageError(f"cannot store {target}: {e.strerror or e}") from None

    def put_manifest(self, data: bytes, desc: Descriptor) -> None:
        if not self.has_blob(desc):
            self._store(desc.digest, lambda out: out.write(data))

    def _store(self, digest: str, write: Callable[[BinaryIO], object]) -> None:
        # Synced, as every blob is before index.json names it: a crash must
        # not leave an index.json whose blobs were never written out
        # (containers/image's layout destination syncs each blob too).
        with atomic_output(self._staged(digest)) as out:
            write(out)

    holds_referrers = True

    def put_referrer(self, data: bytes, desc: Descriptor, subject: Descriptor) -> str:
        if not self.holds_referrers:  # a subclass that cannot
            return super().put_referrer(data, desc, subject)
        if not desc.extra.get("artifactType"):
            raise InvalidInput(f"referrer {desc.digest} has no artifactType: an untagged "
                               "entry in index.json would be taken for the untagged image")
        self.put_manifest(data, desc)
        entry = desc.to_json()
        entry.pop("platform", None)
        if self._new or not os.path.isfile(blob_path(self.root_dir, subject.digest)):
            self._referrers.append(entry)  # its subject arrives with commit
        else:
            add_to_layout(self.root_dir, self._staging, [entry])
        return "index.json entry"

    def commit(self, root: Descriptor, root_data: bytes) -> None:
        self.put_manifest(root_data, root)
        entry = root.to_json()
        entry.pop("platform", None)
        annotations = dict(entry.get("annotations", {}))
        if self.tag is not None:
            annotations[REF_NAME] = self.tag
        if annotations:
            entry["annotations"] = annotations
        entries = [entry, *self._referrers]
        if self._new:
            layout = self._tmp.path
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
            _write_layout_files(layout, index)
            try:
                os.chmod(layout, 0o777 & ~_umask())  # mkdtemp made it 0700
                fsync_dir(self._staging)  # the blobs' names, before index.json's rename
                os.rename(layout, self.root_dir)
                fsync_dir(os.path.dirname(os.path.abspath(self.root_dir)))
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise StorageError(f"cannot create {self.root_dir}: "
                                       f"{e.strerror or e}") from None
                # Another writer created the layout meanwhile: add to it.
            else:
                self._tmp.release()
                return
        add_to_layout(self.root_dir, self._staging, entries)
        self._tmp.cleanup()

    def abort(self) -> None:
        self._tmp.cleanup()

    def close(self) -> None:
        self._tmp.cleanup()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def is_incomplete_layout(root: str) -> bool:
    """Whether directory ``root`` is a layout a writer was killed before
    finishing (or an empty directory): no ``index.json``, and nothing but
    ``blobs/``, ``oci-layout``, :data:`LOCK_FILE` and temporaries."""
    try:
        names = os.listdir(root)
    except OSError:
        return False
    return "index.json" not in names and all(
        n in ("blobs", LAYOUT_FILE, LOCK_FILE) or (n.startswith(".") and n.endswith(".tmp"))
        for n in names)


def _write_layout_files(root: str, index: dict[str, Any]) -> None:
    """``oci-layout`` (if missing), then ``index.json``: a layout is complete
    once ``index.json`` is there."""
    layout = os.path.join(root, LAYOUT_FILE)
    if not os.path.exists(layout):
        with atomic_output(layout) as f:
            f.write(json.dumps(LAYOUT_VERSION).encode())
    with atomic_output(os.path.join(root, "index.json")) as f:
        f.write(json.dumps(index, indent=2).encode() + b"\n")


#: Temporaries that older versions wrote among the blobs (a converted layer,
#: a blob being copied), and how old one must be to be a killed run's: a live
#: writer touches its file every few milliseconds and renames it when done.
_LEGACY_TEMP = re.compile(r"\.(estargz-.*\.esgz|[0-9a-f]{64}\..*)\.tmp")
_LEGACY_AGE = 3600.0


def _remove_legacy_temporaries(blobs: str) -> None:
    """Remove what killed runs of older versions left in ``blobs/sha256``
    (this version stages elsewhere)."""
    now = time.time()
    for name in os.listdir(blobs):
        if _LEGACY_TEMP.fullmatch(name):
            path = os.path.join(blobs, name)
            with contextlib.suppress(OSError):
                if now - os.lstat(path).st_mtime > _LEGACY_AGE:
                    os.unlink(path)


def add_to_layout(root: str, staged_blobs: str, entries: list[dict[str, Any]], *,
                  lock: bool = True) -> None:
    """Move the blobs in ``staged_blobs`` (files named by hex digest) into the
    layout ``root`` and add ``entries`` to its ``index.json``, holding the
    layout's lock (:data:`LOCK_FILE`) so that the read-modify-write sees
    every other writer's entries. An image entry replaces the one of its tag
    (its ``org.opencontainers.image.ref.name``, or the untagged image); a
    referrer (untagged, with an ``artifactType``) is listed once, beside the
    others. A layout without ``index.json`` (:func:`is_incomplete_layout`)
    gets one. ``lock=False`` is for a private layout (an archive's, already
    under the archive's lock)."""
    with locked_file(os.path.join(root, LOCK_FILE)) if lock else contextlib.nullcontext():
        if os.path.exists(os.path.join(root, "index.json")):
            index = read_index(root)
        elif is_incomplete_layout(root):
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        else:
            raise NotFound(f"{root} is not an OCI image layout (no index.json)")
        # Every writer of these holds the lock: any temporary of theirs seen
        # now is a killed writer's.
        for name in os.listdir(root):
            if name.startswith((".index.json.", f".{LAYOUT_FILE}.")) and name.endswith(".tmp"):
                unlink_quietly(os.path.join(root, name))
        blobs = os.path.join(root, "blobs", "sha256")
        try:
            os.makedirs(blobs, exist_ok=True)
            _remove_legacy_temporaries(blobs)
            for name in sorted(os.listdir(staged_blobs)):
                if not _HEX.fullmatch(name):
                    continue  # not a finished blob: never put in blobs/
                src, dst = os.path.join(staged_blobs, name), os.path.join(blobs, name)
                try:
                    if os.path.getsize(dst) == os.path.getsize(src):
                        continue  # already there: never rewrite a blob a reader may hold
                except FileNotFoundError:
                    pass
                os.replace(src, dst)
        except OSError as e:
            raise StorageError(f"cannot store blobs in {root}: {e.strerror or e}") from None
        fsync_dir(blobs)  # the blobs' names are durable before index.json names them
        manifests = list(index.get("manifests", []))
        for entry in entries:
            manifests = [d for d in manifests if not _replaces(entry, d)] + [entry]
        index["manifests"] = manifests
        _write_layout_files(root, index)


def _is_referrer(entry: dict[str, Any]) -> bool:
    """Whether ``index.json`` entry ``entry`` lists a referrer, not an image."""
    return (REF_NAME not in (entry.get("annotations") or {})
            and bool(entry.get("artifactType")))


def _replaces(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether ``index.json`` entry ``new`` takes ``old``'s place: the same
    tag, or both the untagged image, or the same referrer."""
    if _is_referrer(new):
        return bool(old.get("digest") == new.get("digest"))
    tag = (new.get("annotations") or {}).get(REF_NAME)
    return (old.get("annotations") or {}).get(REF_NAME) == tag and not _is_referrer(old)


def _copy_file(src: str, out: BinaryIO) -> None:
    with open(src, "rb") as f:
        while piece := f.read(1 << 20):
            check_cancelled()
            out.write(piece)


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
