"""fanotify in FID mode: events that carry file handles instead of descriptors.

An unprivileged user (root only inside its own user namespace) may create a
fanotify group only with ``FAN_REPORT_FID``.  Its events then carry no open
file: each ``struct fanotify_event_metadata`` (``fd`` = ``FAN_NOFD``) is
followed by info records::

    struct fanotify_event_info_header { u8 info_type; u8 pad; u16 len; };
    struct fanotify_event_info_fid {
        struct fanotify_event_info_header hdr;
        __kernel_fsid_t fsid;                 /* two s32 */
        unsigned char handle[];               /* struct file_handle, then for
                                                 DFID_NAME a NUL-terminated name */
    };
    struct file_handle { u32 handle_bytes; s32 handle_type; unsigned char f_handle[]; };

Turning a handle back into a file needs ``open_by_handle_at``, which needs
CAP_DAC_READ_SEARCH in the initial namespace.  ``name_to_handle_at`` needs
nothing, so :class:`HandleTable` walks the tree *before* the workload runs and
maps each handle to its path; events are resolved through it.  With
``report_name=True`` (``FAN_REPORT_DFID_NAME``) events also name the entry in
its parent directory, which resolves files created after the walk.

Typical use (in a user namespace that mounted ``root`` itself)::

    with FidWatcher(root) as w:                 # walks root, marks its mount
        ...                                     # the workload runs
        for event in w.read_events():
            print(event.path, event.kind)       # 'usr/bin/python3', Kind.OPEN

Only mount marks are implemented.  Inode marks (``FAN_MARK_ADD`` on each
directory with ``FAN_EVENT_ON_CHILD``) would work where a mount mark is
refused (overlay: EOPNOTSUPP, a bind mount of the host: EPERM); they are
future work.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from dataclasses import dataclass, field

from ..errors import ProfilingError
from .events import (
    AT_FDCWD,
    DEFAULT_MASK,
    FAN_CLASS_NOTIF,
    FAN_CLOEXEC,
    FAN_MARK_ADD,
    FAN_MARK_MOUNT,
    FAN_NOFD,
    FAN_NONBLOCK,
    FAN_Q_OVERFLOW,
    FAN_UNLIMITED_QUEUE,
    FANOTIFY_METADATA_VERSION,
    METADATA,
    METADATA_SIZE,
    Group,
    MaskedEvent,
    fanotify_lib,
    fanotify_mark,
    iter_records,
)

# --- constants (include/uapi/linux/fanotify.h, fcntl.h) --------------------------

FAN_REPORT_FID = 0x0000_0200       # events carry the file's handle
FAN_REPORT_DIR_FID = 0x0000_0400   # ... the parent directory's handle
FAN_REPORT_NAME = 0x0000_0800      # ... and the entry's name in it
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_DFID = 3

MAX_HANDLE_SZ = 128

_INFO_HEADER = struct.Struct("=BBH")         # info_type, pad, len
_FSID = struct.Struct("=ii")                 # __kernel_fsid_t
_FILE_HANDLE = struct.Struct("=Ii")          # handle_bytes, handle_type

#: A handle as a dictionary key: (handle_type, f_handle bytes).
HandleKey = tuple[int, bytes]


# --- parsing --------------------------------------------------------------------

@dataclass(frozen=True)
class FidInfo:
    """One ``fanotify_event_info_fid`` record."""

    info_type: int
    fsid: tuple[int, int]
    handle_type: int
    handle: bytes
    #: The entry's name in the directory (DFID_NAME records only).
    name: str | None = None

    @property
    def key(self) -> HandleKey:
        return (self.handle_type, self.handle)


@dataclass(frozen=True)
class RawFidEvent:
    """One event record: metadata and its info records (unknown types skipped)."""

    mask: int
    pid: int
    infos: tuple[FidInfo, ...] = ()

    def info(self, info_type: int) -> FidInfo | None:
        return next((i for i in self.infos if i.info_type == info_type), None)


def _parse_info(buf: bytes, off: int, end: int) -> tuple[FidInfo | None, int]:
    """The info record at ``off`` (None if of a type not parsed here) and its length."""
    if end - off < _INFO_HEADER.size:
        raise ProfilingError(f"fanotify: truncated info header at byte {off}")
    info_type, _, length = _INFO_HEADER.unpack_from(buf, off)
    if length < _INFO_HEADER.size or off + length > end:
        raise ProfilingError(f"fanotify: bad info record length {length} at byte {off}")
    if info_type not in (FAN_EVENT_INFO_TYPE_FID, FAN_EVENT_INFO_TYPE_DFID_NAME,
                         FAN_EVENT_INFO_TYPE_DFID):
        return None, length  # e.g. a pidfd or error record: not ours to read
    p = off + _INFO_HEADER.size
    rec_end = off + length
    if rec_end - p < _FSID.size + _FILE_HANDLE.size:
        raise ProfilingError(f"fanotify: truncated fid record at byte {off}")
    fsid = _FSID.unpack_from(buf, p)
    p += _FSID.size
    handle_bytes, handle_type = _FILE_HANDLE.unpack_from(buf, p)
    p += _FILE_HANDLE.size
    if handle_bytes > MAX_HANDLE_SZ or p + handle_bytes > rec_end:
        raise ProfilingError(f"fanotify: bad file handle size {handle_bytes} at byte {off}")
    handle = bytes(buf[p:p + handle_bytes])
    p += handle_bytes
    name = None
    if info_type == FAN_EVENT_INFO_TYPE_DFID_NAME:
        nul = buf.find(b"\0", p, rec_end)
        if nul < 0:
            raise ProfilingError(f"fanotify: unterminated name in record at byte {off}")
        name = os.fsdecode(bytes(buf[p:nul]))
    return FidInfo(info_type, fsid, handle_type, handle, name), length


def parse_fid_events(buf: bytes) -> list[RawFidEvent]:
    """Split what ``read(2)`` returned on a FID-mode group into events.

    Like :func:`profiler.fanotify.classic.parse_events`, follows ``event_len`` and
    raises :class:`ProfilingError` on anything malformed rather than guess."""
    out: list[RawFidEvent] = []
    for off, event_len, metadata_len, mask, fd, pid in iter_records(buf):
        if not METADATA_SIZE <= metadata_len <= event_len:
            raise ProfilingError(f"fanotify: bad event length {event_len} at byte {off}")
        if fd != FAN_NOFD:  # not FID mode: a descriptor we must not leak
            if fd >= 0:
                os.close(fd)
            raise ProfilingError("fanotify: event with a file descriptor on a FID-mode group")
        infos = []
        p, end = off + metadata_len, off + event_len
        while p < end:
            info, length = _parse_info(buf, p, end)
            if info is not None:
                infos.append(info)
            p += length
        out.append(RawFidEvent(mask, pid, tuple(infos)))
    return out


def pack_fid_event(mask: int, infos: tuple[FidInfo, ...] = (), pid: int = 0) -> bytes:
    """One event record as the kernel would write it in FID mode (for tests)."""
    body = b""
    for i in infos:
        rec = _FSID.pack(*i.fsid) + _FILE_HANDLE.pack(len(i.handle), i.handle_type) + i.handle
        if i.name is not None:
            rec += os.fsencode(i.name) + b"\0"
        rec += b"\0" * (-(len(rec) + _INFO_HEADER.size) % 4)  # the kernel pads to 4
        body += _INFO_HEADER.pack(i.info_type, 0, _INFO_HEADER.size + len(rec)) + rec
    return METADATA.pack(METADATA_SIZE + len(body), FANOTIFY_METADATA_VERSION, 0,
                          METADATA_SIZE, mask, FAN_NOFD, pid) + body


# --- name_to_handle_at ----------------------------------------------------------

class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


_n2h = None


def name_to_handle_at(path: str, dirfd: int = AT_FDCWD, *,
                      follow: bool = False) -> tuple[HandleKey, int]:
    """``name_to_handle_at(2)``: ``((handle_type, handle), mount_id)`` of ``path``.

    Needs no privilege.  Symlinks are not followed unless ``follow``.
    Raises ``OSError`` (EOPNOTSUPP where the filesystem cannot export handles)."""
    global _n2h
    if _n2h is None:
        fn = fanotify_lib().name_to_handle_at
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_FileHandle),
                       ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        fn.restype = ctypes.c_int
        _n2h = fn
    fh = _FileHandle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    flags = 0x400 if follow else 0  # AT_SYMLINK_FOLLOW
    if _n2h(dirfd, os.fsencode(path), ctypes.byref(fh), ctypes.byref(mount_id), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return (fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes])), mount_id.value


class HandleTable:
    """Handle -> path (relative to ``root``) for every entry under ``root``.

    Walks with ``os.walk`` in sorted order, never following symlinks and not
    descending into other filesystems (their handles could collide, and a
    mount mark does not cover them).  A hard-linked file keeps the first path
    in that order.  Entries that cannot be encoded are counted in
    :attr:`skipped`.  :meth:`add` records a path created later."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._paths: dict[HandleKey, str] = {}
        self._regular: set[HandleKey] = set()
        self.skipped = 0
        self._dev = os.lstat(self.root).st_dev
        try:
            # If the root cannot be encoded, no file can: a seccomp profile
            # that refuses name_to_handle_at, or a filesystem without file
            # handles. Skipping every file would profile "successfully"
            # and record nothing.
            name_to_handle_at(self.root)
        except OSError as e:
            raise ProfilingError(
                f"cannot get file handles (name_to_handle_at) under {self.root}: "
                f"{e.strerror}; FID-mode fanotify needs them (the filesystem has none"
                " here, e.g. overlayfs inside a user namespace, or a seccomp profile"
                " refuses name_to_handle_at: see docs/pipelines.md)") from None
        self.add(".")
        for top, dirs, files in os.walk(self.root, followlinks=False):
            rel_top = os.path.relpath(top, self.root)
            dirs.sort()
            keep = []
            for d in dirs:
                rel = os.path.normpath(os.path.join(rel_top, d))
                if self.add(rel):
                    keep.append(d)
            dirs[:] = keep
            for f in sorted(files):
                self.add(os.path.normpath(os.path.join(rel_top, f)))

    def add(self, rel: str) -> bool:
        """Record ``rel`` (relative to the root); False if skipped."""
        full = os.path.join(self.root, rel)
        try:
            st = os.lstat(full)
            if st.st_dev != self._dev:
                return False
            key, _ = name_to_handle_at(full)
        except OSError:
            self.skipped += 1
            return False
        self._paths.setdefault(key, rel)
        if stat.S_ISREG(st.st_mode):
            self._regular.add(key)
        return True

    def lookup(self, key: HandleKey) -> str | None:
        return self._paths.get(key)

    def is_regular(self, raw: RawFidEvent) -> bool:
        """Whether the event's file was a regular file when the table was built."""
        fid = raw.info(FAN_EVENT_INFO_TYPE_FID)
        return fid is not None and fid.key in self._regular

    def __len__(self) -> int:
        return len(self._paths)

    def resolve(self, raw: RawFidEvent) -> str | None:
        """The event's path: by its file's handle, else its directory and name."""
        fid = raw.info(FAN_EVENT_INFO_TYPE_FID)
        if fid is not None:
            path = self.lookup(fid.key)
            if path is not None:
                return path
        dfid = raw.info(FAN_EVENT_INFO_TYPE_DFID_NAME)
        if dfid is not None and dfid.name is not None:
            parent = self.lookup(dfid.key)
            if parent is not None:
                return os.path.normpath(os.path.join(parent, dfid.name)) \
                    if dfid.name not in ("", ".") else parent
        return None


