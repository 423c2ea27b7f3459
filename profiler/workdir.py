"""The work directory of one ``estargz optimize`` run, and the sweep of
those that killed runs left behind.

A run's directory (``$TMPDIR/estargz-optimize-XXXXXXXX.tmp``: staged layers,
extracted layers, the runtime's state) is removed when the run ends, however
it ends short of SIGKILL.  After SIGKILL the kernel removes the mounts and
the processes (they live in namespaces that die with the run, see
:mod:`profiler.rootless.userns`), but not the directory, the runtime's
state in it, or the cgroups the runtime made.  So the directory is an
:class:`estargz.OwnedTempDir`, locked while its run lives, and every run
first sweeps the directories whose lock it can take
(:func:`estargz.stale_tempdirs`): their run is dead.  For each:
``runtime delete --force`` of its containers (their cgroups and state),
the cgroups made for rootless limits, then the tree (unmounted first,
never followed through a symlink).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

from estargz import OwnedTempDir, StorageError, stale_tempdirs

from .linux import add_note, deferred_signals
from .rootfs import remove_scratch
from .rootless.cgroup import remove_stale_cgroups
from .sandbox import remove_stale_containers

PREFIX = "estargz-optimize-"


def sweep_stale(parent: str | None = None) -> list[str]:
    """Remove what killed runs left in ``parent`` (default ``$TMPDIR``):
    their work directories, containers and cgroups; what could not be
    removed, as messages.  Only directories owned by this user are touched,
    and none whose run is alive (it holds the lock)."""
    problems: list[str] = []
    for path in stale_tempdirs(parent or tempfile.gettempdir(), PREFIX):
        with deferred_signals():
            problems.extend(remove_stale_containers(path))
            problems.extend(f"cannot remove cgroup {d}" for d in remove_stale_cgroups(path))
            problem = remove_scratch(path)
        if problem:
            problems.append(problem)
    return problems


@contextlib.contextmanager
def work_directory(parent: str | None = None) -> Iterator[str]:
    """A new, locked work directory in ``parent`` (default ``$TMPDIR``),
    unmounted and removed when the block ends; a
    :class:`~estargz.StorageError` if that fails (a note, if the block
    raised already)."""
    with deferred_signals():
        # Locked until this process ends, however: the descriptor is
        # close-on-exec, so no child keeps it.
        owned = OwnedTempDir(parent or tempfile.gettempdir(), PREFIX)
    try:
        yield owned.path
    except BaseException as e:
        with deferred_signals():
            problem = remove_scratch(owned.path)
        if problem:
            add_note(e, problem)
        raise
    else:
        with deferred_signals():
            problem = remove_scratch(owned.path)
        if problem:
            raise StorageError(problem)
    finally:
        owned.release()
