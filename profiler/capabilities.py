"""What profiling can do on this machine, for the current user, and why not.

:func:`probe` checks two modes and never raises: every failure becomes a
check that did not pass and a reason, one clear phrase each.

* ``root``: what ``estargz optimize`` run as root needs: euid 0 or
  CAP_SYS_ADMIN, ``fanotify_init`` working, overlayfs in
  ``/proc/filesystems`` and an OCI runtime (runc or crun).
* ``rootless``: what it needs run by anyone else (:mod:`profiler.rootless`): user namespaces
  allowed by the sysctls, and a real probe in a forked child that unshares a
  user and mount namespace, mounts a tmpfs, opens a fanotify group in FID
  mode (``FAN_REPORT_FID``, the only mode an unprivileged user may have),
  places a mount mark on the tmpfs, reads a file there and waits for the
  event; and an OCI runtime.  Run as root, the child first drops to user
  nobody (65534), so the answer is the one an unprivileged user would get.

Everything here is stdlib and ctypes, and takes well under a second::

    for mode in probe():
        print(mode.name, mode.supported, mode.reasons)
        for check in mode.checks:
            print("  ", check.name, check.ok, check.detail)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import select
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .fanotify import (
    AT_FDCWD,
    FAN_ACCESS,
    FAN_CLASS_NOTIF,
    FAN_CLOEXEC,
    FAN_EVENT_INFO_TYPE_FID,
    FAN_MARK_ADD,
    FAN_MARK_MOUNT,
    FAN_NONBLOCK,
    FAN_OPEN,
    FAN_REPORT_FID,
    METADATA,
    METADATA_SIZE,
    fanotify_lib,
)
from .linux import (
    CLONE_NEWNS,
    CLONE_NEWUSER,
    MNT_DETACH,
    MS_PRIVATE,
    MS_REC,
    PR_SET_DUMPABLE,
    in_initial_user_namespace,
    map_to_root,
    mount,
    prctl,
    procfs_refused,
    umount,
    unshare,
    which_sbin,
)

CAP_SYS_ADMIN = 21
NOBODY = 65534

#: How long the child probe may take before it is killed and reported stuck.
CHILD_TIMEOUT = 3.0


class Check(NamedTuple):
    """One thing checked: its name, whether it passed, and what was found."""

    name: str
    ok: bool
    detail: str


@dataclass
class Mode:
    """One profiling mode: supported or not, what is missing, what was checked."""

    name: str
    supported: bool
    reasons: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def used_by_optimize(self) -> bool:
        """Whether ``estargz optimize``, run by this user, profiles in this
        mode: ``root`` for euid 0, ``rootless`` for anyone else."""
        return self.name == ("root" if os.geteuid() == 0 else "rootless")

    def to_dict(self) -> dict[str, Any]:
        """This mode as JSON-ready data (``estargz doctor --json``)."""
        return {"name": self.name, "supported": self.supported,
                "used_by_optimize": self.used_by_optimize, "reasons": list(self.reasons),
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail}
                           for c in self.checks]}


def probe() -> list[Mode]:
    """Both modes, ``root`` first.  Never raises."""
    modes = []
    for name, fn in (("root", probe_root), ("rootless", probe_rootless)):
        try:
            modes.append(fn())
        except Exception as e:  # a bug here must not hide the other mode
            modes.append(Mode(name, False, [f"the probe failed: {e}"],
                              [Check("probe", False, f"{type(e).__name__}: {e}")]))
    return modes


# --- small readers --------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _sysctl(path: str) -> int | None:
    text = _read(path)
    try:
        return int(text.split()[0]) if text else None
    except (ValueError, IndexError):
        return None


def _has_cap_sys_admin() -> bool:
    """CAP_SYS_ADMIN in the effective set (of this process's user namespace)."""
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("CapEff:"):
            try:
                return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
            except (ValueError, IndexError):
                return False
    return False


def _fanotify_init_errno(flags: int) -> int:
    """0 if ``fanotify_init(flags)`` works (the group is closed at once), else errno."""
    try:
        lib = fanotify_lib()
    except Exception:
        return errno.ENOSYS
    fd = lib.fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC)
    if fd < 0:
        return ctypes.get_errno() or errno.EPERM
    os.close(fd)
    return 0


