"""Directory-descriptor helpers: reach, create and remove paths below a root
without ever following a symlink.

Extraction (:mod:`.extract`, :mod:`.tree`) and the flat merge (:mod:`.flat`)
treat every name in a layer as hostile: each path is reached one component
at a time from a directory fd with ``O_NOFOLLOW | O_DIRECTORY``, so a
symlink planted earlier (``etc -> /etc``) can never redirect a later write.
"""

from __future__ import annotations

import errno
import os
import stat

from estargz import StorageError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Directory fds a walk keeps open at most (below the usual limit of 1 024).
MAX_CACHED_FDS = 256


def open_dir(name: str, dir_fd: int) -> int:
    """Open directory ``name`` of ``dir_fd``, refusing to follow a symlink."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def lstat_at(name: str, dir_fd: int) -> os.stat_result | None:
    """``lstat`` of ``name`` in ``dir_fd``; None if it does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def open_beneath(root_fd: int, rel: str) -> int | None:
    """A new fd of directory ``rel`` under ``root_fd``, walked one component
    at a time without following symlinks; ``None`` if it is not there (or
    not a directory all the way down)."""
    fd = os.dup(root_fd)
    try:
        for c in rel.split("/") if rel else ():
            nxt = open_dir(c, fd)
            os.close(fd)
            fd = nxt
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    return fd


def remove_at(dir_fd: int, name: str) -> None:
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
        fd = open_dir(child, parent)
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
        remove_at(pfd, name)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StorageError(f"cannot remove {path}: {e.filename or ''} {e.strerror}") from None
    finally:
        os.close(pfd)


def proc_path(dir_fd: int, name: str) -> str:
    """A path naming ``name`` in directory ``dir_fd`` for calls that take no
    ``dir_fd`` (``lsetxattr``): ``/proc/self/fd/N`` is the directory itself,
    whatever happened to its path since it was opened."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def prepare_dest(dest: str) -> bool:
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
