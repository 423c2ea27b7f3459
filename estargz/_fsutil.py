"""Writing files so that they appear whole or not at all; temporary
directories a killed run's successor can find and remove; lock files."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from ._exceptions import StorageError


def unlink_quietly(path: str) -> None:
    """Remove ``path`` if it exists; cleanup must not mask the real error."""
    with contextlib.suppress(OSError):
        os.unlink(path)


#: fsync of a directory: what filesystems that cannot sync one answer.
_NO_DIR_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EBADF}


def fsync_dir(path: str) -> None:
    """Make the names in directory ``path`` durable (a rename into it), as a
    file's fsync makes its bytes durable. Filesystems that cannot sync a
    directory are let be; a failed sync elsewhere is a :class:`StorageError`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise StorageError(f"cannot sync {path}: {e.strerror or e}") from None
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIR_SYNC:
            raise StorageError(f"cannot sync {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(dst: str, *, fsync: bool = True) -> Iterator[BinaryIO]:
    """Yield a file that becomes ``dst`` only if the block completes.

    The file is written beside ``dst`` (same filesystem, so the final rename
    is atomic), flushed to disk, given the mode a plain ``open`` would give,
    and renamed; with ``fsync``, the file and then the rename are made
    durable (a crash leaves the old ``dst`` or the whole new one). On any
    exception, Ctrl-C included, it is removed and the exception propagates;
    an ``OSError`` while writing becomes a one-line :class:`StorageError`
    naming ``dst``.

    Where the filesystem allows, the file has no name at all until it is
    complete (``O_TMPFILE``), so a run killed by SIGKILL leaves nothing
    behind: the kernel frees an unnamed file with its last descriptor.
    Elsewhere it is a ``.NAME.*.tmp`` file that a killed run leaves.
    """
    directory = os.path.dirname(os.path.abspath(dst))
    base = os.path.basename(dst)
    tmp: str | None = None
    try:
        fd = _open_unnamed(directory)
        if fd < 0:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=".tmp")
    except OSError as e:
        raise StorageError(f"cannot write {dst}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            if tmp is None:
                tmp = _name_unnamed(f.fileno(), directory, base)
            else:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dst)
        if fsync:
            fsync_dir(directory)
    except OSError as e:
        if tmp is not None:
            unlink_quietly(tmp)
        raise StorageError(f"cannot write {dst}: {e.strerror or e}") from None
    except BaseException:
        if tmp is not None:
            unlink_quietly(tmp)
        raise


#: Errors of ``open(O_TMPFILE)`` that mean "not on this filesystem".
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT}