def _errname(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))}: {os.strerror(err)}"


# --- root -----------------------------------------------------------------------

def probe_root() -> Mode:
    checks: list[Check] = []
    reasons: list[str] = []
    euid = os.geteuid()
    cap = _has_cap_sys_admin()
    if euid == 0 or cap:
        checks.append(Check("privileges", True,
                            f"euid {euid}" + (", CAP_SYS_ADMIN" if cap else "")))
    else:
        checks.append(Check("privileges", False, f"euid {euid}, no CAP_SYS_ADMIN"))
        reasons.append(f"not root and no CAP_SYS_ADMIN (running as uid {euid})")

    err = _fanotify_init_errno(FAN_CLASS_NOTIF | FAN_CLOEXEC)
    if err == 0:
        checks.append(Check("fanotify", True, "fanotify_init(FAN_CLASS_NOTIF) works"))
    else:
        checks.append(Check("fanotify", False, f"fanotify_init(FAN_CLASS_NOTIF): {_errname(err)}"))
        if err == errno.ENOSYS:
            reasons.append("fanotify is not available (the kernel needs CONFIG_FANOTIFY=y)")
        elif err == errno.EPERM:
            reasons.append("fanotify is not permitted (needs CAP_SYS_ADMIN in the initial"
                           " user namespace)")
        else:
            reasons.append(f"fanotify_init fails ({_errname(err)})")

    filesystems = _read("/proc/filesystems")
    if filesystems is None:
        checks.append(Check("overlayfs", False, "cannot read /proc/filesystems"))
        reasons.append("cannot tell whether overlayfs is available (/proc/filesystems"
                       " unreadable)")
    elif any(line.split()[-1:] == ["overlay"] for line in filesystems.splitlines()):
        checks.append(Check("overlayfs", True, "overlay is in /proc/filesystems"))
    else:
        checks.append(Check("overlayfs", False, "overlay is not in /proc/filesystems"))
        reasons.append("overlayfs is not available (not in /proc/filesystems; try"
                       " modprobe overlay)")

    _check_runtime(checks, reasons)
    return Mode("root", not reasons, reasons, checks)


def _check_runtime(checks: list[Check], reasons: list[str]) -> None:
    found = [f"{name} ({path})" for name in ("runc", "crun")
             if (path := which_sbin(name)) is not None]
    if found:
        checks.append(Check("OCI runtime", True, ", ".join(found)))
    else:
        checks.append(Check("OCI runtime", False, "neither runc nor crun on PATH or in /usr/sbin"))
        reasons.append("no OCI runtime (runc or crun) is installed")


# --- rootless -------------------------------------------------------------------

def probe_rootless() -> Mode:
    checks: list[Check] = []
    reasons: list[str] = []
    userns_ok = True

    value = _sysctl("/proc/sys/user/max_user_namespaces")
    if value is None:
        checks.append(Check("user.max_user_namespaces", False, "not readable: no user"
                            " namespace support (CONFIG_USER_NS)?"))
        reasons.append("user namespaces are not available (no"
                       " /proc/sys/user/max_user_namespaces)")
        userns_ok = False
    elif value <= 0:
        checks.append(Check("user.max_user_namespaces", False, str(value)))
        reasons.append(f"user namespaces are disabled (sysctl user.max_user_namespaces"
                       f" = {value})")
        userns_ok = False
    else:
        checks.append(Check("user.max_user_namespaces", True, str(value)))

    for name, wanted in (("kernel.unprivileged_userns_clone", 1),
                         ("kernel.apparmor_restrict_unprivileged_userns", 0)):
        path = "/proc/sys/" + name.replace(".", "/")
        if not os.path.exists(path):
            checks.append(Check(name, True, "absent (no restriction)"))
            continue
        value = _sysctl(path)
        if value == wanted:
            checks.append(Check(name, True, str(value)))
        else:
            checks.append(Check(name, False, str(value)))
            reasons.append(f"unprivileged user namespaces are restricted (sysctl {name}"
                           f" = {value}, needs {wanted})")
            userns_ok = False

    if not userns_ok:
        checks.append(Check("namespace probe", False, "skipped: user namespaces not allowed"))
        return Mode("rootless", False, reasons, checks)

    steps, failure = _run_child_probe()
    checks.extend(steps)
    if failure:
        reasons.append(failure)
    _check_runtime(checks, reasons)
    return Mode("rootless", not reasons, reasons, checks)


