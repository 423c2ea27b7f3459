"""An image's root filesystem as one flattened directory tree, for rootless profiling.

Profiling as root stacks the extracted layers with overlayfs
(:class:`profiler.rootfs.overlay.OverlayRoot`). An ordinary user profiles as root of
a user namespace of its own, with a private mount namespace, and there
overlayfs cannot serve: fanotify refuses the mount marks that profiling
needs (file-handle events, ``FAN_MARK_MOUNT``) on an overlayfs mount
(EOPNOTSUPP). The image's root filesystem is instead a plain *copy* of what
the overlay would show, on a tmpfs mounted inside that namespace:

1. each layer, bottom first, is extracted in flat mode
   (``extract_layer(..., flat=True)``) into ``scratch/layer``, on the same
   tmpfs: no whiteout devices, overlayfs xattrs or device nodes, which need
   real root; the :class:`~profiler.rootfs.layermap.LayerListing` still records
   every whiteout and opaque directory;
2. :func:`merge_layer` applies it to the tree with overlayfs's semantics:
   first what the layer deletes from the layers below (its whiteouts, the
   contents of its opaque directories), then its entries on top, moved with
   ``rename(2)``: O(1) a file or a whole directory, however large, and
   hardlinks stay hardlinks.

The listings are the ones :func:`profiler.rootfs.image.assemble_image_rootfs`
gives for the same layers, so :mod:`profiler.rootfs.layermap` works unchanged.
:func:`layer_usage` bounds the tmpfs space a layer takes, to size the mount.

Like extraction, the merge never follows a symlink: every path in the tree
is reached one component at a time from a directory fd with ``O_NOFOLLOW``,
so a symlink a lower layer planted (``etc -> /etc``) is replaced or left
alone, never written through.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence

from estargz import PeekableStream, StorageError, check_member, iter_headers, open_tar, printable

from ..linux import PAGE_SIZE, add_note
from .dirfd import (
    DIR_FLAGS,
    MAX_CACHED_FDS,
    lstat_at,
    open_dir,
    prepare_dest,
    remove_at,
    remove_tree,
)
from .extract import extract_layer, sparse_map
from .layermap import LayerListing

__all__ = ["layer_usage", "merge_layer", "assemble_flat_rootfs", "LAYER_SUBDIR"]

#: Name of the directory below ``scratch`` that holds the layer being merged.
LAYER_SUBDIR = "layer"

#: tmpfs keeps a symlink target shorter than this in the inode (no page):
#: SHORT_SYMLINK_LEN of mm/shmem.c, 128 since Linux 3.1.
_SHMEM_SHORT_SYMLINK = 128


# --- how much tmpfs a layer takes -------------------------------------------------------

def _pages(start: int, length: int) -> int:
    """Pages touched by ``length`` bytes written at ``start``."""
    if length <= 0:
        return 0
    return (start + length - 1) // PAGE_SIZE - start // PAGE_SIZE + 1


def layer_usage(blob_path: str, spool_dir: str | None = None) -> int:
    """An upper bound of the bytes of tmpfs that the layer at ``blob_path``
    (tar, tar+gzip or tar+zstd) takes once extracted.

    tmpfs charges its size limit with whole pages of file data: each regular
    file costs its size rounded up to pages (a sparse file only the pages its
    data touches), a symlink one page if its target is too long to live in
    the inode, anything else nothing (directories, hardlinks, FIFOs and
    metadata use kernel memory, not the mount's blocks). A name that several
    entries write is counted each time, which keeps it an upper bound. This
    assumes tmpfs's default ``huge=never``.

    The sum over an image's layers, a layer that comes twice counted twice
    (its second copy is extracted next to the first before replacing it),
    bounds :func:`assemble_flat_rootfs`'s peak use of the mount, but not a
    decompressed tar spooled there (``spool_dir``, where a compressed layer
    is decompressed while it is read) nor what the workload writes later.

    Raises :class:`~estargz.InvalidInput` for a malformed layer and
    :class:`~estargz.StorageError` if it cannot be read.
    """
    total = 0
    with open_tar(blob_path, tmpdir=spool_dir) as f:
        stream = PeekableStream(f, seekable=True)
        for ti in iter_headers(stream):
            check_member(ti)
            if ti.isreg():
                if ti.sparse:
                    total += sum(_pages(off, n) for off, n in sparse_map(ti)) * PAGE_SIZE
                else:
                    total += _pages(0, ti.size) * PAGE_SIZE
            elif ti.issym() and len(ti.linkname.encode("utf-8", "surrogateescape")) \
                    >= _SHMEM_SHORT_SYMLINK:
                total += PAGE_SIZE
    return total


# --- merging one layer ------------------------------------------------------------------

class _Dirs:
    """Directory fds below one root, by relative path.

    Each is reached from the nearest directory already open, one component
    at a time with ``O_NOFOLLOW | O_DIRECTORY``: a symlink or a file on the
    way means "no such directory". At most
    :data:`~profiler.rootfs.dirfd.MAX_CACHED_FDS` stay open, the least recently
    used closed first: a depth-first walk keeps its parent open however deep
    it goes (a hostile tree may be 2 000 deep), and a path below the
    limit's depth is never walked from the root again and again."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._fds: dict[str, int] = {}  # in order of use, the latest last

    def get(self, rel: str) -> int | None:
        """The fd (cached: do not close) of directory ``rel``, or ``None``."""
        if not rel:
            return self.root_fd
        fd = self._fds.pop(rel, None)
        if fd is not None:
            self._fds[rel] = fd
            return fd
        # Up to the nearest open ancestor only: building every prefix of a
        # 2 000-deep path each time would be quadratic in its length.
        at, below = rel, []
        while at and at not in self._fds:
            at, _, base = at.rpartition("/")
            below.append(base)
        fd = self._fds[at] if at else self.root_fd
        for base in reversed(below):
            at = _join(at, base)
            try:
                fd = open_dir(base, fd)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    fd = -1
                    break
                raise
            finally:
                self._trim()
            self._fds[at] = fd
        return None if fd < 0 else fd

    def _trim(self) -> None:
        """Close the least recently used fds beyond the limit (before one
        more is added, so the newest ones, in use, stay)."""
        while len(self._fds) >= MAX_CACHED_FDS:
            os.close(self._fds.pop(next(iter(self._fds))))

    def forget(self, rel: str, below_only: bool = False) -> None:
        """Close the fds of ``rel`` (unless ``below_only``) and of everything
        below it: that tree is being removed or emptied."""
        below = rel + "/" if rel else ""
        for key in [k for k in self._fds if k.startswith(below) or
                    (k == rel and not below_only)]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _times(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_atime_ns, st.st_mtime_ns


def _copy_dir_meta(src: int, s: os.stat_result, dst: int) -> None:
    """Give directory ``dst`` the owner, xattrs, mode and mtime of ``src``
    (whose stat, from before its entries moved out, is ``s``), as overlayfs
    shows the top-most layer's copy of a merged directory."""
    d = os.fstat(dst)
    if (s.st_uid, s.st_gid) != (d.st_uid, d.st_gid):
        os.fchown(dst, s.st_uid, s.st_gid)
    # security.* are the host's labels (SELinux, ...), not the image's: left alone.
    wanted = {n: os.getxattr(src, n) for n in os.listxattr(src) if not n.startswith("security.")}
    for name in os.listxattr(dst):
        if name not in wanted and not name.startswith("security."):
            os.removexattr(dst, name)
    for name, value in wanted.items():
        os.setxattr(dst, name, value)
    os.fchmod(dst, stat.S_IMODE(s.st_mode))  # after chown, which may clear set-id bits
    # Extraction sets atime = mtime; reading the layer directory since may
    # have moved its atime (relatime), so take the mtime for both.
    os.utime(dst, ns=(s.st_mtime_ns, s.st_mtime_ns))


def merge_layer(root: str, layer_dir: str, listing: LayerListing) -> None:
    """Merge the layer extracted (in flat mode) at ``layer_dir`` into the
    flattened tree at ``root``, as overlayfs would stack it on top; then
    remove ``layer_dir``.

    Both must be on the same filesystem (entries are moved by ``rename``).
    First ``root`` loses what the layer deletes from the layers below: every
    path in ``listing.whiteouts`` (with all below it), and the contents of
    every directory in ``listing.opaque_dirs`` (``""``: the whole tree). A
    path whose parent is not a directory in ``root`` has nothing to delete.
    Then every entry of the layer goes on top:

    * a directory onto a directory merges: its entries go in the same way,
      and the directory takes the layer's owner, mode, mtime and xattrs,
      unless the layer only implied it (``listing.implicit_dirs``: a parent
      a diff layer left out), which keeps what ``root`` has;
    * anything else replaces what ``root`` has at that path (a directory
      with its contents), by moving the layer's entry there: a whole
      directory tree in one ``rename``.

    The root directory of ``root`` keeps its own metadata, as an overlayfs
    mount shows its upper directory's. No symlink is followed, in ``root``
    or in ``layer_dir``. Raises :class:`~estargz.StorageError` if the
    filesystem fails; ``root`` is then partly merged.
    """
    try:
        root_fd = os.open(root, DIR_FLAGS)
    except OSError as e:
        raise StorageError(f"cannot open {root}: {e.strerror}") from None
    try:
        try:
            layer_fd = os.open(layer_dir, DIR_FLAGS)
        except OSError as e:
            raise StorageError(f"cannot open {layer_dir}: {e.strerror}") from None
        merge = _Merge(root_fd, layer_fd, listing)
        try:
            merge.delete_hidden()
            merge.move_entries()
            merge.apply_meta()
        except OSError as e:
            where = f" ({printable(merge.at)!r})" if merge.at else ""
            raise StorageError(f"cannot merge {layer_dir} into {root}{where}: "
                               f"{e.strerror or e}") from None
        finally:
            merge.close()
            os.close(layer_fd)
    finally:
        os.close(root_fd)
    # What is left: the emptied directories that merged into root's.
    remove_tree(layer_dir)


class _Merge:
    """The three passes of :func:`merge_layer`, sharing the directory fds of
    both trees and what the later passes need of the earlier ones."""

    def __init__(self, root_fd: int, layer_fd: int, listing: LayerListing) -> None:
        self.rdirs, self.ldirs = _Dirs(root_fd), _Dirs(layer_fd)
        self.listing = listing
        #: The path being worked on, for the error message.
        self.at = ""
        # Directories of root whose contents change, and their times from
        # before: the mtime of a directory the layer only implies must
        # stay what the lower layers gave it.
        self.before: dict[str, tuple[int, int]] = {}
        # Directories both trees hold, with the layer's stat from before
        # anything moves out (which changes its mtime).
        self.merged: list[tuple[str, os.stat_result]] = []

    def close(self) -> None:
        self.ldirs.close()
        self.rdirs.close()

    def _touch(self, rel: str, fd: int) -> None:
        if rel not in self.before:
            self.before[rel] = _times(fd)

    def delete_hidden(self) -> None:
        """What the layer deletes from the layers below: its whiteouts, the
        contents of its opaque directories."""
        rdirs = self.rdirs
        for at in sorted(self.listing.whiteouts):
            self.at = at
            parent, _, base = at.rpartition("/")
            pfd = rdirs.get(parent)
            if pfd is not None and lstat_at(base, pfd) is not None:
                self._touch(parent, pfd)
                rdirs.forget(at)
                remove_at(pfd, base)
        for at in sorted(self.listing.opaque_dirs):
            self.at = at
            fd = rdirs.get(at)
            if fd is None:
                continue  # not a directory below: the layer's replaces it
            self._touch(at, fd)
            rdirs.forget(at, below_only=True)
            for name in os.listdir(fd):
                remove_at(fd, name)

    def move_entries(self) -> None:
        """Depth first through the directories both trees hold, moving every
        other entry of the layer into root."""
        todo = [""]
        while todo:
            self.at = at = todo.pop()
            lfd, rfd = self.ldirs.get(at), self.rdirs.get(at)
            assert lfd is not None and rfd is not None
            self._touch(at, rfd)
            self.merged.append((at, os.fstat(lfd)))
            with os.scandir(lfd) as it:
                entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
            for name, is_dir in entries:
                child = _join(at, name)
                st = lstat_at(name, rfd)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    if is_dir:
                        todo.append(child)
                        continue
                    # rename(2) cannot put a non-directory over one
                    self.rdirs.forget(child)
                    remove_at(rfd, name)
                elif st is not None and is_dir:
                    os.unlink(name, dir_fd=rfd)  # nor a directory over a non-directory
                # over a non-directory: replaced in one step
                os.rename(name, name, src_dir_fd=lfd, dst_dir_fd=rfd)

    def apply_meta(self) -> None:
        """Metadata last: any entry moved in or out changes a directory's
        mtime. Only merged directories: every other one root's contents
        changed in was deleted since (an opaque or whited-out ancestor), and
        what stands at its path now is the layer's own, moved in."""
        for at, lst in self.merged:
            self.at = at
            rfd, lfd = self.rdirs.get(at), self.ldirs.get(at)
            assert rfd is not None and lfd is not None
            if at and at not in self.listing.implicit_dirs:
                _copy_dir_meta(lfd, lst, rfd)
            else:
                os.utime(rfd, ns=self.before[at])


# --- a whole image -------------------------------------------------------------------------

def assemble_flat_rootfs(blobs: Sequence[str], root: str, scratch: str,
                         spool_dir: str | None = None) -> list[LayerListing]:
    """Build the root filesystem of an image as one plain directory tree at
    ``root``; return each layer's :class:`~profiler.rootfs.layermap.LayerListing`.

    ``blobs`` are the paths of the layer blobs (tar, tar+gzip or tar+zstd),
    bottom first, as in the manifest. Each is extracted in flat mode into
    ``scratch/layer`` and merged into ``root`` (:func:`merge_layer`). The
    listings are those :func:`profiler.rootfs.image.assemble_image_rootfs` gives
    for the same layers, but for device nodes, which are skipped (and not
    listed), and the warnings. Nothing here needs privileges beyond those of
    root in a user namespace; see :mod:`profiler.rootfs.extract` for what happens to
    owners, devices and xattrs such a caller cannot set.

    ``root`` must be an empty directory or not exist (it is created 0755);
    ``scratch`` is a directory on the same filesystem (created 0700 if
    missing; its parent must exist), where ``scratch/layer`` must not exist.
    The space the layer being merged takes there is counted by
    :func:`layer_usage`: the sum over every layer, a repeated one counted
    each time, bounds the filesystem's peak use. ``spool_dir`` holds the decompressed tar of a
    compressed layer while it is read (default: the system's temporary
    directory).

    Raises :class:`~estargz.InvalidInput` (or its
    :class:`~estargz.UnsupportedEntry`) for a malformed or refused layer and
    :class:`~estargz.StorageError` if the filesystem fails. ``scratch/layer``
    is removed whatever happens; ``root`` is then incomplete, for the caller
    to throw away.
    """
    prepare_dest(root)  # created 0755, or an empty directory
    layer_dir = os.path.join(scratch, LAYER_SUBDIR)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(scratch, 0o700)
        if os.stat(root).st_dev != os.stat(scratch).st_dev:
            raise StorageError(f"{root} and {scratch} must be on the same filesystem "
                               "(layers are merged by rename)")
    except OSError as e:
        raise StorageError(f"cannot use {scratch}: {e.strerror}") from None
    if os.path.lexists(layer_dir):
        # Not ours to delete.
        raise StorageError(f"{layer_dir} already exists")
    listings: list[LayerListing] = []
    for blob in blobs:
        try:
            # The tree merged so far is every lower layer's directory: an
            # implied parent takes its metadata there, and the listing's
            # warnings come out as assemble_image_rootfs's.
            listing = extract_layer(blob, layer_dir, lowers=[(root, lst) for lst in listings],
                                    spool_dir=spool_dir, flat=True)
            merge_layer(root, layer_dir, listing)
        except BaseException as e:
            try:
                remove_tree(layer_dir)
            except StorageError as cleanup:
                add_note(e, str(cleanup))
            if isinstance(e, OSError):
                raise StorageError(f"cannot assemble {root}: {e.strerror or e}") from None
            raise
        listings.append(listing)
    return listings
