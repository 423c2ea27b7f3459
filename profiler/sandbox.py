"""Run a workload in an OCI sandbox and record the files it reads.

:func:`run_profiled` takes an assembled root filesystem (a writable,
throw-away view such as an overlay mount point, owned by the caller) and a
process to run in it.  It writes an OCI runtime spec into a temporary bundle,
and drives a real runtime (runc, or crun) through the sequence that lets
fanotify see the workload from its first instruction on::

    runtime create   the container's init exists, namespaces and mounts are
                     set up, and it waits (on the exec fifo) before execve
    fanotify mark    FAN_MARK_MOUNT on /proc/INIT/root: the container's own
                     root mount, as the host sees it
    runtime start    init execs the entrypoint: the kernel opens the binary
                     and ld.so, ld.so opens libc ... all seen
    ...              events and output until the workload exits, the period
                     ends, a line appears, or SIGINT
    runtime kill --all ID KILL; runtime delete --force ID
                     then check that no process of the container is left

Why a mount mark on ``/proc/INIT/root`` (measured, see docs/profiling.md):
it covers exactly the container's root mount, so host processes that touch
the same files through another mount, and the container's /proc, /dev, /sys
and bind mounts, are never reported; and ``readlink /proc/self/fd/N`` on the
host gives paths relative to the container's root ("/usr/bin/python3"),
because the container's mounts are not reachable from the host's root.  A
filesystem mark on the rootfs also sees the host (556 events from 30 host
processes in one measurement against 5 from the container), and entering the
container's mount namespace (setns) needs a single-threaded helper process
while giving the same paths.

The library is exception-safe (everything is torn down on any exception,
KeyboardInterrupt included); turning SIGTERM into KeyboardInterrupt is the
caller's job, for which :func:`interrupt_on_sigterm` is provided.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import json
import os
import secrets
import select
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

from .capabilities import which_runtime
from .errors import ProfilingError
from .fanotify import Event, Group, Kind, MarkKind, Watcher
from .fanotify_fid import FidWatcher, HandleTable
from .userns import in_initial_user_namespace

# --- what the sandbox looks like --------------------------------------------------

#: Docker's default capability set (moby oci/caps/defaults.go), in its order.
DOCKER_DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
    "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)

#: The PATH Docker gives a container whose image sets none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_MEMORY_BYTES = 4 << 30
DEFAULT_PIDS_LIMIT = 4096

# The standard mounts of Docker and `runc spec`.  Files under them are never
# part of the image, so accesses below them are never reported.
_STANDARD_MOUNTS: tuple[dict, ...] = (
    {"destination": "/proc", "type": "proc", "source": "proc",
     "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
     "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
     "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs",
     "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
     "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
)

# What a runtime run by the root of a user namespace mounts instead (as
# `runc spec --rootless`): sysfs needs a network namespace of its own, so /sys
# is the host's, read-only; a cgroup mount needs delegated cgroups; gid 5
# (tty) is not mapped.
_ROOTLESS_MOUNTS: dict[str, Optional[dict]] = {
    "/sys": {"destination": "/sys", "type": "none", "source": "/sys",
             "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]},
    "/sys/fs/cgroup": None,
    "/dev/pts": {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
}

# (path, type, major, minor): the devices every container gets in /dev.
_STANDARD_DEVICES: tuple[tuple[str, str, int, int], ...] = (
    ("/dev/null", "c", 1, 3), ("/dev/zero", "c", 1, 5), ("/dev/full", "c", 1, 7),
    ("/dev/random", "c", 1, 8), ("/dev/urandom", "c", 1, 9), ("/dev/tty", "c", 5, 0),
)

# The device cgroup: deny everything, then Docker's default allow list.
_DEVICE_RULES: tuple[dict, ...] = (
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "access": "m"},               # mknod of any char device
    {"allow": True, "type": "b", "access": "m"},               # mknod of any block device
    *({"allow": True, "type": t, "major": ma, "minor": mi, "access": "rwm"}
      for _, t, ma, mi in _STANDARD_DEVICES),
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},   # /dev/ptmx
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},             # /dev/pts/*
)

_MASKED_PATHS = ("/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys",
                 "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                 "/proc/sched_debug", "/proc/scsi", "/sys/firmware")
_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

_RUNTIME_TIMEOUT = 60.0   # create, start, kill and delete each take well under a second
_REAP_TIMEOUT = 10.0      # for the init to die after SIGKILL
_OUTPUT_DRAIN = 2.0       # for the last output after the workload exited


# --- public types -----------------------------------------------------------------

@dataclass(frozen=True)
class BindMount:
    """A host path bind-mounted into the container.  Files read through it are
    not in the image and are never reported."""

    source: str
    destination: str
    options: tuple[str, ...] = ("rbind", "ro")

    @classmethod
    def parse(cls, text: str) -> "BindMount":
        """Parse ``type=bind,src=/host,dst=/in/container[,options=ro:rbind]``
        (``source``/``target``/``destination`` are accepted too).  Without
        ``options`` the mount is read-only; ``options=rw`` makes it writable."""
        fields: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise ProfilingError(f"mount {text!r}: {part!r} is not KEY=VALUE")
            fields[key.strip()] = value
        kind = fields.pop("type", "bind")
        if kind != "bind":
            raise ProfilingError(f"mount {text!r}: only type=bind is supported")
        src = fields.pop("src", None) or fields.pop("source", None)
        dst = (fields.pop("dst", None) or fields.pop("destination", None)
               or fields.pop("target", None))
        opts = [o for o in fields.pop("options", "").split(":") if o]
        if fields:
            raise ProfilingError(f"mount {text!r}: unknown field(s) {', '.join(sorted(fields))}")
        if not src or not dst:
            raise ProfilingError(f"mount {text!r}: src= and dst= are required")
        if not any(o in ("bind", "rbind") for o in opts):
            opts.insert(0, "rbind")
        if not any(o in ("ro", "rw") for o in opts):
            opts.append("ro")
        return cls(src, dst, tuple(opts))

    def spec(self) -> dict:
        """This mount as an entry of the OCI spec's ``mounts``."""
        return {"destination": self.destination, "type": "bind",
                "source": os.path.abspath(self.source), "options": list(self.options)}