# --- the watcher ----------------------------------------------------------------

@dataclass(frozen=True)
class FidEvent(MaskedEvent):
    """One access: ``path`` relative to the watched root (None for an overflow or
    a file the table cannot name: outside the root, or created after the walk
    without ``report_name``)."""

    path: str | None
    mask: int
    pid: int
    time: float
    infos: tuple[FidInfo, ...] = field(default=(), repr=False)
    #: A regular file of the table (not a directory, device or fifo).
    regular: bool = False


def fanotify_init_fid(flags: int) -> int:
    """``fanotify_init`` for a FID-mode group, with messages for the rootless case."""
    fd: int = fanotify_lib().fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise ProfilingError(f"fanotify_init (FID mode, flags {flags:#x}): permission"
                                 " denied (unprivileged users need Linux 5.13 or later, and"
                                 " FAN_UNLIMITED_QUEUE needs root)")
        if err == errno.EINVAL:
            raise ProfilingError(f"fanotify_init: flags {flags:#x} not supported by this"
                                 " kernel (FAN_REPORT_FID needs Linux 5.1,"
                                 " FAN_REPORT_DFID_NAME 5.9)")
        if err == errno.ENOSYS:
            raise ProfilingError("fanotify_init: not implemented: the kernel needs"
                                 " CONFIG_FANOTIFY=y")
        raise ProfilingError(f"fanotify_init: {os.strerror(err)}")
    return fd


