"""``docker-archive:PATH[:NAME[:TAG]]``: what ``docker save`` writes and
``docker load`` reads.

Written in a temporary place beside the destination and renamed into place
whole, so an archive appears complete or not at all; writers take turns on
``PATH.lock`` (see :func:`~.oci_archive.archive_lock`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from typing import IO, BinaryIO

from .._cancel import check_cancelled
from .._exceptions import InvalidInput, NotFound, StorageError
from .._fsutil import OwnedTempDir, atomic_output, reclaim_tempdirs
from ..image.descriptor import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    Descriptor,
    sha256_digest,
)
from ..image.reference import DockerName, ImageRef, parse_docker_name, split_path
from ..image.store import ImageDestination, ImageSource, TransportOptions, copy_verified
from ..image.transport import Transport, register_transport
from ..layer.inputfile import require_regular_file
from ..layer.jsondoc import MAX_JSON_SIZE, load_json
from ..layer.layerinput import detect_compression
from .oci import TEMP_PREFIX
from .oci_archive import add_file, archive_lock

DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"


def _short_name(name: DockerName) -> str:
    """How docker writes RepoTags: ``busybox:latest``, ``reg:5000/a/b:1``."""
    repo = name.repository
    if name.registry == "docker.io":
        repo = repo[len("library/"):] if repo.startswith("library/") else repo
        return f"{repo}:{name.tag or 'latest'}"
    return f"{name.registry}/{repo}:{name.tag or 'latest'}"


def _same_image(tag: str, name: DockerName) -> bool:
    try:
        other = parse_docker_name(tag)
    except InvalidInput:
        return False
    return (other.registry, other.repository, other.tag) == \
        (name.registry, name.repository, name.tag or "latest")


def _strings(value: object) -> bool:
    """True for ``null`` or a JSON list of strings."""
    return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))


class DockerArchiveSource(ImageSource):
    """Read one image of a ``docker save`` archive (legacy or OCI-style)."""

    def __init__(self, path: str, name: DockerName | None) -> None:
        self.name = f"docker-archive:{path}"
        self.path = path
        require_regular_file(path, "docker-archive")
        try:
            self._tar = tarfile.open(path)  # noqa: SIM115  (closed in close())
        except FileNotFoundError:
            raise NotFound(f"docker-archive {path} does not exist") from None
        except (tarfile.TarError, OSError) as e:
            raise InvalidInput(f"cannot read docker-archive {path}: {e}") from None
        self._members = {os.path.normpath(m.name): m for m in self._tar.getmembers()}
        manifest = load_json(self._read_member("manifest.json", MAX_JSON_SIZE),
                             f"{path}: manifest.json")
        if not isinstance(manifest, list) or not manifest:
            raise InvalidInput(f"{path}: manifest.json lists no image")
        for item in manifest:
            if not (isinstance(item, dict) and isinstance(item.get("Config"), str)
                    and _strings(item.get("RepoTags")) and _strings(item.get("Layers"))):
                raise InvalidInput(f"{path}: manifest.json lists something other than an "
                                   "image (a Config name, RepoTags and Layers)")
        if name is not None:
            chosen = [e for e in manifest
                      if any(_same_image(t, name) for t in e.get("RepoTags") or [])]
            if not chosen:
                raise NotFound(f"{path} holds no image tagged {_short_name(name)}")
        elif len(manifest) > 1:
            raise InvalidInput(f"{path} holds {len(manifest)} images; name one as "
                               f"docker-archive:{path}:NAME:TAG")
        else:
            chosen = manifest
        entry = chosen[0]
        self._blobs: dict[str, str] = {}
        config_name = entry["Config"]
        config = self._read_member(config_name, MAX_JSON_SIZE)
        config_desc = Descriptor(DOCKER_CONFIG, sha256_digest(config), len(config))
        self._blobs[config_desc.digest] = config_name
        layers = []
        for layer_name in entry.get("Layers") or []:
            digest, size, compression = self._hash_member(layer_name)
            media = DOCKER_LAYER_GZIP if compression == "gzip" else (
                "application/vnd.oci.image.layer.v1.tar+zstd" if compression == "zstd"
                else DOCKER_LAYER_TAR)
            layers.append(Descriptor(media, digest, size))
            self._blobs[digest] = layer_name
        self._manifest = json.dumps({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": config_desc.to_json(), "layers": [layer.to_json() for layer in layers],
        }).encode()

    def _member(self, name: str) -> tarfile.TarInfo:
        m = self._members.get(os.path.normpath(name))
        if m is None or not m.isfile():
            raise InvalidInput(f"{self.path}: {name} is missing from the archive")
        return m

    def _open(self, member: tarfile.TarInfo) -> IO[bytes]:
        f = self._tar.extractfile(member)
        if f is None:
            raise InvalidInput(f"{self.path}: {member.name} is not a regular file")
        return f

    def _read_member(self, name: str, limit: int) -> bytes:
        m = self._member(name)
        if m.size > limit:
            raise InvalidInput(f"{self.path}: {name} is implausibly large")
        return self._open(m).read()

    def _hash_member(self, name: str) -> tuple[str, int, str]:
        f = self._open(self._member(name))
        h = hashlib.sha256()
        head = f.read(8)
        h.update(head)
        n = len(head)
        while piece := f.read(1 << 20):
            check_cancelled()
            h.update(piece)
            n += len(piece)
        return "sha256:" + h.hexdigest(), n, detect_compression(head)

    def root(self) -> tuple[bytes, str]:
        return self._manifest, DOCKER_MANIFEST

    def get_manifest(self, desc: Descriptor) -> bytes:
        raise NotFound(f"{self.name} holds no manifest {desc.digest}")

    def fetch_blob(self, desc: Descriptor, dst: BinaryIO) -> None:
        name = self._blobs.get(desc.digest)
        if name is None:
            raise NotFound(f"{self.name}: no blob {desc.digest}")
        copy_verified(self._open(self._member(name)), dst, desc, self.name)

    def close(self) -> None:
        self._tar.close()


class DockerArchiveDestination(ImageDestination):
    """Write one image as a ``docker load``-able archive."""

    keeps_annotations = False

    def __init__(self, path: str, name: DockerName | None) -> None:
        self.path = path
        self.image_name = name
        self.name = f"docker-archive:{path}"
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise StorageError(f"cannot write {path}: {directory} does not exist")
        reclaim_tempdirs(directory, TEMP_PREFIX)
        self._work = OwnedTempDir(directory, TEMP_PREFIX)
        self._tmp = self._work.path
        self._manifests: dict[str, bytes] = {}

    def _blob(self, digest: str) -> str:
        return os.path.join(self._tmp, digest.split(":", 1)[1])

    def has_blob(self, desc: Descriptor) -> bool:
        return os.path.exists(self._blob(desc.digest))

    def put_blob(self, desc: Descriptor, path: str, *, mount_from: str | None = None) -> None:
        if not self.has_blob(desc):
            try:
                shutil.copyfile(path, self._blob(desc.digest))
            except OSError as e:
                raise StorageError(f"cannot write {self.path}: {e.strerror}") from None

    def put_manifest(self, data: bytes, desc: Descriptor) -> None:
        self._manifests[desc.digest] = data

    def commit(self, root: Descriptor, root_data: bytes) -> None:
        manifest = json.loads(root_data)
        if root.media_type in INDEX_TYPES:
            entries = manifest.get("manifests") or []
            if len(entries) != 1:
                raise InvalidInput("a docker-archive holds one platform; choose one with "
                                   "--platform")
            manifest = json.loads(self._manifests[entries[0]["digest"]])
        config = manifest["config"]["digest"].split(":", 1)[1]
        layers = [layer["digest"].split(":", 1)[1] for layer in manifest["layers"]]
        tags = [_short_name(self.image_name)] if self.image_name else []
        index = [{"Config": f"{config}.json", "RepoTags": tags,
                  "Layers": [f"{h}/layer.tar" for h in layers]}]
        # One image per archive: the last writer's is the one kept, whole.
        with archive_lock(self.path), atomic_output(self.path) as f, \
                tarfile.open(fileobj=f, mode="w") as tf:
            add_file(tf, f"{config}.json", self._blob("sha256:" + config))
            for h in dict.fromkeys(layers):
                add_file(tf, f"{h}/layer.tar", self._blob("sha256:" + h))
            data = json.dumps(index).encode()
            ti = tarfile.TarInfo("manifest.json")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

    def abort(self) -> None:
        self._work.cleanup()

    def close(self) -> None:
        self._work.cleanup()


class DockerArchiveTransport(Transport):
    """``docker-archive:PATH[:NAME[:TAG]]``."""

    name = "docker-archive"

    def parse(self, rest: str, text: str) -> ImageRef:
        path, suffix = split_path(self.name, rest)
        return ImageRef(self.name, path=path, name=parse_docker_name(suffix) if suffix else None)

    def open_source(self, ref: ImageRef, options: TransportOptions) -> ImageSource:
        return DockerArchiveSource(ref.path, ref.name)

    def open_destination(self, ref: ImageRef, options: TransportOptions) -> ImageDestination:
        return DockerArchiveDestination(ref.path, ref.name)


register_transport(DockerArchiveTransport())