@dataclass
class ProcessSpec:
    """What to run: the image config's entrypoint+cmd, env, user and working dir.

    ``user`` is what an image config holds: ``""`` (root), a name, a uid, or
    ``user:group`` with names or numbers, resolved with the rootfs's
    /etc/passwd and /etc/group as Docker does."""

    args: list[str]
    env: list[str] = field(default_factory=list)
    user: str = ""
    cwd: str = "/"


@dataclass
class SandboxOptions:
    """How to run and when to stop.

    The profile ends when the workload exits, or after ``period`` seconds, or
    (if set) as soon as a line of its output contains ``wait_on_line``.  With
    ``wait_on_signal`` the period is ignored and the profile ends on SIGINT
    (KeyboardInterrupt), which then returns a result instead of propagating.
    """

    runtime: str = "runc"
    period: float = 10.0
    wait_on_line: Optional[str] = None
    wait_on_signal: bool = False
    #: Share the host's network namespace; otherwise only a loopback (up).
    net_host: bool = False
    mounts: list[BindMount] = field(default_factory=list)
    #: cgroup limits; None leaves the limit unset.
    memory_bytes: Optional[int] = DEFAULT_MEMORY_BYTES
    pids_limit: Optional[int] = DEFAULT_PIDS_LIMIT
    hostname: str = "estargz-profile"
    #: Hide the workload's output (it is still read, and still matched
    #: against ``wait_on_line``).
    quiet: bool = False
    #: Receives each output line, prefixed "workload: ".  Default: stderr.
    output: Optional[Callable[[str], None]] = None
    #: Where the temporary bundle and runtime state go (default: $TMPDIR).
    workdir: Optional[str] = None


class StopReason(str, enum.Enum):
    """Why profiling ended."""

    EXITED = "exited"    # the workload exited by itself
    PERIOD = "period"    # the period ran out (timed out)
    LINE = "line"        # wait_on_line appeared in the output
    SIGNAL = "signal"    # SIGINT with wait_on_signal


@dataclass(frozen=True)
class Access:
    """The first access to one regular file of the rootfs."""

    #: Absolute inside the container, e.g. "/usr/bin/python3".
    path: str
    #: Seconds from ``runtime start`` to when the event was read.
    time: float
    kind: Kind


