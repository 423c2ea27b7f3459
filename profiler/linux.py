"""The Linux primitives the profiler shares: libc, mounts, user namespaces,
signal deferral, finding a program.

Everything here is stdlib and ctypes (the capability probe imports it from
Debian's bare ``/usr/bin/python3`` as user nobody), and each thing is done
once: every module that calls into libc gets it from :func:`libc`, every
mount and unmount goes through :func:`mount` and :func:`umount`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

# mount(2) flags (include/uapi/linux/mount.h).
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
# umount2(2) flags.
MNT_DETACH = 2
# unshare(2) flags (include/uapi/linux/sched.h).
CLONE_NEWNS = 0x0002_0000
CLONE_NEWUSER = 0x1000_0000
CLONE_NEWPID = 0x2000_0000
CLONE_NEWNET = 0x4000_0000
# prctl(2) options.
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library, loaded once, with ``use_errno`` (read the error with
    :func:`ctypes.get_errno`) and the prototypes of the calls made here."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                              ctypes.c_ulong, ctypes.c_char_p]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.unshare.argtypes = [ctypes.c_int]
        lib.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = lib
    return _libc


def _os_error(path: str | None = None) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err), path)


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    """mount(2); raises :class:`OSError` (``filename`` is ``target``)."""
    if libc().mount(os.fsencode(source) if source is not None else None, os.fsencode(target),
                    fstype.encode() if fstype else None, flags,
                    os.fsencode(data) if data else None) != 0:
        raise _os_error(target)


def umount(target: str, flags: int = 0) -> None:
    """umount2(2); raises :class:`OSError`."""
    if libc().umount2(os.fsencode(target), flags) != 0:
        raise _os_error(target)


def unshare(flags: int) -> None:
    """unshare(2); raises :class:`OSError`."""
    if libc().unshare(flags) != 0:
        raise _os_error()


def setns(fd: int, nstype: int) -> None:
    """setns(2) for the calling thread (``os.setns`` is Python 3.12+); raises
    :class:`OSError`."""
    if libc().setns(fd, nstype) != 0:
        raise _os_error()


def prctl(option: int, arg: int = 0) -> None:
    """prctl(2) with one argument; raises :class:`OSError`."""
    if libc().prctl(option, arg, 0, 0, 0) != 0:
        raise _os_error()


# --- the mount table --------------------------------------------------------------------

def _unescape(field: str) -> str:
    """Decode the octal escapes (``\\040``) of /proc/self/mountinfo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace, deepest
    first, and at one depth the last mounted first (an overlay before the
    tmpfs holding its upper layer): the order to unmount them in."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:  # in the order they were mounted
            mp = _unescape(line.split()[4])
            if mp == root or mp.startswith(root + "/"):
                found.append(mp)
    newest_first = list(dict.fromkeys(reversed(found)))
    return sorted(newest_first, key=lambda p: p.count("/"), reverse=True)


def unmount_all(path: str) -> list[str]:
    """Unmount everything at or below ``path``, detaching busy mounts;
    return what is still mounted after a few rounds."""
    for attempt in range(10):
        left = mounts_under(path)
        if not left:
            return []
        for mp in left:
            try:
                umount(mp)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    # Something still uses it (a process of the workload, an
                    # open file): detach now, the kernel frees it when unused.
                    with contextlib.suppress(OSError):
                        umount(mp, MNT_DETACH)
        time.sleep(0.02 * attempt)  # stacked mounts need a further round
    return mounts_under(path)


def filesystem_full(path: str) -> bool:
    """Whether the filesystem holding ``path`` has (all but) no room left, in
    blocks or in inodes: a writer there got ENOSPC.  "All but": less than
    1 MiB free, and less than a hundredth of it (plus a page) on a small one."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if st.f_files and st.f_favail == 0:
        return True
    return free < min(1 << 20, st.f_blocks * st.f_frsize // 100 + PAGE_SIZE)


# --- cgroups ------------------------------------------------------------------------------

def own_cgroups(pid: int | str = "self") -> list[tuple[str, list[str], str]]:
    """``(hierarchy id, controllers, path)`` for each line of
    /proc/PID/cgroup: ``("0", [], "/user.slice/...")`` is cgroup v2, the
    others v1 hierarchies (``("4", ["memory"], "/x")``); [] if unreadable."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        out.append((hid, [c for c in controllers.split(",") if c], path))
    return out


