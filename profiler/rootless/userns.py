"""Run a function in a mount and PID namespace of its own: as root of a new
user namespace for rootless profiling (:func:`call_in_userns`), or, as
root, only in new mount and PID namespaces (:func:`call_in_namespaces` with
``user_namespace=False``), so that the overlay and the container die with us.

:func:`call_in_namespaces` starts a fresh interpreter (``python -m
profiler.rootless``, whose ``__main__`` runs :func:`helper_main`), because
``unshare(CLONE_NEWUSER)`` is refused to a process with more than one
thread, and the caller (a CLI with worker threads, a test runner) may have
several.  The helper then::

    unshare(USER | MOUNT)         uid 0 inside = the caller's uid outside, gid
                                  likewise (one id each; setgroups denied,
                                  which the kernel requires for an
                                  unprivileged gid_map)
    may we mount a new procfs?    asked once, of the kernel (see below)
    unshare(PID)                  if so
    fork                          the child is PID 1 of the new PID namespace
      mount --make-rprivate /     nothing we mount leaks out, or in
      mount proc /proc            pids in /proc are this namespace's, as the
                                  runtime's pid file gives them
      fn(*args)                   messages (output lines) and the result or
                                  the error go back over a pipe

Without the user namespace (as root) the same, minus ``CLONE_NEWUSER``, the
id maps and the question (root of the initial user namespace may always
mount a procfs).

Masked /proc (a container's, Docker's default): the kernel lets the root of
a user namespace mount a new procfs only where a procfs is already mounted
*fully visible*, with no locked mount covering any of its files
(``mount_too_revealing()`` in fs/namespace.c, EPERM).  Docker covers
``/proc/kcore``, ``/proc/keys``, ``/proc/acpi``... and makes ``/proc/sys``
read-only, and `docker run --security-opt systempaths=unconfined` (which
GitLab's Docker executor cannot give) is what lifts that.  There the helper
keeps the caller's PID namespace and its /proc, already mounted in the copied
mount namespace, masks included: a PID namespace of our own is useless
without a procfs of its own, because the runtime (runc) finds its
container's init as ``/proc/PID`` with the pid it forked, which must be a
pid of the namespace the procfs shows.  The container still gets its own
PID namespace from the runtime, and a recursive bind of this /proc instead
of a new procfs (:attr:`profiler.sandbox.SandboxOptions.bind_proc`, set by
the job from :func:`proc_is_shared`).  What differs then:

* the workload's /proc is the caller's PID namespace's: it lists the
  processes of the CI job (the shell, estargz, the runtime) besides its own,
  and reads what anyone may (``cmdline``, ``stat``, ``status``).  Not their
  ``environ``, memory, descriptors or root, although it runs as the same
  uid: the kernel's ptrace access check (``cap_ptrace_access_check()``)
  refuses a process in a child user namespace access to one in a parent
  (estargz, the job), and to one holding capabilities it lacks (this
  helper and runc, root of our user namespace with every capability).
  Docker's masks stay (the copied mounts are locked to the user namespace,
  and the workload has no CAP_SYS_ADMIN to unmount them), ``/proc/sys``
  stays read-only;
* the kernel's kill of everything in the namespace when its PID 1 dies is
  lost: if estargz is killed with SIGKILL, the container's init (PID 1 of its
  own namespace, so the workload dies with it) can outlive it, until the
  CI job's container ends.  Every other way out kills and deletes the
  container as usual.

Why a PID namespace of our own: when its PID 1 exits, the kernel kills
every process left in it, whatever happened (SIGKILL of the helper
included, through PR_SET_PDEATHSIG), and the mount namespace goes with the
last of them: the tmpfs holding the image, the overlay and the container's
mounts disappear.  The container's own PID namespace is nested in ours, so
its processes are killed too, although the runtime, not we, forked its init.
What the kernel does not remove (the runtime's state directory, an emptied
cgroup) is on disk, in the caller's work directory, for the next run to
sweep (:mod:`profiler.workdir`).

Signals: the helper runs in a session of its own, so a terminal's Ctrl-C
reaches only the caller, which forwards SIGINT (for SIGTERM too: a PID 1
ignores signals it has no handler for) and waits for the helper to finish
tearing down.  ``fn`` sees KeyboardInterrupt as it would in the caller.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from estargz import EstargzError

from ..errors import ProfilingError
from ..linux import (
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
    PR_SET_PDEATHSIG,
    map_to_root,
    mount,
    package_env,
    prctl,
    procfs_refused,
    signal_handlers,
    unshare,
    unshare_error,
)

#: After forwarding SIGINT, how long the helper may take to tear down before
#: it is killed (which still leaves nothing running: see the module docstring).
TEARDOWN_TIMEOUT = 60.0

_LENGTH = struct.Struct("=Q")


# --- the caller's side ----------------------------------------------------------

def call_in_userns(fn: Callable[..., Any], *args: Any,
                   on_message: Callable[[Any], None] | None = None,
                   cgroups: Sequence[str] = ()) -> Any:
    """Call ``fn(*args)`` as root of a new user, mount and PID namespace
    (:func:`call_in_namespaces`)."""
    return call_in_namespaces(fn, *args, on_message=on_message, cgroups=cgroups)


def call_in_namespaces(fn: Callable[..., Any], *args: Any,
                       on_message: Callable[[Any], None] | None = None,
                       user_namespace: bool = True, cgroups: Sequence[str] = ()) -> Any:
    """Call ``fn(*args)`` in a helper process, as PID 1 of a new PID namespace
    with a private mount namespace, and as root of a new user namespace
    unless ``user_namespace`` is False (the caller is root).  (In the user
    namespace, where /proc is masked, in the caller's PID namespace: see the
    module docstring and :func:`proc_is_shared`.)  The helper
    dies with this process (PR_SET_PDEATHSIG), and everything in its
    namespaces with it.  (PDEATHSIG fires when the *thread* that started
    the helper ends: that is the calling thread, which waits here until
    the helper is gone, so it cannot end first.)

    ``fn`` must be a module-level function, and its arguments and result
    picklable.  In the namespace, ``send_message(obj)`` passes ``obj`` to
    ``on_message`` here, as it happens.  An :class:`~estargz.EstargzError`
    raised by ``fn`` is raised here with the same class and message; a
    KeyboardInterrupt there (ours forwarded as SIGINT) is one here.
    ``cgroups``: cgroup directories the helper is moved into before it
    starts the job (each hierarchy's limits then bound all it runs).
    Raises :class:`ProfilingError` when the namespaces cannot be created
    or the helper cannot join ``cgroups``.
    """
    # Over 60 lines: the whole conversation with the helper process (start
    # it, move it into the cgroups, send the job, relay its messages, reap
    # it on every path, Ctrl-C included) reads best as one sequence.
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "profiler.rootless", str(w),
             *([] if user_namespace else ["--no-user-namespace"])],
            stdin=subprocess.PIPE, pass_fds=(w,), start_new_session=True,
            env=package_env())
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    os.close(w)
    try:
        # It waits for its job on stdin: it has started nothing yet.
        for d in cgroups:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(proc.pid))
    except OSError as e:
        proc.kill()
        proc.wait()
        os.close(r)
        raise ProfilingError(f"cannot move the profiler into cgroup {e.filename}:"
                             f" {e.strerror}") from None
    interrupted = False

    def forward(_signum: int = signal.SIGINT, _frame: object = None) -> None:
        nonlocal interrupted
        interrupted = True
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)

    outcome: tuple[Any, ...] | None = None
    try:
        with _forwarding(forward), os.fdopen(r, "rb") as pipe:
            assert proc.stdin is not None
            try:
                pickle.dump((fn, args), proc.stdin)
                proc.stdin.close()
            except BrokenPipeError:
                pass  # it failed before reading: its message says why
            while True:
                try:
                    msg = _read_message(pipe)
                except KeyboardInterrupt:  # not the main thread: no handler
                    forward()
                    continue
                if msg is None:
                    break
                if msg[0] == "message":
                    if on_message is not None:
                        on_message(msg[1])
                else:
                    outcome = msg
            _wait(proc)
    except BaseException:
        if proc.poll() is None:
            forward()
            _wait(proc)
        raise
    return _result(outcome, proc.returncode, interrupted)


def _result(outcome: tuple[Any, ...] | None, code: int | None, interrupted: bool) -> Any:
    """What the helper's last message means for the caller: its result, or
    the error (or KeyboardInterrupt) to raise."""
    if outcome is None:
        if interrupted:
            raise KeyboardInterrupt
        raise ProfilingError(f"the namespace helper died ({_describe(code)}) "
                             "without a result")
    kind = outcome[0]
    if kind == "result":
        return outcome[1]
    if kind == "error":  # even after Ctrl-C: a failed tear-down must be heard
        raise _rebuild(outcome[1], outcome[2], outcome[3])
    if kind == "interrupted":
        raise KeyboardInterrupt
    raise ProfilingError(f"the namespace helper sent {kind!r}")  # pragma: no cover


@contextlib.contextmanager
def _forwarding(forward: Callable[..., None]) -> Iterator[None]:
    """SIGINT and SIGTERM forward to the helper while it runs (main thread
    only; elsewhere KeyboardInterrupt is caught and forwarded)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with signal_handlers({signal.SIGINT: forward, signal.SIGTERM: forward}):
        yield


def _wait(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(TEARDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        # Its PID 1 dies with it (PDEATHSIG), and every process in the
        # namespace with that.
        proc.kill()
        proc.wait()


def _describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _rebuild(module: str, name: str, message: str) -> BaseException:
    """The exception the helper raised, as the same class when it is ours."""
    if module.split(".")[0] in ("estargz", "profiler"):
        mod = sys.modules.get(module)
        if mod is None:
            with contextlib.suppress(ImportError):
                mod = importlib.import_module(module)
        cls = getattr(mod, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            exc = cls.__new__(cls)
            Exception.__init__(exc, message)
            return exc
    return ProfilingError(message)


def _read_message(pipe: Any) -> tuple[Any, ...] | None:
    head = pipe.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (n,) = _LENGTH.unpack(head)
    body = pipe.read(n)
    if len(body) < n:
        return None
    msg: tuple[Any, ...] = pickle.loads(body)
    return msg


# --- the helper's side ------------------------------------------------------------

_out_fd = -1
_proc_shared = False


def send_message(obj: Any) -> None:
    """From ``fn`` in the namespace: hand ``obj`` to the caller's ``on_message``."""
    _send(("message", obj))


def proc_is_shared() -> bool:
    """From ``fn`` in the namespace: True when the kernel refused a new procfs
    (masked /proc) and ``fn`` runs in the caller's PID namespace with the
    caller's /proc; a container must then bind that /proc instead of
    mounting a new one (see the module docstring)."""
    return _proc_shared


def _send(msg: tuple[Any, ...]) -> None:
    data = pickle.dumps(msg)
    view = memoryview(_LENGTH.pack(len(data)) + data)
    while view:
        view = view[os.write(_out_fd, view):]


def _enter(user_namespace: bool) -> bool:
    """unshare and write the id maps (one id each, as an unprivileged process
    may); whether the next fork is PID 1 of a new PID namespace (False: the
    kernel refuses a new procfs, see the module docstring)."""
    uid, gid = os.getuid(), os.getgid()
    if not user_namespace:
        try:
            unshare(CLONE_NEWNS | CLONE_NEWPID)
        except OSError as e:
            raise ProfilingError(f"cannot create a mount and PID namespace: {e.strerror}"
                                 ) from None
        return True
    try:
        unshare(CLONE_NEWUSER | CLONE_NEWNS)
    except OSError as e:
        raise ProfilingError(unshare_error(e.errno or 0)) from None
    try:
        map_to_root(uid, gid)
    except OSError as e:
        raise ProfilingError(f"cannot map ids in the new user namespace: {e.strerror}") from None
    if procfs_refused():
        return False
    try:
        unshare(CLONE_NEWPID)  # owned by the user namespace, as if unshared with it
    except OSError as e:
        raise ProfilingError(f"cannot create a PID namespace: {e.strerror}") from None
    return True


def _init(fn: Callable[..., Any], args: tuple[Any, ...], own_pidns: bool) -> int:
    """PID 1 of the namespace (or, with ``own_pidns`` False, a process of the
    caller's PID namespace): set up the mounts, run ``fn``, report."""
    global _proc_shared
    _proc_shared = not own_pidns

    def term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, term)  # PID 1 ignores signals without a handler
    try:
        try:
            mount("none", "/", None, MS_REC | MS_PRIVATE)
            if own_pidns:
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            # else the copied /proc, masks included, is this PID namespace's
            # already: nothing to mount (a bind of it onto itself would change
            # nothing).
        except OSError as e:
            raise ProfilingError(f"cannot set up the mount namespace: {e.strerror}"
                                 f" ({e.filename})") from None
        result = fn(*args)
    except KeyboardInterrupt:
        _send(("interrupted",))
        return 130
    except Exception as e:
        if isinstance(e, EstargzError):
            _send(("error", type(e).__module__, type(e).__name__, str(e)))
            return 1
        _send(("error", "builtins", "RuntimeError",
               "unexpected error in the namespace helper:\n" + traceback.format_exc()))
        return 1
    _send(("result", result))
    return 0


def helper_main(argv: list[str]) -> int:
    """The helper process (``python -m profiler.rootless FD
    [--no-user-namespace]``): read the job on stdin, enter the namespaces,
    run it as PID 1 of the new PID namespace, send the outcome on
    descriptor FD."""
    global _out_fd
    _out_fd = int(argv[0])
    parent = os.getppid()
    # The caller's death must not leave us (and through us, the workload) running.
    with contextlib.suppress(OSError):
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the caller forwards them...
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        try:
            fn, args = pickle.load(sys.stdin.buffer)
        except Exception as e:  # a caller's bug: fn must be importable by name
            raise ProfilingError(f"the namespace helper cannot load its job: {e}") from None
        own_pidns = _enter("--no-user-namespace" not in argv[1:])
    except ProfilingError as e:
        _send(("error", type(e).__module__, type(e).__name__, str(e)))
        return 1
    # PID 1 cannot tell its parent died by getppid() (0 from inside the
    # namespace, whoever the parent is): an end of this pipe we hold says it.
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(alive_w)
            with contextlib.suppress(OSError):
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            # EOF: the helper died before PDEATHSIG was set, nobody waits for us.
            if select.select([alive_r], [], [], 0)[0] and os.read(alive_r, 1) == b"":
                os._exit(1)
            os.close(alive_r)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            code = _init(fn, args, own_pidns)
        finally:
            os._exit(code)
    os.close(alive_r)

    def relay(_signum: int, _frame: object) -> None:  # ...to PID 1, as SIGINT
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
    signal.signal(signal.SIGINT, relay)
    signal.signal(signal.SIGTERM, relay)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            return 1
    os.close(_out_fd)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1