#: The steps of the child probe, in order, with the reason given when one fails.
_STEP_REASONS = {
    "drop to nobody": "could not drop to user nobody to probe as an unprivileged user",
    "unshare user+mount namespace": "cannot create a user and mount namespace",
    "uid_map/gid_map": "cannot map the user into a new user namespace",
    "mount tmpfs": "cannot mount a tmpfs inside a user namespace",
    "fanotify_init(FAN_REPORT_FID)": "fanotify in FID mode is not permitted without root",
    "fanotify_mark(FAN_MARK_MOUNT)": "fanotify mount marks are refused inside a user namespace",
    "event on read": "no fanotify event arrived for a file read inside the user namespace",
}


def _run_child_probe() -> tuple[list[Check], str | None]:
    """Fork, probe in the child, collect its steps.  (checks, first failure reason)."""
    try:
        rfd, wfd = os.pipe()
    except OSError as e:
        return [Check("namespace probe", False, f"pipe: {e.strerror}")], \
            f"the namespace probe could not start ({e.strerror})"
    try:
        pid = os.fork()
    except OSError as e:
        os.close(rfd)
        os.close(wfd)
        return [Check("namespace probe", False, f"fork: {e.strerror}")], \
            f"the namespace probe could not start ({e.strerror})"
    if pid == 0:  # child: never returns
        code = 0
        try:
            os.close(rfd)
            _child(wfd)
        except BaseException as e:
            code = 1
            with contextlib.suppress(BaseException):
                os.write(wfd, (json.dumps(["namespace probe", False,
                                           f"{type(e).__name__}: {e}"]) + "\n").encode())
        finally:
            os._exit(code)

    os.close(wfd)
    data, timed_out = _collect(rfd, pid)
    return _verdict(data, timed_out)


def _collect(rfd: int, pid: int) -> tuple[bytes, bool]:
    """What the child wrote until it closed the pipe, or until
    :data:`CHILD_TIMEOUT` (it is then killed); and whether it timed out.
    Closes ``rfd`` and reaps the child."""
    data = b""
    deadline = time.monotonic() + CHILD_TIMEOUT
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([rfd], [], [], left)
            if not ready:
                continue
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(rfd)
        if timed_out:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return data, timed_out


def _verdict(data: bytes, timed_out: bool) -> tuple[list[Check], str | None]:
    """The child's steps (one JSON line each), and the first failure's reason."""
    checks: list[Check] = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            name, ok, detail = json.loads(line)
        except ValueError:
            continue
        checks.append(Check(str(name), bool(ok), str(detail)))
    for c in checks:
        if not c.ok:
            return checks, f"{_STEP_REASONS.get(c.name, c.name)} ({c.detail})"
    if timed_out:
        checks.append(Check("namespace probe", False, f"no answer in {CHILD_TIMEOUT:g} s"))
        return checks, "the namespace probe hung and was killed"
    if not checks or checks[-1].name != "event on read":
        checks.append(Check("namespace probe", False, "the probe stopped early"))
        return checks, "the namespace probe stopped early"
    return checks, None


_Report = Callable[[str, bool, str], bool]


