"""An image's root filesystem, assembled from its layers for profiling.

``estargz optimize`` runs the image's workload to learn which files start-up
reads. The workload needs the image's root filesystem: each layer is
extracted into a directory of its own, in the format overlayfs reads for a
lower directory, and the directories are stacked with one read-write
overlayfs mount (:class:`OverlayRoot`). Whiteouts and opaque directories are
then honoured by the kernel exactly as containerd's overlay snapshotter
would, and each layer's :class:`~profiler.layermap.LayerListing` says what it
holds, so that :mod:`profiler.layermap` can tell which layer provides each
file the workload touched.

Layers are hostile input. Extraction never reads or writes outside the
destination directory, whatever the names, symlinks and hardlinks in the tar:

* names are normalised lexically (leading ``/`` stripped, ``.`` dropped,
  ``..`` applied to the text); a name whose ``..`` climbs above the root is
  refused;
* every entry is created relative to a file descriptor of its parent
  directory, reached by opening one component at a time from the root with
  ``O_NOFOLLOW | O_DIRECTORY``: no symlink is ever followed, so a symlink the
  layer planted earlier (``etc -> /etc``) cannot redirect a later entry;
* an entry whose parent is a symlink (or a file) is **refused** with
  :class:`~estargz.UnsupportedEntry`: tar writers never put entries below a
  symlink, and the alternatives (write through it, as containerd does inside
  its root; or silently turn it into a directory) would give an image that
  differs from what some runtime sees;
* a hardlink's target is looked up the same way and must be a regular file
  this layer already extracted (cross-layer and out-of-root targets are
  refused);
* a later entry replaces an earlier one of the same name (tar semantics): a
  directory stays a directory (its metadata updated), anything else is
  removed first (a directory with its contents, by a walk with directory
  fds that follows no symlink);
* names longer than ``PATH_MAX`` are refused, which also bounds how deep a
  tree the walks meet.

Whiteouts become what overlayfs expects in a lower directory: ``.wh.NAME``
is a character device 0/0 named ``NAME``; ``DIR/.wh..wh..opq`` sets the
``trusted.overlay.opaque=y`` xattr on ``DIR``. As the OCI spec says, a
whiteout applies to lower layers only: if the layer also holds ``NAME``, the
entry stays (a directory becomes opaque). ``trusted.overlay.*`` xattrs carried
by the tar itself are dropped: an image must not steer overlayfs (redirects,
opacity the listing would not know about). Other aufs metadata
(``.wh..wh.plnk`` etc.) is skipped, as Docker does.

Everything here needs root: device nodes, whiteouts, ownership, ``trusted.*``
xattrs and the mount itself; all but flat mode.

**Flat mode** (``extract_layer(..., flat=True)``) is for a caller without
real root: rootless profiling runs as root of a user namespace of its own,
where overlayfs cannot serve (fanotify refuses the mount marks it needs on
overlayfs), so :mod:`profiler.flatroot` merges the layers into one plain
tree instead. A layer extracted flat holds only what such a caller can make,
and the listing still says everything the layer means:

* whiteouts and opaque markers are recorded in the listing but nothing is
  made on disk for them (a 0/0 device and ``trusted.overlay.opaque`` both
  need real root); the merge applies them from the listing;
* an owner the user namespace does not map (``chown`` gives EINVAL) leaves
  the entry to the namespace's root: one warning per layer, not an error;
* character and block devices are skipped with a warning and not listed,
  whatever the privileges, so that a flat tree is the same whoever made it
  (a sandbox mounts its own ``/dev``); FIFOs are made;
* extended attributes the kernel refuses (EPERM, EOPNOTSUPP: ``trusted.*``
  in a user namespace, any on a filesystem without them) are skipped and
  recorded in ``skipped_xattrs``.

The safety rules above are the same in both modes, and so is the listing,
apart from the skipped devices and the warnings.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import os
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from decimal import Decimal, InvalidOperation
from typing import Callable, Iterator, Optional, Sequence

from estargz._exceptions import InvalidInput, StorageError, UnsupportedEntry
from estargz._tarstream import PeekableStream, iter_headers
from estargz.descriptor import (CONVERTIBLE_LAYERS, DOCKER_FOREIGN_LAYER,
                                OCI_LAYER_NONDIST_GZIP, Descriptor)
from estargz.imagestore import ImageSource
from estargz.layerinput import open_tar
from estargz.tarindex import check_member, printable

from .layermap import (BLOCK, CHAR, DIR, FIFO, HARDLINK, REG, SYMLINK, LayerListing,
                       layer_for)

__all__ = ["LayerListing", "extract_layer", "OverlayRoot", "assemble_image_rootfs",
           "LAYER_MEDIA_TYPES", "OVL_MAX_STACK"]

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
AUFS_META_PREFIX = ".wh..wh."
OPAQUE_XATTR = "trusted.overlay.opaque"
_OVERLAY_XATTRS = "trusted.overlay."
_XATTR_PAX = "SCHILY.xattr."

#: Layer media types whose blobs are tar, tar+gzip or tar+zstd.
LAYER_MEDIA_TYPES = frozenset({
    *CONVERTIBLE_LAYERS, DOCKER_FOREIGN_LAYER, OCI_LAYER_NONDIST_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
})

#: overlayfs's limit on lower directories in one mount (OVL_MAX_STACK).
OVL_MAX_STACK = 500

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_CACHED_FDS = 256
_COPY = 1 << 20
#: Longest entry name (Linux's PATH_MAX): no process could open a longer path,
#: and it bounds the depth of the trees walked here.
MAX_NAME = 4096


# --- names ---------------------------------------------------------------------

def entry_path(name: str, entry: Optional[str] = None) -> str:
    """A tar name as a path inside the layer: ``/a/./b/../c/`` -> ``a/c``,
    ``""`` for the root. Raises :class:`UnsupportedEntry` if ``..`` climbs
    above the root (``../x``, ``a/../../x``)."""
    if len(name.encode("utf-8", "surrogateescape")) >= MAX_NAME:
        raise UnsupportedEntry(printable(entry if entry is not None else name)[:200] + "...",
                               f"name is longer than PATH_MAX ({MAX_NAME} bytes)")
    parts: list[str] = []
    for c in name.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            if not parts:
                raise UnsupportedEntry(printable(entry if entry is not None else name),
                                       "path climbs out of the layer root with '..'")
            parts.pop()
        else:
            parts.append(c)
    return "/".join(parts)


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    """Modification time in ns, exact for fractional PAX mtimes."""
    raw = ti.pax_headers.get("mtime")
    if raw:
        try:
            return int(Decimal(raw) * 1_000_000_000)
        except (InvalidOperation, ValueError):
            pass
    return int(ti.mtime) * 1_000_000_000


def _open_dir(name: str, dir_fd: int) -> int:
    """Open directory ``name`` of ``dir_fd``, refusing to follow a symlink."""
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _lstat(name: str, dir_fd: int) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _open_beneath(root_fd: int, rel: str) -> Optional[int]:
    """A new fd of directory ``rel`` under ``root_fd``, walked one component
    at a time without following symlinks; ``None`` if it is not there (or
    not a directory all the way down)."""
    fd = os.dup(root_fd)
    try:
        for c in rel.split("/") if rel else ():
            nxt = _open_dir(c, fd)
            os.close(fd)
            fd = nxt
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    return fd


def _remove_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` of ``dir_fd`` and, if a directory, all below it.

    Walks with directory fds and follows no symlink, like
    :func:`shutil.rmtree` (which takes ``dir_fd`` only from Python 3.11),
    but without recursion: a hostile layer's tree may be 2 000 deep."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    # (parent fd, name, fd, subdirectories still to remove)
    stack: list[tuple[int, str, int, list[str]]] = []

    def push(parent: int, child: str) -> None:
        fd = _open_dir(child, parent)
        subdirs = []
        try:
            with os.scandir(fd) as it:
                entries = list(it)
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(e.name)
                else:
                    os.unlink(e.name, dir_fd=fd)
        except BaseException:
            os.close(fd)
            raise
        stack.append((parent, child, fd, subdirs))

    try:
        push(dir_fd, name)
        while stack:
            parent, child, fd, subdirs = stack[-1]
            if subdirs:
                push(fd, subdirs.pop())
                continue
            stack.pop()
            os.close(fd)
            os.rmdir(child, dir_fd=parent)
    finally:
        for _, _, fd, _ in stack:
            os.close(fd)


def remove_tree(path: str) -> None:
    """Delete ``path`` (a directory tree, or anything) if it exists, without
    following symlinks; :class:`~estargz.StorageError` if that fails."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StorageError(f"cannot remove {path}: {e.strerror}") from None
    try:
        _remove_at(pfd, name)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StorageError(f"cannot remove {path}: {e.filename or ''} {e.strerror}") from None
    finally:
        os.close(pfd)