@dataclass
class ProfileRun:
    """What :func:`run_profiled` observed."""

    #: Files of the root filesystem in first-access order, each once.
    accesses: list[Access]
    #: The workload's exit code (negative: killed by that signal); None if it
    #: was still running when profiling ended and had to be killed.
    exit_code: Optional[int]
    stopped_by: StopReason
    #: The kernel dropped events: the list may be incomplete.
    overflowed: bool
    #: Seconds from ``runtime start`` to the end of profiling.
    duration: float
    #: fanotify events read, before de-duplication and filtering.
    events: int = 0

    @property
    def timed_out(self) -> bool:
        return self.stopped_by is StopReason.PERIOD

    @property
    def paths(self) -> list[str]:
        return [a.path for a in self.accesses]


@dataclass(frozen=True)
class ResolvedUser:
    """Numeric ids for the OCI spec, and the home directory for $HOME."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


# --- users --------------------------------------------------------------------------

def path_in_root(root: str, path: str) -> str:
    """``path`` inside ``root``, following symlinks as if ``root`` were ``/``.

    An image's /etc/passwd may be a symlink, even an absolute one; following it
    on the host would read the host's file.  This resolves every component
    under ``root``, so ``..`` and absolute links never leave it."""
    parts = [p for p in path.split("/") if p]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            done.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 40:
                raise ProfilingError(f"{path}: too many levels of symbolic links in the rootfs")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        done.append(part)
    return os.path.join(root, *done)


def _read_db(rootfs: str, name: str) -> list[list[str]]:
    """The colon-separated records of /etc/passwd or /etc/group (none if absent)."""
    try:
        with open(path_in_root(rootfs, name), encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f
                    if line.strip() and not line.startswith("#")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def resolve_user(rootfs: str, user: str) -> ResolvedUser:
    """Numeric ids for an image config's ``User``, the way Docker resolves it.

    ``""`` is root.  A name must be in /etc/passwd; a number need not be (its
    group is then 0).  ``:group`` overrides the passwd group, by name (must be
    in /etc/group) or number.  Supplementary groups are those of /etc/group
    that list the user's name."""
    passwd = [r for r in _read_db(rootfs, "/etc/passwd") if len(r) >= 7]
    groups = [r for r in _read_db(rootfs, "/etc/group") if len(r) >= 4]
    user_part, _, group_part = (user or "0").partition(":")
    entry = None
    for r in passwd:
        if r[0] == user_part or (user_part.isdigit() and r[2] == user_part):
            entry = r
            break
    if entry is not None:
        uid, gid, name, home = int(entry[2]), int(entry[3]), entry[0], entry[5] or "/"
    elif user_part.isdigit():
        uid, gid, name, home = int(user_part), 0, None, "/"
    else:
        raise ProfilingError(f"user {user_part!r}: no matching entry in the image's /etc/passwd")
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            match = [r for r in groups if r[0] == group_part]
            if not match:
                raise ProfilingError(f"group {group_part!r}: no matching entry in the image's"
                                     " /etc/group")
            gid = int(match[0][2])
    extra: list[int] = []
    if name is not None:
        for r in groups:
            if name in r[3].split(",") and r[2].isdigit() and int(r[2]) != gid:
                extra.append(int(r[2]))
    return ResolvedUser(uid, gid, tuple(sorted(set(extra))), home)


def _check_mapped(user: ResolvedUser) -> None:
    """In a rootless run only root is mapped into the user namespace."""
    ids = {user.uid, user.gid, *user.additional_gids}
    if ids != {0}:
        who = f"uid {user.uid}, gid {user.gid}" + (
            f", groups {','.join(map(str, user.additional_gids))}" if user.additional_gids else "")
        raise ProfilingError(f"the workload runs as {who}, but without root only root can be"
                             " mapped into the sandbox's user namespace; run as root, or"
                             " give --user 0")


# --- the OCI spec -------------------------------------------------------------------

