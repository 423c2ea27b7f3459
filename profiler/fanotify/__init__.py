"""A ctypes binding of Linux fanotify, enough to record file accesses.

* :mod:`.events`: what both modes share: constants, ``fanotify_mark``, the
  event record walk, :class:`Kind`, and :class:`Group`, the reader of a
  group's descriptor;
* :mod:`.classic`: events carrying an open file (:class:`Watcher`), root only;
* :mod:`.fid`: events carrying file handles (:class:`FidWatcher`), which
  the root of a user namespace may use, resolved through a
  :class:`HandleTable` built before the workload runs.

Stdlib and ctypes only: the capability probe imports it from Debian's bare
``/usr/bin/python3``.
"""

from .classic import Event, RawEvent, Watcher, fanotify_init, pack_event, parse_events
from .events import (
                     AT_FDCWD,
                     DEFAULT_MASK,
                     FAN_ACCESS,
                     FAN_CLASS_NOTIF,
                     FAN_CLOEXEC,
                     FAN_EVENT_ON_CHILD,
                     FAN_MARK_ADD,
                     FAN_MARK_FILESYSTEM,
                     FAN_MARK_INODE,
                     FAN_MARK_MOUNT,
                     FAN_NOFD,
                     FAN_NONBLOCK,
                     FAN_OPEN,
                     FAN_OPEN_EXEC,
                     FAN_Q_OVERFLOW,
                     FAN_UNLIMITED_QUEUE,
                     FANOTIFY_METADATA_VERSION,
                     METADATA,
                     METADATA_SIZE,
                     Group,
                     Kind,
                     MarkKind,
                     MaskedEvent,
                     fanotify_lib,
                     fanotify_mark,
                     iter_records,
                     kind_of,
)
from .fid import (
                     FAN_EVENT_INFO_TYPE_DFID,
                     FAN_EVENT_INFO_TYPE_DFID_NAME,
                     FAN_EVENT_INFO_TYPE_FID,
                     FAN_REPORT_DFID_NAME,
                     FAN_REPORT_DIR_FID,
                     FAN_REPORT_FID,
                     FAN_REPORT_NAME,
                     MAX_HANDLE_SZ,
                     FidEvent,
                     FidInfo,
                     FidWatcher,
                     HandleKey,
                     HandleTable,
                     RawFidEvent,
                     fanotify_init_fid,
                     name_to_handle_at,
                     pack_fid_event,
                     parse_fid_events,
)

__all__ = [
    "AT_FDCWD", "DEFAULT_MASK", "Event", "FANOTIFY_METADATA_VERSION", "FAN_ACCESS",
    "FAN_CLASS_NOTIF", "FAN_CLOEXEC",
    "FAN_EVENT_INFO_TYPE_DFID",
    "FAN_EVENT_INFO_TYPE_DFID_NAME", "FAN_EVENT_INFO_TYPE_FID", "FAN_EVENT_ON_CHILD",
    "FAN_MARK_ADD", "FAN_MARK_FILESYSTEM",
    "FAN_MARK_INODE", "FAN_MARK_MOUNT",
    "FAN_NOFD", "FAN_NONBLOCK", "FAN_OPEN", "FAN_OPEN_EXEC", "FAN_Q_OVERFLOW",
    "FAN_REPORT_DFID_NAME", "FAN_REPORT_DIR_FID", "FAN_REPORT_FID", "FAN_REPORT_NAME",
    "FAN_UNLIMITED_QUEUE", "FidEvent", "FidInfo", "FidWatcher", "Group",
    "HandleKey", "HandleTable", "Kind", "MAX_HANDLE_SZ", "METADATA", "METADATA_SIZE",
    "MarkKind", "MaskedEvent", "RawEvent", "RawFidEvent", "Watcher", "fanotify_init",
    "fanotify_init_fid", "fanotify_lib", "fanotify_mark", "iter_records", "kind_of",
    "name_to_handle_at", "pack_event", "pack_fid_event", "parse_events", "parse_fid_events",
]