def _proc_path(dir_fd: int, name: str) -> str:
    """A path naming ``name`` in directory ``dir_fd`` for calls that take no
    ``dir_fd`` (``lsetxattr``): ``/proc/self/fd/N`` is the directory itself,
    whatever happened to its path since it was opened."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, n: int, entry: str) -> None:
    """Copy ``n`` bytes between file offsets, in the kernel when it can."""
    use_kernel = True
    while n > 0:
        if use_kernel:
            try:
                got = os.copy_file_range(src, dst, min(n, 1 << 30), src_off, dst_off)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                                   errno.EPERM):
                    raise
                use_kernel = False
                continue
        else:
            data = os.pread(src, min(n, _COPY), src_off)
            got = len(data)
            if got:
                view = memoryview(data)
                while view:
                    view = view[os.pwrite(dst, view, dst_off + got - len(view)):]
        if got == 0:
            raise InvalidInput(f"layer tar is truncated in the data of {printable(entry)!r}")
        src_off, dst_off, n = src_off + got, dst_off + got, n - got


# --- extraction --------------------------------------------------------------------

class _Extractor:
    """Applies tar entries, one at a time, below an open root directory."""

    def __init__(self, root_fd: int, dest: str,
                 lowers: Sequence[tuple[str, LayerListing]], flat: bool = False) -> None:
        self.root_fd = root_fd
        self.dest = dest
        self.lowers = lowers
        self.lower_listings = [listing for _, listing in lowers]
        self.listing = LayerListing()
        self.flat = flat
        # Root of a user namespace counts: it may chown to the ids it maps.
        self.as_root = os.geteuid() == 0
        # Flat mode: entries whose owner the user namespace does not map
        # (count, first entry, its ids), reported as one warning.
        self._unmapped = 0
        self._first_unmapped: tuple[str, int, int] = ("", 0, 0)
        # Directory fds by layer path, so that entries sharing a parent (a
        # sorted tar) do not walk from the root each time. Dropped for a
        # path whenever an entry removes it.
        self._fds: dict[str, int] = {"": root_fd}
        # Directory mode and mtime, applied after the last entry: creating
        # children changes a directory's mtime, and a read-only directory
        # must stay writable while it fills (for a non-root caller).
        self._dir_meta: dict[str, tuple[int, Optional[int]]] = {}

    # -- directory descriptors --

    def close(self) -> None:
        for rel, fd in self._fds.items():
            if rel:
                os.close(fd)
        self._fds = {"": self.root_fd}

    def _forget(self, rel: str) -> None:
        """Close cached fds of ``rel`` and everything below it."""
        for key in [k for k in self._fds if k == rel or k.startswith(rel + "/")]:
            if key:
                os.close(self._fds.pop(key))

    def _dir(self, rel: str, entry: str, create: bool = True) -> Optional[int]:
        """The fd (cached; do not close) of directory ``rel``, reached from
        the root without following any symlink. Missing directories are
        created as implicit ones (``create``) or give ``None``; a symlink or
        file on the way is refused (or gives ``None`` without ``create``)."""
        fd = self._fds.get(rel)
        if fd is not None:
            return fd
        # Walk down from the deepest directory already open (in a sorted tar,
        # the parent of the previous entry).
        parts = rel.split("/")
        prefixes = list(itertools.accumulate(parts, lambda a, b: f"{a}/{b}"))
        k = len(parts) - 1
        while k and prefixes[k - 1] not in self._fds:
            k -= 1
        at = prefixes[k - 1] if k else ""
        cur, owned = self._fds[at], False
        try:
            for c in parts[k:]:
                at = f"{at}/{c}" if at else c
                nxt = self._step(cur, at, c, entry, create)
                if owned:
                    os.close(cur)
                    owned = False
                if nxt is None:
                    return None
                cur, owned = nxt, True
        except BaseException:
            if owned:
                os.close(cur)
            raise
        self._fds[rel] = cur
        return cur

    def _step(self, pfd: int, rel: str, base: str, entry: str, create: bool) -> Optional[int]:
        """Open directory ``base`` (layer path ``rel``) of ``pfd``: see :meth:`_dir`."""
        try:
            return _open_dir(base, pfd)
        except FileNotFoundError:
            if not create:
                return None
            if not (self.flat and rel in self.listing.whiteouts):
                self._mkdir_implicit(pfd, rel, base)
                return _open_dir(base, pfd)
            # Flat mode made nothing on disk for the whiteout of `rel`: this
            # is the on-disk whiteout case below. (In either mode a path the
            # listing whites out holds the whiteout or a later entry.)
            return self._whited_out_parent(pfd, rel, base)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            if not create:
                return None
        st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        if not (_is_whiteout(st) and rel in self.listing.whiteouts):
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise UnsupportedEntry(printable(entry), f"its parent {printable(rel)!r} is "
                                   f"{what}; entries below one are refused")
        os.unlink(base, dir_fd=pfd)
        return self._whited_out_parent(pfd, rel, base)

    def _whited_out_parent(self, pfd: int, rel: str, base: str) -> int:
        """`.wh.d` then `d/x`: d is a directory of this layer again, and what
        the lower layers hold in it stays deleted (an opaque directory)."""
        self._mkdir_implicit(pfd, rel, base, from_lower=False)
        fd = _open_dir(base, pfd)
        try:
            self._set_opaque(fd, rel)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _trim_cache(self) -> None:
        if len(self._fds) > _MAX_CACHED_FDS:
            self.close()

    def _mkdir_implicit(self, pfd: int, rel: str, base: str, from_lower: bool = True) -> None:
        """Create a parent directory the layer has no entry for.

        Diff layers leave unchanged parents out, yet overlayfs shows the
        top-most layer's copy of a directory: it gets the metadata of the
        directory the lower layers show at that path (as containerd's
        applier does), else 0755 root."""
        os.mkdir(base, 0o700, dir_fd=pfd)
        self.listing.implicit_dirs.add(rel)
        meta = self._lower_dir_meta(rel) if from_lower else None
        if meta is None:
            self._dir_meta[rel] = (0o755, None)
            return
        mode, uid, gid, mtime = meta
        if self.as_root:
            self._chown(lambda u, g: os.chown(base, u, g, dir_fd=pfd, follow_symlinks=False),
                        uid, gid, rel)
        self._dir_meta[rel] = (mode, mtime)

    def _lower_dir_meta(self, rel: str) -> Optional[tuple[int, int, int, int]]:
        """Mode, owner and mtime of the directory the layers below show at
        ``rel``, unless this layer already hides it (an opaque or whited-out
        ancestor)."""
        if not self.lowers:
            return None
        parent = rel.rpartition("/")[0]
        for a in itertools.accumulate(parent.split("/"), lambda x, y: f"{x}/{y}") if parent else ():
            if a in self.listing.opaque_dirs or a in self.listing.whiteouts:
                return None
        i = layer_for(rel, self.lower_listings)
        if i is None:
            return None
        kind = self.lower_listings[i].kinds[rel]
        if kind != DIR:
            # containerd would resolve the path through the lower symlink;
            # overlayfs shows this layer's directory instead.
            self.listing.warnings.append(
                f"{rel!r}: implied directory hides the {kind} of layer {i}")
            return None
        root = os.open(self.lowers[i][0], _DIR_FLAGS)
        try:
            fd = _open_beneath(root, rel)
        finally:
            os.close(root)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns

    # -- replacing earlier entries --

    def _make_room(self, pfd: int, rel: str, base: str, new_is_dir: bool) -> bool:
        """Remove what an earlier entry put at ``rel``; True if it is a
        directory and the new entry is one too (kept, tar semantics)."""
        st = _lstat(base, pfd)
        if st is None:
            return False
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir and new_is_dir:
            return True
        self._forget(rel)
        _remove_at(pfd, base)  # follows no symlink
        self._drop(rel, subtree=is_dir)
        return False

    def _drop(self, rel: str, subtree: bool) -> None:
        """Forget listing records of a removed ``rel`` (and what was below).
        A whiteout of ``rel`` itself stays: it speaks of the lower layers."""
        lst = self.listing
        for d in (lst.kinds, lst.symlinks, lst.hardlinks, self._dir_meta):
            d.pop(rel, None)
        lst.opaque_dirs.discard(rel)
        lst.implicit_dirs.discard(rel)
        if not subtree:
            return
        below = rel + "/"
        for d in (lst.kinds, lst.symlinks, lst.hardlinks, self._dir_meta):
            for k in [k for k in d if k.startswith(below)]:
                del d[k]
        for s in (lst.opaque_dirs, lst.implicit_dirs, lst.whiteouts):
            s.difference_update([k for k in s if k.startswith(below)])

    # -- metadata --

    def _own(self, ti: tarfile.TarInfo, fd: Optional[int] = None,
             at: Optional[tuple[int, str]] = None) -> None:
        if not self.as_root:
            return
        if fd is not None:
            self._chown(lambda u, g: os.fchown(fd, u, g), ti.uid, ti.gid, ti.name)
        else:
            assert at is not None
            self._chown(lambda u, g: os.chown(at[1], u, g, dir_fd=at[0], follow_symlinks=False),
                        ti.uid, ti.gid, ti.name)

    def _chown(self, chown: Callable[[int, int], None], uid: int, gid: int,
               entry: str) -> None:
        """``chown(uid, gid)``; in flat mode, ids the user namespace does not
        map (EINVAL) are left to its root, the other id still set."""
        try:
            chown(uid, gid)
            return
        except OSError as e:
            if not (self.flat and e.errno == errno.EINVAL):
                raise
        for u, g in ((uid, -1), (-1, gid)):
            try:
                chown(u, g)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        if not self._unmapped:
            self._first_unmapped = (entry, uid, gid)
        self._unmapped += 1

    def unmapped_warning(self) -> None:
        """Add the one warning about owners the user namespace cannot hold."""
        if self._unmapped:
            entry, uid, gid = self._first_unmapped
            n = self._unmapped
            what = "entry has an owner" if n == 1 else "entries have owners"
            self.listing.warnings.append(
                f"{n} {what} this user namespace does not map (first "
                f"{printable(entry)!r}, {uid}:{gid}); owned by its root instead")

    def _xattrs(self, ti: tarfile.TarInfo, rel: str, kind: str,
                set_one: Callable[[str, bytes], None]) -> None:
        """Apply the entry's ``SCHILY.xattr.*`` records.

        ``security.*`` ones the kernel refuses (an LSM not loaded, no
        privilege) are skipped and recorded, as are ``user.*`` ones on
        symlinks and special files, which Linux cannot hold."""
        for key, value in ti.pax_headers.items():
            if not key.startswith(_XATTR_PAX):
                continue
            name = key[len(_XATTR_PAX):]
            if name.startswith(_OVERLAY_XATTRS):
                self.listing.skipped_xattrs.append(
                    (rel, name, "overlayfs metadata in an image is not honoured"))
                continue
            try:
                set_one(name, value.encode("utf-8", "surrogateescape"))
            except OSError as e:
                refused = e.errno in (errno.EPERM, errno.EOPNOTSUPP)
                special = kind not in (REG, DIR) and refused
                if name.startswith("security.") or special or (self.flat and refused):
                    self.listing.skipped_xattrs.append((rel, name, e.strerror or str(e)))
                    continue
                raise

    def _set_opaque(self, fd: int, rel: str) -> None:
        if not self.flat:  # flat: the listing alone carries it to the merge
            os.setxattr(fd, OPAQUE_XATTR, b"y")
        self.listing.opaque_dirs.add(rel)

    # -- entries --

    def apply(self, ti: tarfile.TarInfo, data_fd: int, data_size: int) -> None:
        self._trim_cache()
        rel = entry_path(ti.name)
        if not rel:
            self._root(ti)
            return
        parent, _, base = rel.rpartition("/")
        if any(c.startswith(AUFS_META_PREFIX) for c in parent.split("/")) or (
                base.startswith(AUFS_META_PREFIX) and base != OPAQUE_MARKER):
            # aufs bookkeeping (.wh..wh.plnk, .wh..wh.orph), as Docker skips it
            self.listing.warnings.append(f"{rel!r}: aufs metadata skipped")
            return
        if base == OPAQUE_MARKER:
            self._set_opaque(self._dir(parent, ti.name), parent)  # type: ignore[arg-type]
            return
        if base.startswith(WHITEOUT_PREFIX):
            target = base[len(WHITEOUT_PREFIX):]
            if target in ("", ".", ".."):
                raise UnsupportedEntry(printable(ti.name), "whiteout of an invalid name")
            self._whiteout(f"{parent}/{target}" if parent else target, ti.name, replace=False)
            return
        if ti.ischr() and ti.devmajor == 0 and ti.devminor == 0:
            # overlayfs reads a 0/0 character device as a whiteout: record it
            # as one, so that the listing says what the mount will show.
            self.listing.warnings.append(f"{rel!r}: character device 0/0 is a whiteout")
            self._whiteout(rel, ti.name, replace=True)
            return
        pfd = self._dir(parent, ti.name)
        assert pfd is not None
        if ti.isdir():
            self._directory(pfd, rel, base, ti)
        elif ti.issym():
            self._symlink(pfd, rel, base, ti)
        elif ti.islnk():
            self._hardlink(pfd, rel, base, ti)
        elif ti.ischr() or ti.isblk() or ti.isfifo():
            self._special(pfd, rel, base, ti)
        else:
            self._file(pfd, rel, base, ti, data_fd, data_size)

    def _root(self, ti: tarfile.TarInfo) -> None:
        if not ti.isdir():
            raise UnsupportedEntry(printable(ti.name),
                                   "names the layer root but is not a directory")
        self._own(ti, fd=self.root_fd)
        self._xattrs(ti, "", DIR, lambda k, v: os.setxattr(self.root_fd, k, v))
        self._dir_meta[""] = (ti.mode & 0o7777, _mtime_ns(ti))

    def _whiteout(self, rel: str, entry: str, replace: bool) -> None:
        parent, _, base = rel.rpartition("/")
        pfd = self._dir(parent, entry)
        assert pfd is not None
        st = _lstat(base, pfd)
        if st is not None and not replace:
            # The layer holds `rel` too: a whiteout deletes lower layers'
            # content only, so the entry stays; a directory turns opaque.
            if stat.S_ISDIR(st.st_mode):
                fd = _open_dir(base, pfd)
                try:
                    self._set_opaque(fd, rel)
                finally:
                    os.close(fd)
        else:
            if st is not None:
                self._make_room(pfd, rel, base, False)
            if not self.flat:  # flat: the listing alone carries it to the merge
                os.mknod(base, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
        self.listing.whiteouts.add(rel)

    def _directory(self, pfd: int, rel: str, base: str, ti: tarfile.TarInfo) -> None:
        if not self._make_room(pfd, rel, base, True):
            os.mkdir(base, 0o700, dir_fd=pfd)
        fd = _open_dir(base, pfd)
        try:
            self._own(ti, fd=fd)
            self._xattrs(ti, rel, DIR, lambda k, v: os.setxattr(fd, k, v))
            if rel in self.listing.whiteouts:
                self._set_opaque(fd, rel)
        finally:
            os.close(fd)
        self.listing.implicit_dirs.discard(rel)
        self.listing.kinds[rel] = DIR
        self._dir_meta[rel] = (ti.mode & 0o7777, _mtime_ns(ti))

    def _file(self, pfd: int, rel: str, base: str, ti: tarfile.TarInfo,
              data_fd: int, data_size: int) -> None:
        self._make_room(pfd, rel, base, False)
        fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=pfd)
        try:
            self._copy_data(ti, data_fd, data_size, fd)
            self._own(ti, fd=fd)  # before chmod: chown clears set-id bits
            os.fchmod(fd, ti.mode & 0o7777)
            # after chown: it clears security.capability
            self._xattrs(ti, rel, REG, lambda k, v: os.setxattr(fd, k, v))
            mtime = _mtime_ns(ti)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)
        self.listing.kinds[rel] = REG

    @staticmethod
    def _copy_data(ti: tarfile.TarInfo, src: int, src_size: int, dst: int) -> None:
        if ti.sparse:
            pieces, stored = [], ti.offset_data
            for off, n in sorted(ti.sparse):
                pieces.append((stored, off, n))
                stored += n
        else:
            pieces = [(ti.offset_data, 0, ti.size)]
        for src_off, dst_off, n in pieces:
            if src_off + n > src_size:
                raise InvalidInput(f"layer tar is truncated in the data of {printable(ti.name)!r}")
            _copy_range(src, src_off, dst, dst_off, n, ti.name)
        if ti.sparse:
            os.ftruncate(dst, ti.size)  # holes, and a trailing one

    def _symlink(self, pfd: int, rel: str, base: str, ti: tarfile.TarInfo) -> None:
        if not ti.linkname:
            raise UnsupportedEntry(printable(ti.name), "symlink with an empty target")
        self._make_room(pfd, rel, base, False)
        # Stored as written: it is only ever read, never followed, here.
        os.symlink(ti.linkname, base, dir_fd=pfd)
        self._own(ti, at=(pfd, base))
        self._xattrs(ti, rel, SYMLINK, lambda k, v: os.setxattr(
            _proc_path(pfd, base), k, v, follow_symlinks=False))
        mtime = _mtime_ns(ti)
        os.utime(base, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)
        self.listing.kinds[rel] = SYMLINK
        self.listing.symlinks[rel] = ti.linkname

    def _hardlink(self, pfd: int, rel: str, base: str, ti: tarfile.TarInfo) -> None:
        target = entry_path(ti.linkname, ti.name)
        if target == rel:
            if self.listing.kinds.get(rel) in (REG, HARDLINK):
                return  # a link to itself: nothing to do
            raise UnsupportedEntry(printable(ti.name), "hardlink to itself")
        self._make_room(pfd, rel, base, False)
        tparent, _, tbase = target.rpartition("/")
        tpfd = self._dir(tparent, ti.name, create=False) if target else None
        st = _lstat(tbase, tpfd) if tpfd is not None else None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise UnsupportedEntry(printable(ti.name),
                                   f"hardlink target {printable(ti.linkname)!r} "
                                   "is not a regular file extracted from this layer")
        assert tpfd is not None
        os.link(tbase, base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
        self.listing.kinds[rel] = HARDLINK
        self.listing.hardlinks[rel] = target

    def _special(self, pfd: int, rel: str, base: str, ti: tarfile.TarInfo) -> None:
        self._make_room(pfd, rel, base, False)
        if self.flat and not ti.isfifo():
            # A user namespace cannot make device nodes (EPERM). Skipped even
            # when it could, so that a flat tree does not depend on who made it.
            self.listing.warnings.append(
                f"{rel!r}: {'character' if ti.ischr() else 'block'} device "
                f"{ti.devmajor}/{ti.devminor} skipped (flat extraction)")
            return
        if ti.isfifo():
            fmt, dev, kind = stat.S_IFIFO, 0, FIFO
        else:
            fmt = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK
            dev, kind = os.makedev(ti.devmajor, ti.devminor), CHAR if ti.ischr() else BLOCK
        os.mknod(base, fmt | 0o600, dev, dir_fd=pfd)
        self._own(ti, at=(pfd, base))
        # Never opened (opening a device can have effects): chmod by name,
        # which cannot be a symlink, we just made it.
        os.chmod(base, ti.mode & 0o7777, dir_fd=pfd, follow_symlinks=False)
        self._xattrs(ti, rel, kind, lambda k, v: os.setxattr(
            _proc_path(pfd, base), k, v, follow_symlinks=False))
        mtime = _mtime_ns(ti)
        os.utime(base, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)
        self.listing.kinds[rel] = kind

    def finish(self) -> None:
        """Apply the deferred directory modes and mtimes.

        Parents come before children (sorted by component), walking down
        with the fds of the current path held open, so that each directory
        costs one open however deep it is."""
        self.close()
        path: list[tuple[str, int]] = [("", self.root_fd)]  # fds from the root down
        try:
            for rel in sorted(self._dir_meta, key=lambda p: p.split("/") if p else []):
                while path[-1][0] and not rel.startswith(path[-1][0] + "/"):
                    os.close(path.pop()[1])
                at, fd = path[-1]
                for c in rel[len(at):].lstrip("/").split("/") if rel != at else ():
                    at = f"{at}/{c}" if at else c
                    try:
                        fd = _open_dir(c, fd)
                    except OSError as e:
                        if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                            raise
                        break  # replaced by a later entry
                    path.append((at, fd))
                if at != rel:
                    continue
                mode, mtime = self._dir_meta[rel]
                os.fchmod(fd, mode)
                if mtime is not None:
                    os.utime(fd, ns=(mtime, mtime))
        finally:
            for _, fd in path[1:]:
                os.close(fd)


def _prepare_dest(dest: str) -> bool:
    """Create ``dest`` (True) or check it is an empty directory (False)."""
    try:
        os.mkdir(dest, 0o755)
        return True
    except FileExistsError:
        pass
    except OSError as e:
        raise StorageError(f"cannot create {dest}: {e.strerror}") from None
    if os.path.islink(dest) or not os.path.isdir(dest) or os.listdir(dest):
        raise StorageError(f"{dest} must be an empty directory (or not exist)")
    return False


def extract_layer(tar_path: str, dest: str, *,
                  lowers: Sequence[tuple[str, LayerListing]] = (),
                  spool_dir: Optional[str] = None, flat: bool = False) -> LayerListing:
    """Extract the layer at ``tar_path`` (tar, tar+gzip or tar+zstd) into
    ``dest`` as an overlayfs lower directory, and say what it holds.

    ``dest`` must not exist or be empty; it is removed again on failure if
    this call created it. ``lowers`` are the already extracted layers below,
    bottom to top, as ``(directory, listing)``: directories this layer needs
    but has no entry for take their metadata from there (in flat mode the
    directory may be the same merged tree for every layer). ``spool_dir``
    holds the decompressed tar of a compressed layer while it is read.

    ``flat=True`` extracts for :mod:`profiler.flatroot`'s merge, as root of
    a user namespace can (see the module docstring): no whiteout devices or
    overlayfs xattrs, no device nodes, unmapped owners and refused xattrs
    tolerated. The listing is the same as without it, but for the skipped
    devices and the warnings.

    Raises :class:`~estargz.InvalidInput` (or its :class:`~estargz.UnsupportedEntry`)
    for a malformed or refused layer (see the module docstring) and
    :class:`~estargz.StorageError` if the filesystem fails.
    """
    created = _prepare_dest(dest)
    ok = False
    try:
        try:
            root_fd = os.open(dest, _DIR_FLAGS)
        except OSError as e:
            raise StorageError(f"cannot open {dest}: {e.strerror}") from None
        ex = _Extractor(root_fd, dest, lowers, flat=flat)
        try:
            with open_tar(tar_path, tmpdir=spool_dir) as f:
                fd = f.fileno()
                size = os.fstat(fd).st_size
                stream = PeekableStream(f, seekable=True)
                last = None
                for ti in iter_headers(stream):
                    check_member(ti)
                    last = ti
                    try:
                        ex.apply(ti, fd, size)
                    except OSError as e:
                        raise StorageError(f"cannot extract {printable(ti.name)!r} "
                                           f"into {dest}: {e.strerror or e}") from None
                    except (OverflowError, ValueError) as e:
                        # out-of-range ids or times, a NUL in a link target
                        raise UnsupportedEntry(printable(ti.name),
                                               f"cannot be extracted: {e}") from None
                if stream.tell() > size:
                    name = printable(last.name) if last is not None else "?"
                    raise InvalidInput(f"layer tar is truncated in the data of {name!r}")
            try:
                ex.finish()
            except OSError as e:
                raise StorageError(f"cannot set directory metadata in {dest}: "
                                   f"{e.strerror or e}") from None
            ex.unmapped_warning()
        finally:
            ex.close()
            os.close(root_fd)
        ok = True
        return ex.listing
    finally:
        if not ok and created:
            with contextlib.suppress(StorageError):
                remove_tree(dest)


# --- mounting ------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MS_NODEV = 4
MNT_DETACH = 2
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# mount(2) run from a child process (see OverlayRoot._mount): argv is
# options, mount point, flags.
_CHILD_MOUNT = """
import ctypes, ctypes.util, os, sys
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
if libc.mount(b"overlay", os.fsencode(sys.argv[2]), b"overlay", int(sys.argv[3]),
              os.fsencode(sys.argv[1])) != 0:
    sys.exit(os.strerror(ctypes.get_errno()))