class FidWatcher(Group[FidEvent]):
    """A FID-mode fanotify group with a mount mark on ``path``'s mount, read as
    :class:`FidEvent` resolved through a :class:`HandleTable` of ``path``.

    Works without root inside a user namespace that mounted the filesystem
    (e.g. a tmpfs); see the module docstring for what refuses mount marks.
    ``unlimited_queue``: True requires it, False never asks, None (default)
    asks and falls back to a bounded queue where it is refused (it needs
    CAP_SYS_ADMIN in the initial user namespace).  A dropped event shows as a
    ``FAN_Q_OVERFLOW`` event, yielded like others, and sets :attr:`overflowed`:
    nothing is lost silently.
    """

    def __init__(self, path: str, *, table: HandleTable | None = None,
                 mask: int = DEFAULT_MASK, report_name: bool = False,
                 unlimited_queue: bool | None = None) -> None:
        super().__init__()
        self.path = path
        self.table = table
        self.mask = mask
        self.report_name = report_name
        self.unlimited_queue = unlimited_queue

    def open(self) -> None:
        if self._fd >= 0:
            return
        if self.table is None:
            self.table = HandleTable(self.path)
        flags = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_FID
        if self.report_name:
            flags |= FAN_REPORT_DFID_NAME
        if self.unlimited_queue is not False:
            try:
                self._fd = fanotify_init_fid(flags | FAN_UNLIMITED_QUEUE)
            except ProfilingError:
                if self.unlimited_queue:
                    raise
        if self._fd < 0:  # root only in a user namespace: a bounded queue
            self._fd = fanotify_init_fid(flags)
        try:
            fanotify_mark(self._fd, FAN_MARK_ADD | FAN_MARK_MOUNT, self.mask, self.path)
        except ProfilingError as e:
            self.close()
            if "Operation not supported" in str(e):
                raise ProfilingError(f"{e} (this filesystem refuses mount marks in FID mode,"
                                     " e.g. overlayfs inside a user namespace)") from None
            raise
        except BaseException:
            self.close()
            raise

    def _decode(self, buf: bytes, now: float) -> list[FidEvent]:
        assert self.table is not None
        out = []
        for raw in parse_fid_events(buf):
            path = None if raw.mask & FAN_Q_OVERFLOW else self.table.resolve(raw)
            if raw.mask & FAN_Q_OVERFLOW:
                self.overflowed = True
            out.append(FidEvent(path, raw.mask, raw.pid, now, raw.infos,
                                regular=path is not None and self.table.is_regular(raw)))
        return out
