"""One container's life, driven through the OCI runtime: :class:`Container`.

``runtime create`` (the init waits before execve), the fanotify mark on
``/proc/INIT/root``, ``runtime start`` (see :mod:`.profile`), then
``runtime kill``, ``runtime delete`` and a check that nothing of the
container is left.  Every resource is held by the object, so that
:meth:`Container.cleanup` releases what was acquired, whatever point was
reached.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import ProfilingError
from ..fanotify import Event, FidWatcher, Group, HandleTable, MarkKind, Watcher
from ..linux import (
    PR_GET_CHILD_SUBREAPER,
    PR_SET_CHILD_SUBREAPER,
    deferred_signals,
    in_initial_user_namespace,
    libc,
    prctl,
    which_sbin,
)
from .spec import ProcessSpec, SandboxOptions, build_spec
from .users import check_mapped, resolve_user

_RUNTIME_TIMEOUT = 60.0   # create, start, kill and delete each take well under a second
_REAP_TIMEOUT = 10.0      # for the init to die after SIGKILL
#: Seconds for the last output after the workload exited.
OUTPUT_DRAIN = 2.0
#: Each container's directory names its runtime in this file.
_RUNTIME_FILE = "runtime"
_ID_PREFIX = "estargz-profile-"


def find_runtime(runtime: str) -> str:
    """The OCI runtime's executable: a path, or a name looked up on PATH."""
    if os.sep in runtime:
        if os.access(runtime, os.X_OK) and os.path.isfile(runtime):
            return runtime
        raise ProfilingError(f"OCI runtime {runtime!r} is not an executable file")
    found = which_sbin(runtime)
    if found is None:
        raise ProfilingError(f"OCI runtime {runtime!r} not found on PATH: install it"
                             f" (Debian: apt-get install {runtime}) or give its path")
    return found


@contextlib.contextmanager
def _subreaper() -> Iterator[None]:
    """Make this process a child subreaper for the duration of the block.

    ``runtime create`` forks the container's init and exits; the orphaned init
    is then re-parented to the nearest subreaper, i.e. us, so that we can
    wait for it and learn the workload's exit status (what containerd's shim
    does).  Only for the create call, so that other orphans of the caller's
    process tree are not adopted for long."""
    old = ctypes.c_int(0)
    libc().prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(old), 0, 0, 0)
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError as e:
        raise ProfilingError(f"prctl(PR_SET_CHILD_SUBREAPER): {e.strerror}") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            prctl(PR_SET_CHILD_SUBREAPER, old.value)


def _ns_id(pid: int, ns: str) -> tuple[int, int] | None:
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