def _child(wfd: int) -> None:
    """The probe's child: report each step as one JSON line on ``wfd``; stop at
    the first failure.  Runs single-threaded (just forked), as unshare needs."""
    def report(name: str, ok: bool, detail: str) -> bool:
        os.write(wfd, (json.dumps([name, ok, detail]) + "\n").encode())
        return ok

    # Answer for a user, not for root.
    if os.geteuid() == 0 and in_initial_user_namespace() and not _drop_to_nobody(report):
        return
    uid, gid = os.geteuid(), os.getegid()

    step = "unshare user+mount namespace"
    try:
        unshare(CLONE_NEWUSER | CLONE_NEWNS)
    except OSError as e:
        report(step, False, f"unshare(CLONE_NEWUSER|CLONE_NEWNS): {_errname(e.errno or 0)}")
        return
    report(step, True, "unshare(CLONE_NEWUSER|CLONE_NEWNS) works")

    step = "uid_map/gid_map"
    try:
        map_to_root(uid, gid)
    except OSError as e:
        report(step, False, f"{e.filename}: {e.strerror}")
        return
    report(step, True, f"uid {uid} and gid {gid} mapped to 0")
    # Not a requirement: where the kernel refuses a new procfs (a masked
    # /proc, as in an unprivileged container) the profile binds this /proc.
    if procfs_refused():
        report("/proc", True, "a new procfs is refused (masked /proc): the workload runs in "
                              "this PID namespace and sees this /proc (docs/profiling.md)")
    else:
        report("/proc", True, "a new procfs mounts: the workload gets a /proc of its own")
    _child_tmpfs(report)


def _drop_to_nobody(report: _Report) -> bool:
    try:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    except OSError as e:
        return report("drop to nobody", False, e.strerror or str(e))
    # Changing credentials made us non-dumpable, which makes /proc/self/*
    # root's: uid_map could not be written.  An ordinary user is dumpable.
    with contextlib.suppress(OSError):
        prctl(PR_SET_DUMPABLE, 1)
    return report("drop to nobody", True, f"probing as uid {NOBODY}")


def _child_tmpfs(report: _Report) -> None:
    step = "mount tmpfs"
    with contextlib.suppress(OSError):  # best effort
        mount(None, "/", None, MS_REC | MS_PRIVATE)
    target = None
    problem = "no directory for a mount point"
    for parent in dict.fromkeys([tempfile.gettempdir(), "/tmp", "/dev/shm"]):
        try:
            target = tempfile.mkdtemp(prefix="estargz-probe-", dir=parent)
            break
        except OSError as e:
            problem = f"cannot make a mount point in {parent}: {e.strerror}"
    if target is None:
        report(step, False, problem)
        return
    try:
        try:
            mount("estargz-probe", target, "tmpfs", 0, "size=64k")
        except OSError as e:
            report(step, False, f"mount -t tmpfs on {target}: {_errname(e.errno or 0)}")
            return
        report(step, True, f"tmpfs on {target}")
        try:
            _child_fanotify(report, target)
        finally:
            with contextlib.suppress(OSError):
                umount(target, MNT_DETACH)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(target)


def _child_fanotify(report: _Report, target: str) -> None:
    fan = fanotify_lib()

    def fail(name: str, what: str) -> bool:
        return report(name, False, f"{what}: {_errname(ctypes.get_errno())}")

    path = os.path.join(target, "probe")
    with open(path, "wb") as f:
        f.write(b"estargz")

    step = "fanotify_init(FAN_REPORT_FID)"
    fd = fan.fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_FID | FAN_CLOEXEC | FAN_NONBLOCK,
                           os.O_RDONLY | os.O_CLOEXEC)
    if fd < 0:
        fail(step, "fanotify_init(FAN_CLASS_NOTIF|FAN_REPORT_FID)")
        return
    try:
        report(step, True, "fanotify_init(FAN_CLASS_NOTIF|FAN_REPORT_FID) works")
        step = "fanotify_mark(FAN_MARK_MOUNT)"
        if fan.fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_OPEN | FAN_ACCESS,
                             AT_FDCWD, os.fsencode(target)) != 0:
            fail(step, "fanotify_mark(FAN_MARK_ADD|FAN_MARK_MOUNT) on the tmpfs")
            return
        report(step, True, "mount mark on the tmpfs accepted")

        step = "event on read"
        with open(path, "rb") as r:
            r.read()
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            report(step, False, "no event within 1 s")
            return
        buf = os.read(fd, 4096)
        if len(buf) < METADATA_SIZE:
            report(step, False, f"short read of {len(buf)} bytes")
            return
        event_len, _, _, metadata_len, mask, _, _ = METADATA.unpack_from(buf)
        has_fid = event_len > metadata_len and buf[metadata_len] == FAN_EVENT_INFO_TYPE_FID
        report(step, bool(has_fid), f"event mask {mask:#x}"
               + (" with a file handle" if has_fid else " without a file handle record"))
    finally:
        os.close(fd)
