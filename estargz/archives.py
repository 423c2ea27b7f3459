"""Image archives: ``oci-archive:`` (a tar of an OCI layout) and
``docker-archive:`` (what ``docker save`` writes and ``docker load`` reads).

Both are written in a temporary place beside the destination and renamed
into place whole, so an archive appears complete or not at all.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from typing import BinaryIO, Optional

from ._exceptions import InvalidInput, NotFound, StorageError
from .descriptor import (DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, INDEX_TYPES,
                         Descriptor, sha256_digest)
from ._fsutil import atomic_output
from .imagestore import ImageDestination, ImageSource, copy_verified
from .layerinput import detect_compression
from .ocilayout import OCILayoutDestination, OCILayoutSource
from .reference import DockerName

DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"


def _safe_extract(tar_path: str, dest: str) -> None:
    """Extract an archive of regular files and directories only, inside ``dest``.

    A layout needs nothing else; refusing links and device nodes up front means
    a hostile archive cannot write outside ``dest``.
    """
    try:
        with tarfile.open(tar_path) as tf:
            members = tf.getmembers()
            for m in members:
                name = os.path.normpath(m.name)
                if name.startswith(("..", "/")) or not (m.isfile() or m.isdir()):
                    raise InvalidInput(f"{tar_path}: unexpected archive entry {m.name!r}")
            tf.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise InvalidInput(f"cannot read archive {tar_path}: {e}") from None


class OCIArchiveSource(OCILayoutSource):
    """An OCI layout inside a tar file, unpacked to a temporary directory."""

    def __init__(self, path: str, tag: Optional[str]) -> None:
        if not os.path.isfile(path):
            raise NotFound(f"oci-archive {path} does not exist")
        self._tmp = tempfile.mkdtemp(prefix="estargz-ociarchive-")
        try:
            _safe_extract(path, self._tmp)
            super().__init__(self._tmp, tag)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self.name = f"oci-archive:{path}" + (f":{tag}" if tag else "")

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


class OCIArchiveDestination(OCILayoutDestination):
    """Build an OCI layout in a temporary directory; tar and rename it on commit."""

    def __init__(self, path: str, tag: Optional[str]) -> None:
        self._archive = path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise StorageError(f"cannot write {path}: {directory} does not exist")
        self._tmp = tempfile.mkdtemp(prefix=".estargz-", dir=directory)
        super().__init__(os.path.join(self._tmp, "layout"), tag)
        self.name = f"oci-archive:{path}" + (f":{tag}" if tag else "")

    def commit(self, root: Descriptor, root_data: bytes) -> None:
        super().commit(root, root_data)
        _tar_dir_atomic(self.root_dir, self._archive)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def _tar_dir_atomic(root: str, dest: str) -> None:
    """Write the tree at ``root`` as the tar ``dest``, whole or not at all."""
    with atomic_output(dest) as f, tarfile.open(fileobj=f, mode="w",
                                                format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                _add_file(tf, os.path.relpath(full, root), full)


def _add_file(tf: tarfile.TarFile, arcname: str, path: str) -> None:
    """Add a file owned by nobody in particular, with a fixed mtime, so
    archives of the same content are identical."""
    ti = tf.gettarinfo(path, arcname)
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
    with open(path, "rb") as fh:
        tf.addfile(ti, fh)


def _short_name(name: DockerName) -> str:
    """How docker writes RepoTags: ``busybox:latest``, ``reg:5000/a/b:1``."""
    repo = name.repository
    if name.registry == "docker.io":
        repo = repo[len("library/"):] if repo.startswith("library/") else repo
        return f"{repo}:{name.tag or 'latest'}"
    return f"{name.registry}/{repo}:{name.tag or 'latest'}"


def _same_image(tag: str, name: DockerName) -> bool:
    from .reference import parse_docker_name
    try:
        other = parse_docker_name(tag)
    except InvalidInput:
        return False
    return (other.registry, other.repository, other.tag) == \
        (name.registry, name.repository, name.tag or "latest")


class DockerArchiveSource(ImageSource):
    """Read one image of a ``docker save`` archive (legacy or OCI-style)."""

    def __init__(self, path: str, name: Optional[DockerName]) -> None:
        self.name = f"docker-archive:{path}"
        self.path = path
        try:
            self._tar = tarfile.open(path)
        except FileNotFoundError:
            raise NotFound(f"docker-archive {path} does not exist") from None
        except (tarfile.TarError, OSError) as e:
            raise InvalidInput(f"cannot read docker-archive {path}: {e}") from None
        self._members = {os.path.normpath(m.name): m for m in self._tar.getmembers()}
        manifest = json.loads(self._read_member("manifest.json", 16 << 20))
        if not isinstance(manifest, list) or not manifest:
            raise InvalidInput(f"{path}: manifest.json lists no image")
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
        config = self._read_member(config_name, 16 << 20)
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
            "config": config_desc.to_json(), "layers": [l.to_json() for l in layers],
        }).encode()

    def _member(self, name: str) -> tarfile.TarInfo:
        m = self._members.get(os.path.normpath(name))
        if m is None or not m.isfile():
            raise InvalidInput(f"{self.path}: {name} is missing from the archive")
        return m

    def _read_member(self, name: str, limit: int) -> bytes:
        m = self._member(name)
        if m.size > limit:
            raise InvalidInput(f"{self.path}: {name} is implausibly large")
        return self._tar.extractfile(m).read()

    def _hash_member(self, name: str) -> tuple[str, int, str]:
        import hashlib
        f = self._tar.extractfile(self._member(name))
        h = hashlib.sha256()
        head = f.read(8)
        h.update(head)
        n = len(head)
        while piece := f.read(1 << 20):
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
        copy_verified(self._tar.extractfile(self._member(name)), dst, desc, self.name)

    def close(self) -> None:
        self._tar.close()


class DockerArchiveDestination(ImageDestination):
    """Write one image as a ``docker load``-able archive."""

    keeps_annotations = False

    def __init__(self, path: str, name: Optional[DockerName]) -> None:
        self.path = path
        self.image_name = name
        self.name = f"docker-archive:{path}"
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise StorageError(f"cannot write {path}: {directory} does not exist")
        self._tmp = tempfile.mkdtemp(prefix=".estargz-", dir=directory)
        self._manifests: dict[str, bytes] = {}

    def _blob(self, digest: str) -> str:
        return os.path.join(self._tmp, digest.split(":", 1)[1])

    def has_blob(self, desc: Descriptor) -> bool:
        return os.path.exists(self._blob(desc.digest))

    def put_blob(self, desc: Descriptor, path: str, *, mount_from: Optional[str] = None) -> None:
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
        layers = [l["digest"].split(":", 1)[1] for l in manifest["layers"]]
        tags = [_short_name(self.image_name)] if self.image_name else []
        index = [{"Config": f"{config}.json", "RepoTags": tags,
                  "Layers": [f"{h}/layer.tar" for h in layers]}]
        with atomic_output(self.path) as f, tarfile.open(fileobj=f, mode="w") as tf:
            _add_file(tf, f"{config}.json", self._blob("sha256:" + config))
            for h in dict.fromkeys(layers):
                _add_file(tf, f"{h}/layer.tar", self._blob("sha256:" + h))
            data = json.dumps(index).encode()
            ti = tarfile.TarInfo("manifest.json")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
