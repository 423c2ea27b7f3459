"""The work directory of one ``estargz optimize`` run, and the sweep of
those that killed runs left behind.

A run's directory (``$TMPDIR/estargz-optimize-XXXXXXXX``: staged layers,
extracted layers, the runtime's state) is removed when the run ends, however
it ends short of SIGKILL.  After SIGKILL the kernel removes the mounts and
the processes (they live in namespaces that die with the run, see
:mod:`profiler.rootless.userns`), but not the directory, the runtime's
state in it, or the cgroups the runtime made.  So each run holds an
``flock`` on its directory while it lives, and every run first sweeps the
directories whose lock it can take: their run is dead.  For each:
``runtime delete --force`` of its containers (their cgroups and state),
the cgroups made for rootless limits, then the tree (unmounted first,
never followed through a symlink).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator

from estargz import StorageError

from .linux import add_note, deferred_signals
from .rootfs import remove_scratch
from .rootless.cgroup import remove_stale_cgroups
from .sandbox import remove_stale_containers

PREFIX = "estargz-optimize-"
#: A directory younger than this may be one whose run has made it and not
#: yet locked it; an empty one is left alone until then.
_CREATION_GRACE = 60.0


def _open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def sweep_stale(parent: str | None = None) -> list[str]:
    """Remove what killed runs left in ``parent`` (default ``$TMPDIR``):
    their work directories, containers and cgroups; what could not be
    removed, as messages.  Only directories owned by this user are touched,
    and none whose run is alive (it holds the lock)."""
    parent = parent or tempfile.gettempdir()
    try:
        names = sorted(n for n in os.listdir(parent) if n.startswith(PREFIX))
    except OSError:
        return []
    problems: list[str] = []
    for name in names:
        path = os.path.join(parent, name)
        try:
            fd = _open_dir(path)
        except OSError:
            continue  # gone meanwhile, or not a directory
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its run is alive (or no flock here: cannot tell)
            if not os.listdir(fd) and time.time() - st.st_mtime < _CREATION_GRACE:
                continue  # just made, perhaps not yet locked by its run
            with deferred_signals():
                problems.extend(remove_stale_containers(path))
                problems.extend(f"cannot remove cgroup {d}" for d in remove_stale_cgroups(path))
                problem = remove_scratch(path)
            if problem:
                problems.append(problem)
        finally:
            os.close(fd)
    return problems


@contextlib.contextmanager
def work_directory(parent: str | None = None) -> Iterator[str]:
    """A new, locked work directory in ``parent`` (default ``$TMPDIR``),
    unmounted and removed when the block ends; a
    :class:`~estargz.StorageError` if that fails (a note, if the block
    raised already)."""
    with deferred_signals():
        path = tempfile.mkdtemp(prefix=PREFIX, dir=parent)
        fd = _open_dir(path)
    try:
        # Held until this process ends, however: the descriptor is
        # close-on-exec, so no child keeps it.
        with contextlib.suppress(OSError):  # no flock here: never swept, as never locked
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    except BaseException as e:
        with deferred_signals():
            problem = remove_scratch(path)
        if problem:
            add_note(e, problem)
        raise
    else:
        with deferred_signals():
            problem = remove_scratch(path)
        if problem:
            raise StorageError(problem)
    finally:
        os.close(fd)