"""


def _mount_overlay(options: str, target: str, flags: int) -> None:
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", flags,
                   os.fsencode(options)) != 0:
        e = ctypes.get_errno()
        raise StorageError(f"cannot mount overlayfs on {target}: {os.strerror(e)}")


def _unescape(field: str) -> str:
    """Decode the octal escapes (``\\040``) of /proc/self/mountinfo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace, deepest first."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape(line.split()[4])
            if mp == root or mp.startswith(root + "/"):
                found.append(mp)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def _unmount_all(path: str) -> list[str]:
    """Unmount everything at or below ``path``, detaching busy mounts;
    return what is still mounted after a few rounds."""
    for attempt in range(10):
        left = mounts_under(path)
        if not left:
            return []
        for mp in left:
            b = os.fsencode(mp)
            if _libc.umount2(b, 0) != 0 and ctypes.get_errno() == errno.EBUSY:
                # Something still uses it (a process of the workload, an
                # open file): detach now, the kernel frees it when unused.
                _libc.umount2(b, MNT_DETACH)
        time.sleep(0.02 * attempt)  # stacked mounts need a further round
    return mounts_under(path)


def _remove_scratch(scratch: str) -> Optional[str]:
    """Unmount, then delete ``scratch``; a message saying what failed, or None.

    Nothing is deleted while a mount is left below it: removing files through
    a mount would reach into what is mounted."""
    left = _unmount_all(scratch)
    if left:
        return f"cannot unmount {', '.join(left)}; {scratch} is left in place"
    try:
        remove_tree(scratch)
    except StorageError as e:
        return str(e)
    return None


