"""The directory side of layer extraction: :class:`LayerTree`.

It reaches (and creates) the directories entries go in, one component at a
time from the layer's root fd, with a cache of directory fds; makes the
parents a diff layer leaves out, with the metadata the lower layers show;
removes what a later entry replaces; and applies directory modes and mtimes
once the last entry is in.  :class:`~profiler.rootfs.extract._Extractor`
applies the entries themselves on top of it.  See :mod:`profiler.rootfs.extract`
for the rules.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections.abc import Callable, Sequence

from estargz import UnsupportedEntry, printable

from .dirfd import DIR_FLAGS, MAX_CACHED_FDS, lstat_at, open_beneath, open_dir, remove_at
from .layermap import DIR, LayerListing, layer_for

OPAQUE_XATTR = "trusted.overlay.opaque"


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class LayerTree:
    """The directories of one layer being extracted below an open root."""

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
        self._dir_meta: dict[str, tuple[int, int | None]] = {}

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

    def _dir(self, rel: str, entry: str, create: bool = True) -> int | None:
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

    def _step(self, pfd: int, rel: str, base: str, entry: str, create: bool) -> int | None:
        """Open directory ``base`` (layer path ``rel``) of ``pfd``: see :meth:`_dir`."""
        try:
            return open_dir(base, pfd)
        except FileNotFoundError:
            if not create:
                return None
            if not (self.flat and rel in self.listing.whiteouts):
                self._mkdir_implicit(pfd, rel, base)
                return open_dir(base, pfd)
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
        fd = open_dir(base, pfd)
        try:
            self._set_opaque(fd, rel)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _trim_cache(self) -> None:
        if len(self._fds) > MAX_CACHED_FDS:
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

    def _lower_dir_meta(self, rel: str) -> tuple[int, int, int, int] | None:
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
        root = os.open(self.lowers[i][0], DIR_FLAGS)
        try:
            fd = open_beneath(root, rel)
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
        st = lstat_at(base, pfd)
        if st is None:
            return False
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir and new_is_dir:
            return True
        self._forget(rel)
        remove_at(pfd, base)  # follows no symlink
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

    def _set_opaque(self, fd: int, rel: str) -> None:
        if not self.flat:  # flat: the listing alone carries it to the merge
            os.setxattr(fd, OPAQUE_XATTR, b"y")
        self.listing.opaque_dirs.add(rel)

    # -- entries --
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
                        fd = open_dir(c, fd)
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
