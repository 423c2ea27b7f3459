"""``oci-archive:PATH[:TAG]``: a tar of an OCI layout.

Written in a temporary place beside the destination and renamed into place
whole, so an archive appears complete or not at all.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile

from .._exceptions import InvalidInput, NotFound, StorageError
from .._fsutil import atomic_output
from ..image.descriptor import Descriptor
from ..image.reference import ImageRef
from ..image.store import ImageDestination, ImageSource, TransportOptions
from ..image.transport import register_transport
from .oci import OCILayoutDestination, OCILayoutSource, OCITransport


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

    def __init__(self, path: str, tag: str | None) -> None:
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

    def __init__(self, path: str, tag: str | None) -> None:
        self._archive = path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise StorageError(f"cannot write {path}: {directory} does not exist")
        self._tmp = tempfile.mkdtemp(prefix=".estargz-", dir=directory)
        super().__init__(os.path.join(self._tmp, "layout"), tag)
        self.name = f"oci-archive:{path}" + (f":{tag}" if tag else "")

    def commit(self, root: Descriptor, root_data: bytes) -> None:
        super().commit(root, root_data)
        tar_dir_atomic(self.root_dir, self._archive)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def tar_dir_atomic(root: str, dest: str) -> None:
    """Write the tree at ``root`` as the tar ``dest``, whole or not at all."""
    with atomic_output(dest) as f, tarfile.open(fileobj=f, mode="w",
                                                format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                add_file(tf, os.path.relpath(full, root), full)


def add_file(tf: tarfile.TarFile, arcname: str, path: str) -> None:
    """Add a file owned by nobody in particular, with a fixed mtime, so
    archives of the same content are identical."""
    ti = tf.gettarinfo(path, arcname)
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
    with open(path, "rb") as fh:
        tf.addfile(ti, fh)


class OCIArchiveTransport(OCITransport):
    """``oci-archive:PATH[:TAG]``: references parse as ``oci:`` ones do."""

    name = "oci-archive"

    def open_source(self, ref: ImageRef, options: TransportOptions) -> ImageSource:
        return OCIArchiveSource(ref.path, ref.tag)

    def open_destination(self, ref: ImageRef, options: TransportOptions) -> ImageDestination:
        return OCIArchiveDestination(ref.path, ref.tag)


register_transport(OCIArchiveTransport())
