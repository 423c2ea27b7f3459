"""A read-write overlayfs mount of extracted layers: :class:`OverlayRoot`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from estargz import StorageError

from ..linux import (
    MS_NODEV,
    MS_NOSUID,
    PAGE_SIZE,
    add_note,
    deferred_signals,
    filesystem_full,
    mount,
    package_env,
    unmount_all,
)
from .dirfd import remove_tree

#: overlayfs's limit on lower directories in one mount (OVL_MAX_STACK).
OVL_MAX_STACK = 500

#: What the workload may write, by default, in either mode: the size of the
#: tmpfs under the overlay's upper layer (root), or the room left on the
#: tmpfs beyond the image's files (rootless).  ``estargz optimize
#: --scratch-size``.  Writes past it fail with ENOSPC.
SCRATCH_BYTES = 256 << 20


def scratch_full_note(scratch_bytes: int) -> str:
    """The report's note when the workload filled the room it may write."""
    return (f"the workload filled the {scratch_bytes >> 20} MiB it may write (--scratch-size):"
            f" its writes failed with ENOSPC from then on, so it may have read less than it"
            f" would have")

# mount(2) run from a child process (see OverlayRoot._mount): argv is
# options, mount point, flags.
_CHILD_MOUNT = """
import sys
from profiler.linux import mount
try:
    mount("overlay", sys.argv[2], "overlay", int(sys.argv[3]), sys.argv[1])
except OSError as e:
    sys.exit(e.strerror)
"""


def _mount_overlay(options: str, target: str, flags: int) -> None:
    try:
        mount("overlay", target, "overlay", flags, options)
    except OSError as e:
        raise StorageError(f"cannot mount overlayfs on {target}: {e.strerror}") from None


def remove_scratch(scratch: str) -> str | None:
    """Unmount, then delete ``scratch``; a message saying what failed, or None.

    Nothing is deleted while a mount is left below it: removing files through
    a mount would reach into what is mounted."""
    left = unmount_all(scratch)
    if left:
        return f"cannot unmount {', '.join(left)}; {scratch} is left in place"
    try:
        remove_tree(scratch)
    except StorageError as e:
        return str(e)
    return None


class OverlayRoot:
    """A read-write overlayfs mount of ``lower_dirs`` (bottom to top).

    Inside ``scratch`` (created if missing) it makes ``upper/`` (what the
    workload writes), ``work/`` and the mount point ``merged/``, and mounts::

        overlay on merged: lowerdir=TOP:...:BOTTOM,upperdir=upper,workdir=work

    with ``nodev``, so that device nodes a hostile image carries cannot be
    opened through the mount (the sandbox mounts its own ``/dev``).

    ``upper_bytes``: bound what can be written through the mount.  A tmpfs
    of that size is mounted on ``scratch/rw`` and holds ``upper/`` and
    ``work/`` (overlayfs needs both on one filesystem); a write past it
    fails with ENOSPC, and :meth:`upper_full` says so afterwards.  Without
    it the upper layer is a directory on the disk holding ``scratch``.

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

    def __init__(self, lower_dirs: Sequence[str], scratch: str,
                 upper_bytes: int | None = None) -> None:
        self.lower_dirs = [os.path.abspath(d) for d in lower_dirs]
        self.scratch = os.path.abspath(scratch)
        self.upper_bytes = upper_bytes
        self.rw = os.path.join(self.scratch, "rw") if upper_bytes is not None else self.scratch
        self.upper = os.path.join(self.rw, "upper")
        self.work = os.path.join(self.rw, "work")
        self.mountpoint = os.path.join(self.scratch, "merged")
        self.method: str | None = None
        self._entered = False

    def __enter__(self) -> str:
        if self._entered:
            raise RuntimeError("OverlayRoot is not re-entrant")
        # Checked before anything is made: on failure scratch is deleted,
        # which must not take a caller's directory with it.
        for d in (self.rw, self.upper, self.work, self.mountpoint):
            if d != self.scratch and os.path.lexists(d):
                raise StorageError(f"{d} already exists")
        try:
            self._entered = True
            with deferred_signals():
                os.makedirs(self.scratch, mode=0o700, exist_ok=True)
                if self.upper_bytes is not None:
                    os.mkdir(self.rw, 0o700)
                    mount("tmpfs", self.rw, "tmpfs", MS_NOSUID | MS_NODEV,
                          f"mode=0700,size={self.upper_bytes}")
                for d in (self.upper, self.work, self.mountpoint):
                    os.mkdir(d, 0o755)
                self._mount()
        except BaseException as e:
            with deferred_signals():
                problem = remove_scratch(self.scratch)
            if problem:
                add_note(e, problem)
            if isinstance(e, OSError):
                raise StorageError(f"cannot set up overlayfs in {self.scratch}: "
                                   f"{e.strerror or e}") from None
            raise
        return self.mountpoint

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        with deferred_signals():
            problem = remove_scratch(self.scratch)
        if problem:
            if exc is None:
                raise StorageError(problem)
            add_note(exc, problem)

    def upper_full(self) -> bool:
        """Whether the size-limited upper layer is (all but) full: the
        workload's writes met ENOSPC.  Always False without ``upper_bytes``."""
        return self.upper_bytes is not None and filesystem_full(self.rw)

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
        if len(options) < PAGE_SIZE:
            self.method = "mount(2)"
            _mount_overlay(options, self.mountpoint, MS_NODEV)
            return
        base = os.path.commonpath(lowers)
        rel = [os.path.relpath(p, base) for p in lowers]
        options = (f"lowerdir={':'.join(rel)},upperdir={os.path.relpath(self.upper, base)},"
                   f"workdir={os.path.relpath(self.work, base)}")
        if len(options) >= PAGE_SIZE:
            raise StorageError(f"{len(lowers)} lower directories do not fit in one overlayfs "
                               f"mount's options; put them in one directory with short names")
        self.method = "mount(2), relative paths, child process"
        child = subprocess.run([sys.executable, "-c", _CHILD_MOUNT, options, self.mountpoint,
                                str(MS_NODEV)], cwd=base, capture_output=True, text=True,
                               env=package_env())
        if child.returncode != 0:
            why = (child.stderr.strip().splitlines()[-1] if child.stderr.strip()
                   else f"exit {child.returncode}")
            raise StorageError(f"cannot mount overlayfs on {self.mountpoint}: {why}")