def cgroup_mounts() -> list[tuple[str, str, list[str]]]:
    """``(mount point, "cgroup" or "cgroup2", super options)`` of every cgroup
    filesystem mounted in this mount namespace (a v1 hierarchy names its
    controllers in its super options: ``rw,memory``)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            rest = fields[fields.index("-") + 1:]
            if rest[0] in ("cgroup", "cgroup2"):
                out.append((_unescape(fields[4]), rest[0], rest[2].split(",")))
    return out


# --- user namespaces ----------------------------------------------------------------------

def in_initial_user_namespace() -> bool:
    """True when this process is in the machine's own user namespace, whose
    uid_map is the identity over all ids.

    When /proc/self/uid_map cannot be read the answer is True: a kernel
    without user namespaces (CONFIG_USER_NS=n) has no such file, and there
    the initial namespace is the only one.  (The capability probe once
    answered False there, which would have taken root for the root of a
    namespace and skipped dropping to nobody.)"""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def map_to_root(uid: int, gid: int) -> None:
    """Just after ``unshare(CLONE_NEWUSER)``: make ``uid``/``gid`` (the
    caller's, outside) root inside, one id each, as an unprivileged process
    may; setgroups must be denied first for the gid_map.  Raises OSError."""
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                       ("/proc/self/gid_map", f"0 {gid} 1")):
        with open(path, "w") as f:
            f.write(text)


def unshare_error(err: int) -> str:
    """Why ``unshare(CLONE_NEWUSER)`` failed, and what to do, in one phrase."""
    if err == errno.ENOSPC:
        return ("user namespaces are disabled here (user.max_user_namespaces is 0, or its"
                " limit is reached)")
    if err == errno.EPERM:
        return ("creating a user namespace is not permitted (kernel.unprivileged_userns_clone"
                "=0, an AppArmor or SELinux policy, or a container that forbids it)")
    if err == errno.EINVAL:
        return "this kernel has no user namespaces (CONFIG_USER_NS)"
    return f"creating a user namespace failed: {os.strerror(err)}"


# --- signals ------------------------------------------------------------------------------

@contextlib.contextmanager
def signal_handlers(handlers: dict[int, Any]) -> Iterator[None]:
    """Install ``handlers`` (signal -> handler) for the block, then put back
    what was there before (main thread only, where Python runs handlers)."""
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        yield
    finally:
        for s, old in previous.items():
            # None: a handler not set from Python; the default is the best guess.
            signal.signal(s, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred_signals(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)
                     ) -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block, then deliver them.

    Tear-down (an unmount, deleting a container) must not be cut short half
    way by a Ctrl-C; each signal that arrived is re-raised once, in arrival
    order, as soon as the block ends (KeyboardInterrupt, or the default
    action of SIGTERM).  A signal the process ignores stays ignored.  Python
    runs signal handlers in the main thread only, so elsewhere this does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = {s: lambda signum, _frame: caught.append(signum)
            for s in signums if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        with signal_handlers(held):
            yield
    finally:
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` where Python has it (3.11 and later)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)


# --- programs -----------------------------------------------------------------------------

def which_sbin(name: str) -> str | None:
    """Where program ``name`` is: on PATH, else in the sbin directories,
    which an ordinary user's PATH often lacks (Debian's runc is /usr/sbin/runc)."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/local/sbin",
                            "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def package_env() -> dict[str, str]:
    """This environment, with the directory holding the ``profiler`` package
    first on PYTHONPATH: a child interpreter (``python -m
    profiler.rootless``, the overlay mount helper) imports the same code,
    however this one was started."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


#: The exit status of the procfs question's child when the kernel refuses
#: the mount with EPERM.
_PROC_REFUSED = 3


def procfs_refused() -> bool:
    """Whether the kernel refuses a new procfs to the root of our user
    namespace with EPERM (a masked /proc, as in an unprivileged container).
    Called in a new user namespace with the ids mapped (rootless profiling
    and ``estargz doctor``'s probe).  Asked by trying, in a throw-away
    PID and mount namespace: a child unshares the PID namespace, whose first
    child (its PID 1, as a procfs mount needs) mounts one in a mount
    namespace of its own.  Any other failure answers False, and the real
    mount reports it."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            unshare(CLONE_NEWPID)
            inner = os.fork()
            if inner == 0:
                status = 1
                try:
                    unshare(CLONE_NEWNS)
                    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                    status = 0
                except OSError as e:
                    status = _PROC_REFUSED if e.errno == errno.EPERM else 1
                finally:
                    os._exit(status)
            code = os.waitstatus_to_exitcode(os.waitpid(inner, 0)[1])
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == _PROC_REFUSED