class Container:
    """One container's life: holds every resource so that :meth:`cleanup` can
    release what was acquired, whatever point was reached."""

    def __init__(self, rootfs: str, process: ProcessSpec, options: SandboxOptions,
                 runtime: str) -> None:
        self.rootfs = rootfs
        self.process = process
        self.options = options
        self.runtime = runtime
        self.runtime_name = os.path.basename(runtime)
        self.id = f"{_ID_PREFIX}{secrets.token_hex(6)}"
        self.tmp: str | None = None
        self.pid: int | None = None           # the container's init, on the host
        self.pidns: tuple[int, int] | None = None
        self.is_child = False                    # init was adopted: we can wait for it
        self.exit_status: int | None = None
        self.created = False
        self.watcher: Group[Any] | None = None
        # Root of a user namespace (profiler.rootless): FID-mode fanotify,
        # whose events name files by handle, through this table of the rootfs.
        self.rootless = not in_initial_user_namespace()
        self.table: HandleTable | None = None
        self.pidfd = -1
        self.output_r = -1                       # the workload's stdout and stderr
        self.emit: Callable[[str], None] = (
            options.output or (lambda line: print(line, file=sys.stderr, flush=True)))

    # -- runtime commands --

    def command(self, *args: str) -> list[str]:
        assert self.tmp is not None
        return [self.runtime, "--root", os.path.join(self.tmp, "state"),
                "--log", os.path.join(self.tmp, "runtime.log"), *args]

    def _runtime(self, *args: str, **popen: Any) -> subprocess.CompletedProcess[bytes]:
        """Run a runtime command to completion (callers defer signals around the
        ones that must not be cut short: create, kill, delete)."""
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        try:
            # Own session: a terminal's Ctrl-C reaches us, not the runtime; we
            # tear the container down ourselves.
            done: subprocess.CompletedProcess[bytes] = subprocess.run(
                self.command(*args), stdin=subprocess.DEVNULL, start_new_session=True,
                timeout=_RUNTIME_TIMEOUT, check=False, **popen)
        except subprocess.TimeoutExpired:
            raise ProfilingError(f"{self.runtime_name} {args[0]} did not finish in"
                                 f" {_RUNTIME_TIMEOUT:.0f} s") from None
        return done

    def failure(self, what: str, stderr: bytes) -> ProfilingError:
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
        with deferred_signals():
            os.mkdir(tmp, 0o700)
            self.tmp = tmp
        # For remove_stale_containers, should we be killed: which runtime
        # holds the state in tmp/state.
        with open(os.path.join(self.tmp, _RUNTIME_FILE), "w") as f:
            f.write(self.runtime)
        bundle = os.path.join(self.tmp, "bundle")
        os.mkdir(bundle)
        user = resolve_user(self.rootfs, self.process.user)
        if self.rootless:
            check_mapped(user)
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
        with deferred_signals():
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
            raise self.failure("create", _read_all(self.output_r))
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

    def read_events(self) -> list[Event]:
        """Queued events as :class:`Event`, whatever the group's mode."""
        assert self.watcher is not None
        batch = self.watcher.read_events()
        if not self.rootless:
            return batch
        # FID events carry paths relative to the rootfs, which is the
        # container's "/".
        return [Event(None if e.path is None else "/" if e.path == "." else "/" + e.path,
                      e.mask, e.pid, e.time, regular=e.regular) for e in batch]

    def reap(self, block: bool) -> bool:
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
                while not self.reap(block=False) and time.monotonic() < limit:
                    time.sleep(0.01)
            try:
                done = self._runtime("delete", "--force", self.id)
                if done.returncode != 0 and b"does not exist" not in done.stderr \
                        and b"not found" not in done.stderr:
                    problems.append(str(self.failure("delete", done.stderr)))
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


def remove_stale_containers(workdir: str) -> list[str]:
    """Delete the containers a killed profiler left in ``workdir`` (the
    ``workdir`` of its :class:`SandboxOptions`); what could not be deleted.

    Each :class:`Container` directory there names its runtime and holds the
    runtime's state; ``runtime delete --force`` kills what is left of the
    container (nothing, when it ran in a PID namespace that died with the
    profiler) and removes its cgroups and state, as it does at the end of
    every run.  Without root there is nothing to do: a rootless container
    has no cgroups, and its processes died with the user namespace."""
    if os.geteuid() != 0:
        return []
    problems = []
    for name in sorted(os.listdir(workdir)):
        tmp = os.path.join(workdir, name)
        state = os.path.join(tmp, "state")
        if not name.startswith(_ID_PREFIX) or not os.path.isdir(os.path.join(state, name)):
            continue
        try:
            try:
                with open(os.path.join(tmp, _RUNTIME_FILE)) as f:
                    runtime = f.read().strip()
            except FileNotFoundError:  # left by an estargz that did not record it
                runtime = which_sbin("runc") or "runc"
            done = subprocess.run([runtime, "--root", state, "delete", "--force", name],
                                  stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=_RUNTIME_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            problems.append(f"cannot delete container {name} in {workdir}: {e}")
            continue
        if done.returncode != 0 and b"does not exist" not in done.stderr:
            problems.append(f"cannot delete container {name} in {workdir}: "
                            + _tail(done.stderr.decode("utf-8", "replace"), 300))
    return problems


def read_some(fd: int) -> bytes | None:
    """What a non-blocking pipe holds: b"" at EOF, None if nothing yet."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


def _read_all(fd: int, timeout: float = OUTPUT_DRAIN) -> bytes:
    """What a pipe holds until EOF, or until ``timeout`` passes (a writer
    that should be gone is not)."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    limit = time.monotonic() + timeout
    while (left := limit - time.monotonic()) > 0:
        select.select([fd], [], [], left)
        chunk = read_some(fd)
        if chunk == b"":
            break
        if chunk:
            chunks.append(chunk)
    return b"".join(chunks)