def build_spec(rootfs: str, process: ProcessSpec, options: SandboxOptions,
               user: ResolvedUser, cgroups_path: str, rootless: bool = False) -> dict:
    """The OCI runtime spec (config.json) for one profiling run.

    ``rootless``: for a runtime run by the root of a user namespace (see
    :mod:`profiler.rootless`), as ``runc spec --rootless`` makes it: no
    cgroup limits (a user namespace may not create cgroups unless they were
    delegated to it), and the mounts of ``_ROOTLESS_MOUNTS``."""
    env = list(process.env)
    if not any(e.startswith("PATH=") for e in env):
        env.append(f"PATH={DEFAULT_PATH}")
    if not any(e.startswith("HOME=") for e in env):
        env.append(f"HOME={user.home}")  # as Docker does, from the passwd entry
    caps = list(DOCKER_DEFAULT_CAPABILITIES)
    proc_user: dict = {"uid": user.uid, "gid": user.gid}
    if user.additional_gids:
        proc_user["additionalGids"] = list(user.additional_gids)
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if not options.net_host:
        # A new network namespace starts with `lo` down; runc and crun both
        # bring it up for a namespace they create (a "loopback" network).
        namespaces.append({"type": "network"})
    mounts = []
    for m in _STANDARD_MOUNTS:
        if rootless and m["destination"] in _ROOTLESS_MOUNTS:
            m = _ROOTLESS_MOUNTS[m["destination"]]  # type: ignore[assignment]
            if m is None:
                continue
        mounts.append(dict(m, options=list(m["options"])))
    linux: dict = {"namespaces": namespaces}
    if not rootless:
        resources: dict = {"devices": [dict(r) for r in _DEVICE_RULES]}
        if options.memory_bytes is not None:
            resources["memory"] = {"limit": int(options.memory_bytes)}
        if options.pids_limit is not None:
            resources["pids"] = {"limit": int(options.pids_limit)}
        # Relative: runc nests it under our own cgroup in each hierarchy.
        linux.update(cgroupsPath=cgroups_path, resources=resources)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": proc_user,
            "args": list(process.args),
            "env": env,
            "cwd": process.cwd,
            # Not inheritable nor ambient: a non-root user gets no capability
            # after execve, as with Docker since 20.10.
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": True,
        },
        "root": {"path": os.path.realpath(rootfs), "readonly": False},
        "hostname": options.hostname,
        "mounts": mounts + [m.spec() for m in options.mounts],
        "linux": {
            **linux,
            "devices": [{"path": p, "type": t, "major": ma, "minor": mi,
                         "fileMode": 0o666, "uid": 0, "gid": 0}
                        for p, t, ma, mi in _STANDARD_DEVICES],
            "maskedPaths": list(_MASKED_PATHS),
            "readonlyPaths": list(_READONLY_PATHS),
        },
    }


# --- helpers ------------------------------------------------------------------------

def find_runtime(runtime: str) -> str:
    """The OCI runtime's executable: a path, or a name looked up on PATH."""
    if os.sep in runtime:
        if os.access(runtime, os.X_OK) and os.path.isfile(runtime):
            return runtime
        raise ProfilingError(f"OCI runtime {runtime!r} is not an executable file")
    found = which_runtime(runtime)
    if found is None:
        raise ProfilingError(f"OCI runtime {runtime!r} not found on PATH: install it"
                             f" (Debian: apt-get install {runtime}) or give its path")
    return found


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


@contextlib.contextmanager
def _subreaper() -> Iterator[None]:
    """Make this process a child subreaper for the duration of the block.

    ``runtime create`` forks the container's init and exits; the orphaned init
    is then re-parented to the nearest subreaper, i.e. us, so that we can
    wait for it and learn the workload's exit status (what containerd's shim
    does).  Only for the create call, so that other orphans of the caller's
    process tree are not adopted for long."""
    old = ctypes.c_int(0)
    _libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(old), 0, 0, 0)
    if _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise ProfilingError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, old.value, 0, 0, 0)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them.

    Tear-down must not be cut short by a second Ctrl-C.  Only the main thread
    can set handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    old = {s: signal.signal(s, lambda signum, _frame: received.append(signum))
           for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(received):  # each once, in arrival order
            signal.raise_signal(signum)


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """For a CLI: make SIGTERM raise KeyboardInterrupt (like SIGINT) in the block,
    so that a profiling run is torn down the same way on either signal."""
    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


class _Flag:
    set = False


@contextlib.contextmanager
def _sigint_sets(flag: _Flag) -> Iterator[None]:
    """In the block, SIGINT sets ``flag`` instead of raising KeyboardInterrupt:
    with wait_on_signal, Ctrl-C ends the profile normally, and a handler that
    raised could cut a batch of events in half."""
    if threading.current_thread() is not threading.main_thread():
        raise ProfilingError("wait_on_signal needs to run in the main thread (signals)")

    def handler(_signum: int, _frame: object) -> None:
        flag.set = True
    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.SIG_DFL)


