"""What both fanotify modes share: the constants, the libc calls, the event
record walk, event kinds, and :class:`Group`, the reader of a group's
descriptor.

:mod:`~profiler.fanotify.classic` (events carry an open file, root only) and
:mod:`~profiler.fanotify.fid` (events carry file handles, root of a user
namespace may) are built on it.  No third-party package is used (see
docs/profiling.md): the two calls are a few lines of ctypes, and the
wrappers on PyPI are unmaintained or wrap more than this (permission
events) while hiding what matters here, overflow handling.

Events come in the order the kernel queued them.  The kernel may *merge* an
event into an earlier queued one for the same file and process (their masks
are OR-ed), which keeps the earlier position: first-access order is preserved.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import select
import struct
import time
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from ..errors import ProfilingError
from ..linux import libc

# --- constants (include/uapi/linux/fanotify.h) -------------------------------

# Events (the mask of fanotify_mark and of each event).
FAN_ACCESS = 0x0000_0001         # a file was read
FAN_OPEN = 0x0000_0020           # a file was opened
FAN_OPEN_EXEC = 0x0000_1000      # a file was opened to be executed (execve, ld.so by the kernel)
FAN_Q_OVERFLOW = 0x0000_4000     # the queue overflowed: events were dropped
FAN_EVENT_ON_CHILD = 0x0800_0000  # an inode mark on a directory covers its entries

# fanotify_init flags.
FAN_CLOEXEC = 0x0000_0001
FAN_NONBLOCK = 0x0000_0002
FAN_CLASS_NOTIF = 0x0000_0000    # notification only, no permission decisions
FAN_UNLIMITED_QUEUE = 0x0000_0010

# fanotify_mark flags.
FAN_MARK_ADD = 0x0000_0001
FAN_MARK_INODE = 0x0000_0000
FAN_MARK_MOUNT = 0x0000_0010
FAN_MARK_FILESYSTEM = 0x0000_0100

FANOTIFY_METADATA_VERSION = 3
FAN_NOFD = -1
AT_FDCWD = -100

#: struct fanotify_event_metadata: event_len u32, vers u8, reserved u8,
#: metadata_len u16, mask u64 (8-byte aligned, which this offset already is),
#: fd s32, pid s32.  Native byte order: the kernel writes host-endian.
METADATA = struct.Struct("=IBBHQii")
METADATA_SIZE = METADATA.size  # 24

#: What the profiler asks for by default: opens, reads and executions.
DEFAULT_MASK = FAN_OPEN | FAN_ACCESS | FAN_OPEN_EXEC

_READ_SIZE = 256 * 1024  # room for ~10 000 events per read(2)


class MarkKind(enum.Enum):
    """What a mark covers: one inode, every file reached through one mount,
    or every file of one filesystem (superblock), through any mount."""

    INODE = FAN_MARK_INODE
    MOUNT = FAN_MARK_MOUNT
    FILESYSTEM = FAN_MARK_FILESYSTEM


# --- libc ---------------------------------------------------------------------

_prototyped = False


def fanotify_lib() -> ctypes.CDLL:
    """libc with the prototypes of ``fanotify_init`` and ``fanotify_mark`` set."""
    global _prototyped
    lib = libc()
    if not _prototyped:
        try:
            lib.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
            lib.fanotify_init.restype = ctypes.c_int
            # The mask is a uint64_t: without argtypes ctypes would pass an int.
            lib.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                                          ctypes.c_int, ctypes.c_char_p]
            lib.fanotify_mark.restype = ctypes.c_int
        except AttributeError:
            raise ProfilingError("this C library has no fanotify_init/fanotify_mark:"
                                 " fanotify needs Linux with glibc or musl") from None
        _prototyped = True
    return lib


def fanotify_mark(fd: int, flags: int, mask: int, path: str, dirfd: int = AT_FDCWD) -> None:
    """``fanotify_mark(2)``: add, change or remove a mark on ``path``."""
    if fanotify_lib().fanotify_mark(fd, flags, mask, dirfd, os.fsencode(path)) != 0:
        err = ctypes.get_errno()
        what = f"fanotify_mark {path!r}"
        if err == errno.EPERM:
            raise ProfilingError(f"{what}: permission denied: mount and filesystem marks"
                                 " need root (CAP_SYS_ADMIN)")
        if err == errno.ENOENT:
            raise ProfilingError(f"{what}: no such file or directory")
        if err == errno.EINVAL:
            raise ProfilingError(f"{what}: invalid mark (flags {flags:#x}, mask {mask:#x}):"
                                 " FAN_MARK_FILESYSTEM needs Linux 4.20, FAN_OPEN_EXEC 5.0")
        if err == errno.EXDEV:
            raise ProfilingError(f"{what}: this filesystem cannot be marked (EXDEV:"
                                 " e.g. a subvolume or an idmapped mount)")
        if err == errno.ENOSYS:
            raise ProfilingError(f"{what}: not implemented: the kernel needs"
                                 " CONFIG_FANOTIFY=y")
        raise ProfilingError(f"{what}: {os.strerror(err)}")


# --- events -------------------------------------------------------------------

def iter_records(buf: bytes) -> Iterator[tuple[int, int, int, int, int, int]]:
    """Walk the event records in what ``read(2)`` returned on a fanotify fd:
    yield ``(offset, event_len, metadata_len, mask, fd, pid)`` for each.

    Follows ``event_len`` (not ``metadata_len``) from one record to the next,
    so records that carry extra information are skipped over correctly.
    Raises :class:`ProfilingError` on a version mismatch or a truncated
    record: either would mean mis-reading every later event."""
    off = 0
    while off < len(buf):
        if len(buf) - off < METADATA_SIZE:
            raise ProfilingError(f"fanotify: truncated event record at byte {off}")
        event_len, vers, _, metadata_len, mask, fd, pid = METADATA.unpack_from(buf, off)
        if vers != FANOTIFY_METADATA_VERSION:
            raise ProfilingError(f"fanotify: event metadata version {vers}, expected"
                                 f" {FANOTIFY_METADATA_VERSION}: kernel and profiler disagree")
        if event_len < METADATA_SIZE or off + event_len > len(buf):
            raise ProfilingError(f"fanotify: bad event length {event_len} at byte {off}")
        yield off, event_len, metadata_len, mask, fd, pid
        off += event_len


class Kind(str, enum.Enum):
    """How a file was first touched, from the event mask."""

    EXEC = "exec"      # opened for execution: execve or the kernel loading ld.so
    OPEN = "open"
    ACCESS = "access"  # read without an open seen (opened before the watch began)


def kind_of(mask: int) -> Kind:
    """The most specific kind in ``mask`` (exec, then open, then access)."""
    if mask & FAN_OPEN_EXEC:
        return Kind.EXEC
    if mask & FAN_OPEN:
        return Kind.OPEN
    return Kind.ACCESS


class MaskedEvent:
    """What every event type derives from its ``mask``."""

    mask: int

    @property
    def kind(self) -> Kind:
        return kind_of(self.mask)

    @property
    def overflow(self) -> bool:
        return bool(self.mask & FAN_Q_OVERFLOW)


E = TypeVar("E")
_G = TypeVar("_G", bound="Group[Any]")


class Group(Generic[E]):
    """What every fanotify group reader shares: the descriptor, reading
    batches without blocking, waiting with ``select``, overflow tracking.
    Subclasses create the group in :meth:`open` and turn one buffer of raw
    records into events in :meth:`_decode`."""

    def __init__(self) -> None:
        self.overflowed = False
        self._fd = -1

    def open(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, buf: bytes, now: float) -> list[E]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self: _G) -> _G:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the mark and free the group (queued events are discarded)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def fileno(self) -> int:
        """The group's descriptor: readable when events are queued (for select)."""
        if self._fd < 0:
            raise ValueError("the watcher is closed")
        return self._fd

    def read_events(self) -> list[E]:
        """Every event queued now, in arrival order; empty if none (never blocks)."""
        out: list[E] = []
        while True:
            try:
                buf = os.read(self.fileno(), _READ_SIZE)
            except BlockingIOError:
                return out
            except OSError as e:
                raise ProfilingError(f"fanotify: reading events failed: {e.strerror}") from e
            if not buf:
                return out
            out.extend(self._decode(buf, time.monotonic()))

    def events(self, timeout: float | None = None) -> Iterator[E]:
        """Yield events as they arrive, until ``timeout`` seconds pass with no
        event (forever if ``None``) or the watcher is closed."""
        while self._fd >= 0:
            batch = self.read_events()
            if batch:
                yield from batch
                continue
            ready, _, _ = select.select([self._fd], [], [], timeout)
            if not ready:
                return

    def __iter__(self) -> Iterator[E]:
        return self.events()
