"""fanotify as root: events that carry an open file descriptor.

The classic mode (``FAN_CLASS_NOTIF`` without ``FAN_REPORT_FID``) needs
CAP_SYS_ADMIN in the initial user namespace.  Each event holds an open file;
its path is what ``readlink /proc/self/fd/N`` gives in the reader's view.

Typical use::

    with Watcher("/proc/1234/root", mark=MarkKind.MOUNT) as w:
        ...                        # the watched process runs
        for event in w.read_events():
            print(event.path, event.kind, event.pid)
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass

from ..errors import ProfilingError
from .events import (
    DEFAULT_MASK,
    FAN_CLASS_NOTIF,
    FAN_CLOEXEC,
    FAN_MARK_ADD,
    FAN_NOFD,
    FAN_NONBLOCK,
    FAN_UNLIMITED_QUEUE,
    FANOTIFY_METADATA_VERSION,
    METADATA,
    METADATA_SIZE,
    Group,
    MarkKind,
    MaskedEvent,
    fanotify_lib,
    fanotify_mark,
    iter_records,
)


def fanotify_init(flags: int, event_f_flags: int) -> int:
    """``fanotify_init(2)``: a new notification group, as a file descriptor."""
    fd: int = fanotify_lib().fanotify_init(flags, event_f_flags)
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise ProfilingError("fanotify_init: permission denied: profiling needs root"
                                 " (CAP_SYS_ADMIN in the initial user namespace)")
        if err == errno.ENOSYS:
            raise ProfilingError("fanotify_init: not implemented: the kernel needs"
                                 " CONFIG_FANOTIFY=y")
        if err == errno.EINVAL:
            raise ProfilingError(f"fanotify_init: flags {flags:#x} not supported by this"
                                 " kernel (FAN_OPEN_EXEC needs Linux 5.0 or later)")
        if err == errno.EMFILE:
            raise ProfilingError("fanotify_init: too many fanotify groups or open files"
                                 " (see /proc/sys/fs/fanotify/max_user_groups)")
        raise ProfilingError(f"fanotify_init: {os.strerror(err)}")
    return fd


# --- events -------------------------------------------------------------------

@dataclass(frozen=True)
class RawEvent:
    """One ``struct fanotify_event_metadata`` as the kernel wrote it."""

    mask: int
    fd: int
    pid: int


def parse_events(buf: bytes) -> list[RawEvent]:
    """Split what ``read(2)`` returned on a fanotify fd into events
    (see :func:`iter_records` for what is checked)."""
    return [RawEvent(mask, fd, pid) for _, _, _, mask, fd, pid in iter_records(buf)]


def pack_event(mask: int, fd: int = FAN_NOFD, pid: int = 0) -> bytes:
    """One event record as the kernel would write it (for tests)."""
    return METADATA.pack(METADATA_SIZE, FANOTIFY_METADATA_VERSION, 0, METADATA_SIZE,
                         mask, fd, pid)


@dataclass(frozen=True)
class Event(MaskedEvent):
    """One file access.  ``path`` is as ``readlink /proc/self/fd/N`` gives it
    in the reader's view (see :class:`Watcher`); ``None`` for an overflow."""

    path: str | None
    mask: int
    pid: int
    #: ``time.monotonic()`` when the event was read (the kernel gives no time).
    time: float
    #: A regular file (not a device, fifo or socket opened through the mark).
    regular: bool = True
    #: The file was unlinked by the time the event was read.
    deleted: bool = False


def _resolve(raw: RawEvent, now: float) -> Event:
    """Turn a raw event into an :class:`Event`, closing its descriptor."""
    if raw.fd < 0:  # FAN_NOFD: an overflow (or an event with no file)
        return Event(None, raw.mask, raw.pid, now, regular=False)
    try:
        path = os.readlink(f"/proc/self/fd/{raw.fd}")
        st = os.fstat(raw.fd)
    except OSError as e:  # /proc not mounted, or not ours: nothing can be resolved
        raise ProfilingError(f"fanotify: cannot resolve an event's file through"
                             f" /proc/self/fd: {e.strerror}") from e
    finally:
        os.close(raw.fd)  # never leak: every event holds an open file
    deleted = st.st_nlink == 0 and path.endswith(" (deleted)")
    if deleted:
        path = path[: -len(" (deleted)")]
    return Event(path, raw.mask, raw.pid, now, regular=stat.S_ISREG(st.st_mode),
                 deleted=deleted)


class Watcher(Group[Event]):
    """A fanotify group with one mark, read as a stream of :class:`Event`.

    ``path`` is marked with ``mark`` for the events in ``mask``.  Needs root
    (CAP_SYS_ADMIN).  With ``unlimited_queue`` (the default) the kernel never
    drops events for lack of queue room; otherwise, or if the kernel drops
    anyway, a ``FAN_Q_OVERFLOW`` event arrives: it is yielded like any other
    (``event.overflow``) and :attr:`overflowed` becomes true, so a caller can
    never miss that events were lost.

    The group is non-blocking and close-on-exec: workloads started later do
    not inherit it.  Use as a context manager; :meth:`close` is idempotent.
    """

    def __init__(self, path: str, *, mark: MarkKind = MarkKind.MOUNT,
                 mask: int = DEFAULT_MASK, unlimited_queue: bool = True) -> None:
        super().__init__()
        self.path = path
        self.mark = mark
        self.mask = mask
        self.unlimited_queue = unlimited_queue

    def open(self) -> None:
        """Create the group and place the mark (``__enter__`` does this)."""
        if self._fd >= 0:
            return
        flags = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK
        if self.unlimited_queue:
            flags |= FAN_UNLIMITED_QUEUE
        # O_RDONLY: the event fds are only readlink'ed and fstat'ed.  O_LARGEFILE
        # avoids EOVERFLOW events for files over 2 GiB (a no-op on 64-bit).
        self._fd = fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC
                                 | getattr(os, "O_LARGEFILE", 0))
        try:
            fanotify_mark(self._fd, FAN_MARK_ADD | self.mark.value, self.mask, self.path)
        except BaseException:
            self.close()
            raise

    def _decode(self, buf: bytes, now: float) -> list[Event]:
        raws = parse_events(buf)
        out = []
        for i, raw in enumerate(raws):
            try:
                event = _resolve(raw, now)
            except BaseException:
                for later in raws[i + 1:]:  # do not leak the rest of this batch
                    if later.fd >= 0:
                        os.close(later.fd)
                raise
            if event.overflow:
                self.overflowed = True
            out.append(event)
        return out