@contextlib.contextmanager
def _deferred_signals(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold SIGINT and SIGTERM back during cleanup, then deliver them.

    A Ctrl-C must not interrupt an unmount half-way and leave a mount behind;
    it is re-raised as soon as the block ends (KeyboardInterrupt, or the
    default action of SIGTERM). Python runs signal handlers in the main
    thread only, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for s in signums:
        old = signal.getsignal(s)
        if old in (signal.SIG_IGN, None):
            continue
        previous[s] = old
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


class OverlayRoot:
    """A read-write overlayfs mount of ``lower_dirs`` (bottom to top).

    Inside ``scratch`` (created if missing) it makes ``upper/`` (what the
    workload writes), ``work/`` and the mount point ``merged/``, and mounts::

        overlay on merged: lowerdir=TOP:...:BOTTOM,upperdir=upper,workdir=work

    with ``nodev``, so that device nodes a hostile image carries cannot be
    opened through the mount (the sandbox mounts its own ``/dev``).

    ``with OverlayRoot(...) as mountpoint:`` mounts; leaving the block,
    however (an exception, Ctrl-C), unmounts everything at or below
    ``scratch`` -- detaching lazily what is busy -- and deletes ``scratch``
    with everything in it, the lower directories too if they live there.
    SIGINT and SIGTERM are held back while that runs. If a mount cannot be
    removed, nothing is deleted and :class:`~estargz.StorageError` says so
    (unless the block already raised).

    Many layers: mount(2) takes at most one page (4 KiB) of options, about 120
    lower directories at ``/tmp/xxxxxxxxxx/layers/NN``; the kernel truncates
    longer ones. Past that the lower directories are named relative to their
    common parent (``lowerdir=119:118:...``, up to overlayfs's 500), by
    mount(2) in a short child process started there: changing directory in
    this process would move all its threads. (``lowerdir+`` of the new mount
    API, kernel >= 6.8, would also do, but not on older kernels.)
    ``method`` says which was used.
    """

    def __init__(self, lower_dirs: Sequence[str], scratch: str) -> None:
        self.lower_dirs = [os.path.abspath(d) for d in lower_dirs]
        self.scratch = os.path.abspath(scratch)
        self.upper = os.path.join(self.scratch, "upper")
        self.work = os.path.join(self.scratch, "work")
        self.mountpoint = os.path.join(self.scratch, "merged")
        self.method: Optional[str] = None
        self._entered = False

    def __enter__(self) -> str:
        if self._entered:
            raise RuntimeError("OverlayRoot is not re-entrant")
        # Checked before anything is made: on failure scratch is deleted,
        # which must not take a caller's directory with it.
        for d in (self.upper, self.work, self.mountpoint):
            if os.path.lexists(d):
                raise StorageError(f"{d} already exists")
        try:
            self._entered = True
            with _deferred_signals():
                os.makedirs(self.scratch, mode=0o700, exist_ok=True)
                for d in (self.upper, self.work, self.mountpoint):
                    os.mkdir(d, 0o755)
                self._mount()
        except BaseException as e:
            with _deferred_signals():
                problem = _remove_scratch(self.scratch)
            if problem:
                _add_note(e, problem)
            if isinstance(e, OSError):
                raise StorageError(f"cannot set up overlayfs in {self.scratch}: "
                                   f"{e.strerror or e}") from None
            raise
        return self.mountpoint

    def __exit__(self, exc_type: object, exc: Optional[BaseException], tb: object) -> None:
        with _deferred_signals():
            problem = _remove_scratch(self.scratch)
        if problem:
            if exc is None:
                raise StorageError(problem)
            _add_note(exc, problem)

    def _mount(self) -> None:
        lowers = list(reversed(self.lower_dirs))  # overlayfs wants the top first
        if not lowers:
            empty = os.path.join(self.scratch, "empty")
            os.mkdir(empty, 0o755)
            lowers = [empty]
        if len(lowers) > OVL_MAX_STACK:
            raise StorageError(f"{len(lowers)} layers: overlayfs stacks at most {OVL_MAX_STACK}")
        for p in (*lowers, self.upper, self.work):
            if any(c in p for c in ":,\\"):
                raise StorageError(f"overlayfs cannot take the path {p!r} (':', ',' or '\\')")
        options = f"lowerdir={':'.join(lowers)},upperdir={self.upper},workdir={self.work}"
        if len(options) < _PAGE_SIZE:
            self.method = "mount(2)"
            _mount_overlay(options, self.mountpoint, MS_NODEV)
            return
        base = os.path.commonpath(lowers)
        rel = [os.path.relpath(p, base) for p in lowers]
        options = (f"lowerdir={':'.join(rel)},upperdir={os.path.relpath(self.upper, base)},"
                   f"workdir={os.path.relpath(self.work, base)}")
        if len(options) >= _PAGE_SIZE:
            raise StorageError(f"{len(lowers)} lower directories do not fit in one overlayfs "
                               f"mount's options; put them in one directory with short names")
        self.method = "mount(2), relative paths, child process"
        p = subprocess.run([sys.executable, "-c", _CHILD_MOUNT, options, self.mountpoint,
                            str(MS_NODEV)], cwd=base, capture_output=True, text=True)
        if p.returncode != 0:
            why = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
            raise StorageError(f"cannot mount overlayfs on {self.mountpoint}: {why}")


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(note)


# --- a whole image ---------------------------------------------------------------------

def _make_scratch(scratch: str) -> None:
    try:
        os.mkdir(scratch, 0o700)
    except FileExistsError:
        if os.path.islink(scratch) or not os.path.isdir(scratch) or os.listdir(scratch):
            raise StorageError(f"scratch directory {scratch} must be empty "
                               "(or not exist)") from None
    except OSError as e:
        raise StorageError(f"cannot create {scratch}: {e.strerror}") from None


def layer_blob(source: ImageSource, desc: Descriptor, index: int,
               blobs_dir: str) -> tuple[str, bool]:
    """A readable file holding layer ``index``'s blob, and whether it is a
    copy in ``blobs_dir`` (the caller's to delete) rather than the source's
    own file.  The copy is fetched (verified) once per digest and appears
    whole or not at all.  Raises InvalidInput for a layer that is not a tar."""
    if desc.media_type not in LAYER_MEDIA_TYPES:
        raise InvalidInput(f"layer {index} ({desc.digest}) has media type "
                           f"{desc.media_type!r}, not a tar layer")
    path = source.local_blob_path(desc)
    if path is not None:
        return path, False
    path = os.path.join(blobs_dir, desc.digest.split(":", 1)[1])
    if not os.path.exists(path):
        try:
            os.makedirs(blobs_dir, 0o700, exist_ok=True)
            with open(path + ".part", "wb") as f:
                source.fetch_blob(desc, f)
            os.rename(path + ".part", path)
        except OSError as e:
            raise StorageError(f"cannot store layer {desc.digest}: {e.strerror or e}") from None
    return path, True


def _extract_layers(source: ImageSource, layers: Sequence[Descriptor],
                    scratch: str) -> tuple[list[str], list[LayerListing]]:
    """Fetch (verified) and extract each layer into ``scratch/layers/N``."""
    layers_dir = os.path.join(scratch, "layers")
    blobs_dir = os.path.join(scratch, "blobs")
    os.mkdir(layers_dir, 0o700)
    last_use = {d.digest: i for i, d in enumerate(layers)}
    dirs: list[str] = []
    listings: list[LayerListing] = []
    for i, desc in enumerate(layers):
        path, ours = layer_blob(source, desc, i, blobs_dir)
        # Per occurrence, not per digest: a layer that comes twice must sit
        # at both places of the overlayfs stack.
        dest = os.path.join(layers_dir, str(i))
        listings.append(extract_layer(path, dest, lowers=list(zip(dirs, listings)),
                                      spool_dir=scratch))
        dirs.append(dest)
        if last_use[desc.digest] == i and ours:
            os.unlink(path)
    if os.path.isdir(blobs_dir):
        os.rmdir(blobs_dir)
    return dirs, listings


@contextlib.contextmanager
def assemble_image_rootfs(source: ImageSource, manifest_layers: Sequence[Descriptor],
                          scratch: str) -> Iterator[tuple[str, list[LayerListing]]]:
    """Mount the root filesystem of an image; yield ``(mountpoint, listings)``.

    ``manifest_layers`` are the manifest's layer descriptors (bottom first);
    each blob is read from ``source`` (verified against its descriptor),
    extracted into ``scratch/layers/N`` and the lot stacked by
    :class:`OverlayRoot` under ``scratch``, read-write: the workload's writes
    land in ``scratch/upper``. ``listings[N]`` is layer N's
    :class:`~profiler.layermap.LayerListing`. ``scratch`` must not exist or
    be empty; on leaving the block it is unmounted and deleted, as it is if
    anything fails before.

    An opaque marker at the top of a layer (``.wh..wh..opq``) hides every
    layer below; overlayfs ignores opacity on a layer's root directory, so
    those layers are left out of the mount instead.
    """
    scratch = os.path.abspath(scratch)
    _make_scratch(scratch)
    overlay: Optional[OverlayRoot] = None
    try:
        try:
            dirs, listings = _extract_layers(source, manifest_layers, scratch)
        except OSError as e:
            raise StorageError(f"cannot extract the layers into {scratch}: "
                               f"{e.strerror or e}") from None
        first = max((i for i, lst in enumerate(listings) if "" in lst.opaque_dirs), default=0)
        overlay = OverlayRoot(dirs[first:], scratch)
        with overlay as mountpoint:
            yield mountpoint, listings
    except BaseException as e:
        # Once entered, OverlayRoot has cleaned up itself.
        if overlay is None or not overlay._entered:
            with _deferred_signals():
                problem = _remove_scratch(scratch)
            if problem:
                _add_note(e, problem)
        raise
