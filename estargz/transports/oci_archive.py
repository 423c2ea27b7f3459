"""``oci-archive:PATH[:TAG]``: a tar of an OCI layout.

Written in a temporary place beside the destination and renamed into place
whole, so an archive appears complete or not at all. Writers of one archive
take turns on the lock file ``PATH.lock`` beside it (the archive itself is
replaced by a rename, so its inode cannot carry a lock): each re-reads the
archive under the lock and adds its tag to what is there now.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
from collections.abc import Iterator

from .._exceptions import EstargzError, InvalidInput, NotFound, StorageError
from .._fsutil import (
    OwnedTempDir,
    atomic_output,
    locked_file,
    owned_tempdir,
    reclaim_tempdirs,
    unlink_quietly,
)
from ..image.descriptor import Descriptor
from ..image.reference import ImageRef
from ..image.store import ImageDestination, ImageSource, TransportOptions
from ..image.transport import register_transport
from ..layer.inputfile import require_regular_file
from .oci import (
    LOCK_FILE,
    TEMP_PREFIX,
    OCILayoutDestination,
    OCILayoutSource,
    OCITransport,
    add_to_layout,
    read_index,
)


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
        if not os.path.lexists(path):
            raise NotFound(f"oci-archive {path} does not exist")
        require_regular_file(path, "oci-archive")
        self._tmp = owned_tempdir("ociarchive")
        try:
            _safe_extract(path, self._tmp.path)
            super().__init__(self._tmp.path, tag)
        except BaseException:
            self._tmp.cleanup()
            raise
        self.name = f"oci-archive:{path}" + (f":{tag}" if tag else "")

    def close(self) -> None:
        self._tmp.cleanup()


class OCIArchiveDestination(OCILayoutDestination):
    """Build an OCI layout in a temporary directory; on commit, add it to
    the archive as it is then (under ``PATH.lock``), tar and rename."""

    # Not yet: an archive is rewritten only by commit, which carries one entry.
    holds_referrers = False

    def __init__(self, path: str, tag: str | None) -> None:
        self._archive = path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise StorageError(f"cannot write {path}: {directory} does not exist")
        reclaim_tempdirs(directory, TEMP_PREFIX)
        self._work = OwnedTempDir(directory, TEMP_PREFIX)
        try:
            super().__init__(os.path.join(self._work.path, "layout"), tag)
        except BaseException:
            self._work.cleanup()
            raise
        self.name = f"oci-archive:{path}" + (f":{tag}" if tag else "")

    def commit(self, root: Descriptor, root_data: bytes) -> None:
        super().commit(root, root_data)
        layout = self.root_dir
        with archive_lock(self._archive):
            if os.path.exists(self._archive) and os.path.getsize(self._archive) > 0:
                # Another writer's tags stay: unpack what is there now, add ours.
                current = os.path.join(self._work.path, "current")
                try:
                    _safe_extract(self._archive, current)
                    read_index(current)
                except EstargzError as e:
                    raise InvalidInput(f"{self._archive} exists and is not an oci-archive "
                                       f"({e}); remove it or write elsewhere") from None
                entry = read_index(layout)["manifests"][0]
                add_to_layout(current, os.path.join(layout, "blobs", "sha256"), [entry],
                              lock=False)
                layout = current
            tar_dir_atomic(layout, self._archive)

    def abort(self) -> None:
        super().abort()
        self._work.cleanup()

    def close(self) -> None:
        super().close()
        self._work.cleanup()


@contextlib.contextmanager
def archive_lock(path: str) -> Iterator[None]:
    """Hold the lock of archive ``path``: an exclusive flock on ``PATH.lock``.

    Every writer of the archive writes ``.NAME.*.tmp`` beside it and renames
    it into place while holding this lock, so such a file seen by the lock's
    holder is a killed writer's, and is removed.
    """
    with locked_file(path + ".lock"):
        directory, base = os.path.split(os.path.abspath(path))
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                if name.startswith(f".{base}.") and name.endswith(".tmp"):
                    unlink_quietly(os.path.join(directory, name))
        yield


def tar_dir_atomic(root: str, dest: str) -> None:
    """Write the tree at ``root`` as the tar ``dest``, whole or not at all."""
    with atomic_output(dest) as f, tarfile.open(fileobj=f, mode="w",
                                                format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if dirpath == root and name == LOCK_FILE:
                    continue  # the layout's lock is no part of the image
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