def _open_unnamed(directory: str) -> int:
    """An unnamed file in ``directory`` open for writing (mode 0666 less the
    umask, as ``open`` gives), or -1 where ``O_TMPFILE`` or the
    ``/proc/self/fd`` link that names it later is not available."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return -1
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno in _NO_TMPFILE:
            return -1
        raise


def _name_unnamed(fd: int, directory: str, base: str) -> str:
    """Give the complete unnamed file ``fd`` a temporary name beside its
    destination (for the instant before the rename over it)."""
    # linkat(AT_SYMLINK_FOLLOW) through /proc/self/fd: Python calls plain
    # link(2), which does not follow the magic link, unless a dir fd is given.
    proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while True:
            name = os.path.join(directory, f".{base}.{os.urandom(6).hex()}.tmp")
            try:
                os.link(str(fd), name, src_dir_fd=proc, follow_symlinks=True)
                return name
            except FileExistsError:
                continue
    finally:
        os.close(proc)


# --- temporary directories that outlive a killed run ----------------------------
#
# A run killed by SIGKILL cleans nothing up, so every temporary directory of
# ours carries proof of life that the kernel drops when its owner dies: an
# exclusive flock(2) on the directory itself, held through a descriptor that
# is never inherited across exec. The next run lists the same directory and
# removes the ones nobody holds (:func:`reclaim_tempdirs`). A pid in the name
# would not do: pids are reused and differ between pid namespaces sharing a
# volume.

#: Every directory made by :class:`OwnedTempDir` ends so; no estargz before it
#: named a temporary directory so, so an older version's live directory is
#: never taken for a dead one.
OWNED_SUFFIX = ".tmp"


def _open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


class OwnedTempDir:
    """``PARENT/PREFIXxxxxxxxx.tmp``, created and flock-ed by this process.

    :meth:`cleanup` removes it; :meth:`release` keeps it (it has been renamed
    into place) and drops the lock. If the process dies first, the lock goes
    with it and :func:`reclaim_tempdirs` removes the directory.
    """

    def __init__(self, parent: str, prefix: str) -> None:
        while True:
            try:
                path = tempfile.mkdtemp(prefix=prefix, suffix=OWNED_SUFFIX, dir=parent)
            except OSError as e:
                raise StorageError(f"cannot create a temporary directory in {parent}: "
                                   f"{e.strerror or e}") from None
            try:
                fd = _open_dir(path)
            except FileNotFoundError:
                continue  # a reclaimer found it unlocked and removed it: another one
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # A reclaimer saw it unlocked a moment ago and is removing it.
                os.close(fd)
                continue
            except OSError:
                pass  # no flock here (some network filesystems): never reclaimed
            if _same_inode(path, fd):
                break
            os.close(fd)  # removed by a reclaimer between mkdtemp and flock
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Drop the lock without removing anything."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def cleanup(self) -> None:
        """Remove the directory (still locked, so no reclaimer races us)."""
        if self._fd is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.release()

    def __enter__(self) -> OwnedTempDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _same_inode(path: str, fd: int) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def stale_tempdirs(parent: str, prefix: str) -> Iterator[str]:
    """Each ``PARENT/PREFIX*.tmp`` directory of this user whose
    :class:`OwnedTempDir` owner is gone, held locked while the caller handles
    it (removes it, or what it holds first), so that no new owner can take it
    meanwhile. What cannot be listed or locked (a live owner's) is skipped."""
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(OWNED_SUFFIX)):
            continue
        path = os.path.join(parent, name)
        try:
            fd = _open_dir(path)
        except OSError:
            continue  # gone meanwhile, or not a directory
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                continue  # another user's: never ours to remove
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive (or this filesystem has no flock)
            if _same_inode(path, fd):
                yield path
        finally:
            os.close(fd)


def reclaim_tempdirs(parent: str, prefix: str) -> list[str]:
    """Remove the :func:`stale_tempdirs` of ``prefix`` in ``parent``; return
    their paths. Best effort: one with something mounted below it (a killed
    ``optimize``'s overlay) is left alone, as removing it would reach
    through the mount."""
    removed = []
    for path in stale_tempdirs(parent, prefix):
        if not _has_mounts_below(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _has_mounts_below(path: str) -> bool:
    top = os.path.realpath(path).rstrip("/") + "/"
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return True  # cannot tell: do not risk deleting through a mount
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            # Mount points escape space, tab, newline and backslash as \ooo.
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if (point.rstrip("/") + "/").startswith(top):
                return True
    return False


@contextlib.contextmanager
def locked_file(path: str) -> Iterator[None]:
    """Hold an exclusive flock(2) on ``path`` (created if missing, never
    removed: removing a lock file lets two holders lock two inodes). Where
    the filesystem cannot lock, the block runs unlocked."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:
        # Another user's lock file, readable only: flock needs no write access.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise StorageError(f"cannot open lock file {path}: {e.strerror or e}") from None
    except OSError as e:
        raise StorageError(f"cannot open lock file {path}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            # A filesystem without locks (some network ones) still takes a
            # lone writer, as before there were locks.
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise StorageError(f"cannot lock {path}: {e.strerror or e}") from None
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


#: What every temporary directory of ours in TMPDIR is named after.
TMP_PREFIX = "estargz-"


def owned_tempdir(kind: str) -> OwnedTempDir:
    """A new ``estargz-KIND-xxxxxxxx.tmp`` directory in TMPDIR, after removing
    those killed runs left there (:func:`reclaim_tempdirs`)."""
    parent = tempfile.gettempdir()
    reclaim_tempdirs(parent, TMP_PREFIX)
    return OwnedTempDir(parent, f"{TMP_PREFIX}{kind}-")