def _ns_id(pid: int, ns: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(f"/proc/{pid}/ns/{ns}")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_in_pidns(ns: tuple[int, int]) -> list[int]:
    """Host pids of every process in the PID namespace ``ns``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ns_id(int(entry), "pid") == ns:
            found.append(int(entry))
    return found


def _tail(text: str, limit: int = 2000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


class _LineSplitter:
    """Turns the chunks read from a pipe into lines."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]

    def flush(self) -> list[str]:
        rest, self._buf = self._buf, b""
        return [rest.decode("utf-8", "replace").rstrip("\r")] if rest else []


def accesses_from_events(events: Sequence[Event], start: float,
                         excluded: Sequence[str] = ()) -> list[Access]:
    """First access of each regular file, in event order.

    Events are dropped when they are not regular files or have no absolute
    path, or fall below one of ``excluded`` (the container's /proc, /dev, /sys
    and bind mounts: with a mount mark on the root they cannot arrive, this
    is a second line of defence)."""
    seen: set[str] = set()
    out: list[Access] = []
    for e in events:
        if e.path is None or not e.regular or not e.path.startswith("/") or e.path in seen:
            continue
        if any(e.path == x or e.path.startswith(x.rstrip("/") + "/") for x in excluded):
            continue
        seen.add(e.path)
        out.append(Access(e.path, max(0.0, e.time - start), e.kind))
    return out


# --- the run ------------------------------------------------------------------------

class _Run:
    """One container's life: holds every resource so that :meth:`cleanup` can
    release what was acquired, whatever point was reached."""

    def __init__(self, rootfs: str, process: ProcessSpec, options: SandboxOptions,
                 runtime: str) -> None:
        self.rootfs = rootfs
        self.process = process
        self.options = options
        self.runtime = runtime
        self.runtime_name = os.path.basename(runtime)
        self.id = f"estargz-profile-{secrets.token_hex(6)}"
        self.tmp: Optional[str] = None
        self.pid: Optional[int] = None           # the container's init, on the host
        self.pidns: Optional[tuple[int, int]] = None
        self.is_child = False                    # init was adopted: we can wait for it
        self.exit_status: Optional[int] = None
        self.created = False
        self.watcher: Optional[Group] = None
        # Root of a user namespace (profiler.rootless): FID-mode fanotify,
        # whose events name files by handle, through this table of the rootfs.
        self.rootless = not in_initial_user_namespace()
        self.table: Optional[HandleTable] = None
        self.pidfd = -1
        self.output_r = -1                       # the workload's stdout and stderr
        self.emit: Callable[[str], None] = (
            options.output or (lambda line: print(line, file=sys.stderr, flush=True)))

    # -- runtime commands --

    def _cmd(self, *args: str) -> list[str]:
        assert self.tmp is not None
        return [self.runtime, "--root", os.path.join(self.tmp, "state"),
                "--log", os.path.join(self.tmp, "runtime.log"), *args]

    def _runtime(self, *args: str, **popen: object) -> subprocess.CompletedProcess:
        """Run a runtime command to completion (callers defer signals around the
        ones that must not be cut short: create, kill, delete)."""
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        try:
            # Own session: a terminal's Ctrl-C reaches us, not the runtime; we
            # tear the container down ourselves.
            return subprocess.run(self._cmd(*args), stdin=subprocess.DEVNULL,
                                  start_new_session=True, timeout=_RUNTIME_TIMEOUT,
                                  check=False, **popen)  # type: ignore[call-overload]
        except subprocess.TimeoutExpired:
            raise ProfilingError(f"{self.runtime_name} {args[0]} did not finish in"
                                 f" {_RUNTIME_TIMEOUT:.0f} s") from None

    def _failure(self, what: str, stderr: bytes) -> ProfilingError:
        text = stderr.decode("utf-8", "replace").strip()
        if not text:
            try:
                with open(os.path.join(self.tmp or "", "runtime.log"), errors="replace") as f:
                    text = f.read()
            except OSError:
                pass
        prefix = f"{self.runtime_name} {what} failed: "
        text = text.strip().removeprefix(prefix)  # runc says it itself
        return ProfilingError(prefix + (_tail(text) or "no message"))

    # -- phases --

    def prepare(self) -> None:
        # Not mkdtemp: an interrupt could land after it created the directory
        # and before its name was kept, and the clean-up would miss it.
        tmp = os.path.join(self.options.workdir or tempfile.gettempdir(), self.id)
        with _signals_deferred():
            os.mkdir(tmp, 0o700)
            self.tmp = tmp
        bundle = os.path.join(self.tmp, "bundle")
        os.mkdir(bundle)
        user = resolve_user(self.rootfs, self.process.user)
        if self.rootless:
            _check_mapped(user)
            # Before the workload can create or rename anything.
            self.table = HandleTable(self.rootfs)
        spec = build_spec(self.rootfs, self.process, self.options, user, self.id,
                          rootless=self.rootless)
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(spec, f, indent=2)

    def create(self) -> None:
        """``runtime create``: init is ready and blocked before execve."""
        assert self.tmp is not None
        pidfile = os.path.join(self.tmp, "init.pid")
        # Ctrl-C waits for create to end, else the container could appear
        # after the clean-up looked for it.
        with _signals_deferred():
            # One pipe for stdout and stderr (as 2>&1): lines are shown in the
            # order they were written, which two pipes cannot guarantee.
            self.output_r, output_w = os.pipe2(os.O_CLOEXEC)
            # From here on the container may exist, even if create fails midway.
            self.created = True
            try:
                # The container inherits the runtime's stdout and stderr: our pipes.
                with _subreaper():
                    done = self._runtime("create", "--bundle", os.path.join(self.tmp, "bundle"),
                                         "--pid-file", pidfile, self.id,
                                         stdout=output_w, stderr=output_w)
            finally:
                os.close(output_w)
        if done.returncode != 0:
            # The init died with the failed create: the pipes reach EOF.
            raise self._failure("create", _read_all(self.output_r))
        with open(pidfile) as f:
            self.pid = int(f.read().strip())
        self.pidns = _ns_id(self.pid, "pid")
        if self.pidns is None or self.pidns == _ns_id(os.getpid(), "pid"):
            # Never: the spec asks for a new PID namespace.  But the leftover
            # check kills what is in it, so refuse to go on with the host's.
            self.pidns = None
            raise ProfilingError(f"{self.runtime_name} did not give the container its own"
                                 " PID namespace")
        try:
            self.is_child = os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            self.is_child = False  # not adopted (unusual runtime): no exit status
        self.pidfd = os.pidfd_open(self.pid)
        os.set_blocking(self.output_r, False)

    def watch(self) -> None:
        """Mark the container's root mount, as /proc/INIT/root leads to it."""
        if self.rootless:
            self.watcher = FidWatcher(f"/proc/{self.pid}/root", table=self.table)
        else:
            self.watcher = Watcher(f"/proc/{self.pid}/root", mark=MarkKind.MOUNT)
        self.watcher.open()

    def _read_events(self) -> list[Event]:
        """Queued events as :class:`Event`, whatever the group's mode."""
        assert self.watcher is not None
        batch = self.watcher.read_events()
        if not self.rootless:
            return batch
        # FID events carry paths relative to the rootfs, which is the
        # container's "/".
        return [Event(None if e.path is None else "/" if e.path == "." else "/" + e.path,
                      e.mask, e.pid, e.time, regular=e.regular) for e in batch]

    def profile(self) -> ProfileRun:
        """``runtime start`` and record until a stop condition."""
        assert self.watcher is not None
        opts = self.options
        events: list[Event] = []
        splitter = _LineSplitter()
        stop: Optional[StopReason] = None

        def on_lines(lines: list[str]) -> None:
            nonlocal stop
            for line in lines:
                if not opts.quiet:
                    self.emit(f"workload: {line}")
                if opts.wait_on_line is not None and opts.wait_on_line in line and stop is None:
                    stop = StopReason.LINE

        sigint = _Flag()
        sel = selectors.DefaultSelector()
        sel.register(self.watcher.fileno(), selectors.EVENT_READ, "events")
        sel.register(self.output_r, selectors.EVENT_READ, "output")
        sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        start = time.monotonic()
        deadline = None if opts.wait_on_signal else start + opts.period
        starter = subprocess.Popen(self._cmd("start", self.id), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)
        try:
            with (_sigint_sets(sigint) if opts.wait_on_signal else contextlib.nullcontext()):
                while stop is None:
                    # Wake up often while start runs, and to notice SIGINT.
                    timeout = 0.05 if starter.returncode is None or opts.wait_on_signal else None
                    if deadline is not None:
                        left = max(0.0, deadline - time.monotonic())
                        timeout = left if timeout is None else min(timeout, left)
                    for key, _ in sel.select(timeout):
                        if key.data == "events":
                            events.extend(self._read_events())
                        elif key.data == "output":
                            chunk = _read_some(key.fd)
                            if chunk:
                                on_lines(splitter.feed(chunk))
                            elif chunk == b"":
                                sel.unregister(key.fd)  # EOF
                        elif key.data == "exit":
                            self._reap(block=True)
                            sel.unregister(self.pidfd)
                            if stop is None:
                                stop = StopReason.EXITED
                    if starter.returncode is None and starter.poll() is not None \
                            and starter.returncode != 0:
                        raise self._failure("start", starter.communicate()[1])
                    if stop is None and sigint.set:
                        stop = StopReason.SIGNAL
                    if stop is None and deadline is not None and time.monotonic() >= deadline:
                        stop = StopReason.PERIOD
            # Accesses up to now are queued already: read them before the kill.
            events.extend(self._read_events())
            end = time.monotonic()
            if stop is StopReason.EXITED:
                # Last words: the pipe reaches EOF once every process is gone.
                limit = time.monotonic() + _OUTPUT_DRAIN
                while any(k.data == "output" for k in sel.get_map().values()) \
                        and (left := limit - time.monotonic()) > 0:
                    for key, _ in sel.select(left):
                        if key.data == "events":
                            events.extend(self._read_events())
                            continue
                        chunk = _read_some(key.fd)
                        if chunk:
                            on_lines(splitter.feed(chunk))
                        elif chunk == b"":
                            sel.unregister(key.fd)
            else:
                chunk = _read_some(self.output_r)
                if chunk:
                    on_lines(splitter.feed(chunk))
            on_lines(splitter.flush())
        finally:
            sel.close()
            if starter.poll() is None:  # start hangs only if the runtime is broken
                starter.kill()
            starter.communicate()
        excluded = [m["destination"] for m in _STANDARD_MOUNTS] + \
                   [m.destination for m in opts.mounts]
        exit_code = None
        if self.exit_status is not None:  # exited by itself, not killed by us
            exit_code = os.waitstatus_to_exitcode(self.exit_status)
        return ProfileRun(accesses=accesses_from_events(events, start, excluded),
                          exit_code=exit_code, stopped_by=stop,
                          overflowed=self.watcher.overflowed, duration=end - start,
                          events=len(events))

    def _reap(self, block: bool) -> bool:
        """Collect the init's exit status if it has exited; True once reaped."""
        if self.exit_status is not None:
            return True
        if not self.is_child or self.pid is None:
            return False
        try:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            self.is_child = False
            return True
        if pid == 0:
            return False
        self.exit_status = status
        return True

    def cleanup(self) -> None:
        """Kill and delete the container, check nothing is left, remove the
        bundle.  Raises ProfilingError if something could not be cleaned."""
        problems: list[str] = []
        if self.watcher is not None:
            self.watcher.close()
        if self.created and self.tmp is not None:
            try:
                self._runtime("kill", "--all", self.id, "KILL")  # fails if gone: fine
            except ProfilingError as e:
                problems.append(str(e))
            if self.pidfd >= 0:
                # Without cgroups (rootless) `kill --all` cannot list the
                # container's processes and fails; SIGKILL to its init ends
                # them all, the kernel empties a PID namespace whose init dies.
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            if self.is_child:  # reap it: a zombie init would keep the container "running"
                limit = time.monotonic() + _REAP_TIMEOUT
                while not self._reap(block=False) and time.monotonic() < limit:
                    time.sleep(0.01)
            try:
                done = self._runtime("delete", "--force", self.id)
                if done.returncode != 0 and b"does not exist" not in done.stderr \
                        and b"not found" not in done.stderr:
                    problems.append(str(self._failure("delete", done.stderr)))
            except ProfilingError as e:
                problems.append(str(e))
            if self.pidns is not None:
                left = self._kill_leftovers(self.pidns)
                if left:
                    problems.append(f"processes of the container survived: {left}")
        for fd in (self.pidfd, self.output_r):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.output_r = -1
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if os.path.exists(self.tmp):
                problems.append(f"cannot remove {self.tmp}")
            self.tmp = None
        if problems:
            raise ProfilingError("; ".join(problems))

    @staticmethod
    def _kill_leftovers(pidns: tuple[int, int]) -> list[int]:
        """SIGKILL anything still in the container's PID namespace (nothing should
        be: the kernel kills the namespace when its init dies); the pids that
        would not die."""
        pids = _pids_in_pidns(pidns)
        if not pids:
            return []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        limit = time.monotonic() + _REAP_TIMEOUT
        while (pids := _pids_in_pidns(pidns)) and time.monotonic() < limit:
            time.sleep(0.05)
        return pids


def _read_some(fd: int) -> Optional[bytes]:
    """What a non-blocking pipe holds: b"" at EOF, None if nothing yet."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


def _read_all(fd: int, timeout: float = _OUTPUT_DRAIN) -> bytes:
    """What a pipe holds until EOF, or until ``timeout`` passes (a writer
    that should be gone is not)."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    limit = time.monotonic() + timeout
    while (left := limit - time.monotonic()) > 0:
        select.select([fd], [], [], left)
        chunk = _read_some(fd)
        if chunk == b"":
            break
        if chunk:
            chunks.append(chunk)
    return b"".join(chunks)


def run_profiled(rootfs: str, process: ProcessSpec,
                 options: Optional[SandboxOptions] = None) -> ProfileRun:
    """Run ``process`` in a sandbox on ``rootfs`` and record the files it reads.

    ``rootfs`` is an assembled root filesystem that may be written to (the
    workload writes where it likes); the caller creates and removes it.  The
    sandbox has its own PID, mount, IPC, UTS and (unless ``net_host``) network
    namespaces, Docker's default capabilities, no-new-privileges, memory and
    pids limits, the standard /proc, /dev, /sys mounts and the bind mounts
    asked for.  Needs root and an OCI runtime (runc, or crun).

    Returns the regular files of ``rootfs`` in first-access order, from the
    entrypoint's execve (and ld.so's) to the end.  Raises
    :class:`ProfilingError` when the runtime or fanotify fails; the
    container, its processes and its bundle are gone when this returns or
    raises, KeyboardInterrupt included."""
    options = options or SandboxOptions()
    if not process.args:
        raise ProfilingError("nothing to run: the process has no arguments")
    if not process.cwd.startswith("/"):
        raise ProfilingError(f"working directory {process.cwd!r} is not absolute")
    if not options.wait_on_signal and options.period <= 0:
        raise ProfilingError(f"period must be positive, not {options.period}")
    for m in options.mounts:
        if not m.destination.startswith("/"):
            raise ProfilingError(f"mount destination {m.destination!r} is not absolute")
        if not os.path.exists(m.source):
            raise ProfilingError(f"mount source {m.source!r} does not exist")
    runtime = find_runtime(options.runtime)
    if os.geteuid() != 0:
        raise ProfilingError("profiling a workload needs root, or the root of a user"
                             " namespace (profiler.rootless): fanotify mount marks need"
                             " CAP_SYS_ADMIN there")
    if not os.path.isdir(rootfs):
        raise ProfilingError(f"root filesystem {rootfs!r} is not a directory")
    run = _Run(rootfs, process, options, runtime)
    try:
        run.prepare()
        run.create()
        run.watch()
        result = run.profile()
    except BaseException as e:
        try:
            with _signals_deferred():
                run.cleanup()
        except Exception as cleanup_error:  # never hide the first error
            e.add_note(f"and cleaning up failed: {cleanup_error}")
        raise
    with _signals_deferred():
        run.cleanup()
    return result
