"""Safe extraction of one layer: :func:`extract_layer`.

``estargz optimize`` runs the image's workload to learn which files start-up
reads. The workload needs the image's root filesystem: each layer is
extracted into a directory of its own, in the format overlayfs reads for a
lower directory, and the directories are stacked with one read-write
overlayfs mount (:class:`~profiler.rootfs.overlay.OverlayRoot`). Whiteouts and
opaque directories are then honoured by the kernel exactly as containerd's overlay snapshotter
would, and each layer's :class:`~profiler.rootfs.layermap.LayerListing` says what it
holds, so that :mod:`profiler.rootfs.layermap` can tell which layer provides each
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
overlayfs), so :mod:`profiler.rootfs.flat` merges the layers into one plain
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
import errno
import os
import stat
import tarfile
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import cast

from estargz import (
    InvalidInput,
    PeekableStream,
    StorageError,
    UnsupportedEntry,
    check_member,
    iter_headers,
    open_tar,
    printable,
)

from .dirfd import DIR_FLAGS, lstat_at, open_dir, prepare_dest, proc_path, remove_tree
from .layermap import BLOCK, CHAR, DIR, FIFO, HARDLINK, REG, SYMLINK, LayerListing
from .tree import LayerTree

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
AUFS_META_PREFIX = ".wh..wh."
_OVERLAY_XATTRS = "trusted.overlay."
_XATTR_PAX = "SCHILY.xattr."
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY = 1 << 20
#: Longest entry name (Linux's PATH_MAX): no process could open a longer path,
#: and it bounds the depth of the trees walked here.
MAX_NAME = 4096


# --- names ---------------------------------------------------------------------

def entry_path(name: str, entry: str | None = None) -> str:
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


def sparse_map(ti: tarfile.TarInfo) -> list[tuple[int, int]]:
    """A sparse member's data pieces as ``(offset in the file, length)``.

    tarfile keeps them as such pairs in ``TarInfo.sparse``, which typeshed
    declares as bytes."""
    return cast("list[tuple[int, int]]", ti.sparse or [])


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    """Modification time in ns, exact for fractional PAX mtimes."""
    raw = ti.pax_headers.get("mtime")
    if raw:
        try:
            return int(Decimal(raw) * 1_000_000_000)
        except (InvalidOperation, ValueError):
            pass
    return int(ti.mtime) * 1_000_000_000


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


class _Extractor(LayerTree):
    """Applies tar entries, one at a time, below an open root directory."""

    # -- metadata --

    def _own(self, ti: tarfile.TarInfo, fd: int | None = None,
             at: tuple[int, str] | None = None) -> None:
        if not self.as_root:
            return
        if fd is not None:
            self._chown(lambda u, g: os.fchown(fd, u, g), ti.uid, ti.gid, ti.name)
        else:
            assert at is not None
            self._chown(lambda u, g: os.chown(at[1], u, g, dir_fd=at[0], follow_symlinks=False),
                        ti.uid, ti.gid, ti.name)

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
        st = lstat_at(base, pfd)
        if st is not None and not replace:
            # The layer holds `rel` too: a whiteout deletes lower layers'
            # content only, so the entry stays; a directory turns opaque.
            if stat.S_ISDIR(st.st_mode):
                fd = open_dir(base, pfd)
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
        fd = open_dir(base, pfd)
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
            for off, n in sorted(sparse_map(ti)):
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
            proc_path(pfd, base), k, v, follow_symlinks=False))
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
        st = lstat_at(tbase, tpfd) if tpfd is not None else None
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
            proc_path(pfd, base), k, v, follow_symlinks=False))
        mtime = _mtime_ns(ti)
        os.utime(base, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)
        self.listing.kinds[rel] = kind

def extract_layer(tar_path: str, dest: str, *,
                  lowers: Sequence[tuple[str, LayerListing]] = (),
                  spool_dir: str | None = None, flat: bool = False) -> LayerListing:
    """Extract the layer at ``tar_path`` (tar, tar+gzip or tar+zstd) into
    ``dest`` as an overlayfs lower directory, and say what it holds.

    ``dest`` must not exist or be empty; it is removed again on failure if
    this call created it. ``lowers`` are the already extracted layers below,
    bottom to top, as ``(directory, listing)``: directories this layer needs
    but has no entry for take their metadata from there (in flat mode the
    directory may be the same merged tree for every layer). ``spool_dir``
    holds the decompressed tar of a compressed layer while it is read.

    ``flat=True`` extracts for :mod:`profiler.rootfs.flat`'s merge, as root of
    a user namespace can (see the module docstring): no whiteout devices or
    overlayfs xattrs, no device nodes, unmapped owners and refused xattrs
    tolerated. The listing is the same as without it, but for the skipped
    devices and the warnings.

    Raises :class:`~estargz.InvalidInput` (or its :class:`~estargz.UnsupportedEntry`)
    for a malformed or refused layer (see the module docstring) and
    :class:`~estargz.StorageError` if the filesystem fails.
    """
    created = prepare_dest(dest)
    ok = False
    try:
        try:
            root_fd = os.open(dest, DIR_FLAGS)
        except OSError as e:
            raise StorageError(f"cannot open {dest}: {e.strerror}") from None
        ex = _Extractor(root_fd, dest, lowers, flat=flat)
        try:
            _apply_all(ex, tar_path, spool_dir)
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


def _apply_all(ex: _Extractor, tar_path: str, spool_dir: str | None) -> None:
    """Every entry of the layer at ``tar_path``, checked, applied in order."""
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
                                   f"into {ex.dest}: {e.strerror or e}") from None
            except (OverflowError, ValueError) as e:
                # out-of-range ids or times, a NUL in a link target
                raise UnsupportedEntry(printable(ti.name),
                                       f"cannot be extracted: {e}") from None
        if stream.tell() > size:
            name = printable(last.name) if last is not None else "?"
            raise InvalidInput(f"layer tar is truncated in the data of {name!r}")
