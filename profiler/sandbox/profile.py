"""Run a workload in an OCI sandbox and record the files it reads: :func:`run_profiled`.

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
import enum
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..errors import ProfilingError
from ..fanotify import Event
from ..linux import add_note, deferred_signals, signal_handlers
from ..record import Access
from .container import OUTPUT_DRAIN, Container, find_runtime, read_some
from .readiness import ReadinessProbe, check_port, parse_http_url
from .spec import STANDARD_MOUNTS, ProcessSpec, SandboxOptions


class StopReason(str, enum.Enum):
    """Why profiling ended."""

    EXITED = "exited"    # the workload exited by itself
    PERIOD = "period"    # the period ran out (timed out)
    LINE = "line"        # wait_on_line appeared in the output
    SIGNAL = "signal"    # SIGINT with wait_on_signal
    READY = "ready"      # wait_on_port or wait_on_http answered


@dataclass
class ProfileRun:
    """What :func:`run_profiled` observed."""

    #: Files of the root filesystem in first-access order, each once, by
    #: absolute path in the container (``/usr/bin/python3``) and not yet
    #: mapped to a layer (``layer`` is None).
    accesses: list[Access]
    #: The workload's exit code (negative: killed by that signal); None if it
    #: was still running when profiling ended and had to be killed.
    exit_code: int | None
    stopped_by: StopReason
    #: The kernel dropped events: the list may be incomplete.
    overflowed: bool
    #: Seconds from ``runtime start`` to the end of profiling.
    duration: float
    #: fanotify events read, before de-duplication and filtering.
    events: int = 0
    #: A readiness condition was set (wait_on_line, wait_on_port,
    #: wait_on_http) and the profile ended without it: what and why.
    not_ready: str | None = None

    @property
    def timed_out(self) -> bool:
        return self.stopped_by is StopReason.PERIOD

    @property
    def paths(self) -> list[str]:
        return [a.path for a in self.accesses]


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """For a CLI: make SIGTERM raise KeyboardInterrupt (like SIGINT) in the block,
    so that a profiling run is torn down the same way on either signal."""
    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    with signal_handlers({signal.SIGTERM: handler}):
        yield


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
    with signal_handlers({signal.SIGINT: handler}):
        yield


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
        out.append(Access(e.path, None, max(0.0, e.time - start), kind=e.kind))
    return out


class _Recorder:
    """``runtime start``, then the container's events and output until a stop
    condition: the workload exits, the period ends, a line appears, SIGINT."""

    def __init__(self, container: Container) -> None:
        assert container.watcher is not None
        self.c = container
        self.opts = container.options
        self.events: list[Event] = []
        self.splitter = _LineSplitter()
        self.stop: StopReason | None = None
        self.sel = selectors.DefaultSelector()
        self.sel.register(container.watcher.fileno(), selectors.EVENT_READ, "events")
        self.sel.register(container.output_r, selectors.EVENT_READ, "output")
        self.sel.register(container.pidfd, selectors.EVENT_READ, "exit")
        self.probe: ReadinessProbe | None = None
        if self.opts.wait_on_port is not None or self.opts.wait_on_http is not None:
            assert container.pid is not None
            self.probe = ReadinessProbe(container.pid, self.opts.wait_on_port,
                                        self.opts.wait_on_http)
            if self.opts.net_host:
                self._refuse_taken(self.probe)
            self.sel.register(self.probe.fileno(), selectors.EVENT_READ, "ready")

    def _refuse_taken(self, probe: ReadinessProbe) -> None:
        """With the host's network, another process may already serve the
        port: it would read as ready at once."""
        if probe.attempt() is None:
            probe.stop()
            self.sel.close()
            raise ProfilingError(f"{probe.what} answers before the workload started: with"
                                 " --net-host another process on the host serves it")

    def _lines(self, lines: list[str]) -> None:
        for line in lines:
            if not self.opts.quiet:
                self.c.emit(f"workload: {line}")
            if self.opts.wait_on_line is not None and self.opts.wait_on_line in line \
                    and self.stop is None:
                self.stop = StopReason.LINE

    def _ready(self, key: selectors.SelectorKey) -> None:
        if key.data == "events":
            self.events.extend(self.c.read_events())
        elif key.data == "output":
            chunk = read_some(key.fd)
            if chunk:
                self._lines(self.splitter.feed(chunk))
            elif chunk == b"":
                self.sel.unregister(key.fd)  # EOF
        elif key.data == "ready":
            self.sel.unregister(key.fd)
            assert self.probe is not None
            if self.probe.error is not None:
                raise ProfilingError(self.probe.error)
            if self.stop is None:
                self.stop = StopReason.READY
        elif key.data == "exit":
            self.c.reap(block=True)
            self.sel.unregister(self.c.pidfd)
            if self.stop is None:
                self.stop = StopReason.EXITED

    def _until_stop(self, starter: subprocess.Popen[bytes], deadline: float | None) -> None:
        sigint = _Flag()
        with (_sigint_sets(sigint) if self.opts.wait_on_signal else contextlib.nullcontext()):
            while self.stop is None:
                # Wake up often while start runs, and to notice SIGINT.
                timeout = 0.05 if starter.returncode is None or self.opts.wait_on_signal \
                    else None
                if deadline is not None:
                    left = max(0.0, deadline - time.monotonic())
                    timeout = left if timeout is None else min(timeout, left)
                for key, _ in self.sel.select(timeout):
                    self._ready(key)
                if starter.returncode is None and starter.poll() is not None \
                        and starter.returncode != 0:
                    raise self.c.failure("start", starter.communicate()[1])
                if self.stop is None and sigint.set:
                    self.stop = StopReason.SIGNAL
                if self.stop is None and deadline is not None and time.monotonic() >= deadline:
                    self.stop = StopReason.PERIOD

    def _drain(self) -> None:
        if self.stop is StopReason.EXITED:
            # Last words: the pipe reaches EOF once every process is gone.
            limit = time.monotonic() + OUTPUT_DRAIN
            while any(k.data == "output" for k in self.sel.get_map().values()) \
                    and (left := limit - time.monotonic()) > 0:
                for key, _ in self.sel.select(left):
                    self._ready(key)
        else:
            chunk = read_some(self.c.output_r)
            if chunk:
                self._lines(self.splitter.feed(chunk))
        self._lines(self.splitter.flush())

    def run(self) -> ProfileRun:
        c, opts = self.c, self.opts
        assert c.watcher is not None
        start = time.monotonic()
        deadline = None if opts.wait_on_signal else start + opts.period
        starter = subprocess.Popen(c.command("start", c.id), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)
        try:
            if self.probe is not None:
                self.probe.start()
            self._until_stop(starter, deadline)
            # Accesses up to now are queued already: read them before the kill.
            self.events.extend(c.read_events())
            end = time.monotonic()
            self._drain()
        finally:
            self.sel.close()
            if self.probe is not None:
                self.probe.stop()
            if starter.poll() is None:  # start hangs only if the runtime is broken
                starter.kill()
            starter.communicate()
        assert self.stop is not None
        excluded = [m["destination"] for m in STANDARD_MOUNTS] + \
                   [m.destination for m in opts.mounts]
        exit_code = None
        if c.exit_status is not None:  # exited by itself, not killed by us
            exit_code = os.waitstatus_to_exitcode(c.exit_status)
        return ProfileRun(accesses=accesses_from_events(self.events, start, excluded),
                          exit_code=exit_code, stopped_by=self.stop,
                          overflowed=c.watcher.overflowed, duration=end - start,
                          events=len(self.events), not_ready=self._not_ready())

    def _not_ready(self) -> str | None:
        """What a readiness condition that was not met says about it."""
        if self.stop in (StopReason.LINE, StopReason.READY, StopReason.SIGNAL):
            return None
        why = ("the workload exited" if self.stop is StopReason.EXITED
               else f"the {self.opts.period:g} s period ended")
        if self.probe is not None:
            return self.probe.not_ready(why)
        if self.opts.wait_on_line is not None:
            return f"no output line contained {self.opts.wait_on_line!r} when {why}"
        return None


def run_profiled(rootfs: str, process: ProcessSpec,
                 options: SandboxOptions | None = None) -> ProfileRun:
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
    if options.wait_on_port is not None and options.wait_on_http is not None:
        raise ProfilingError("wait for a port or for a URL, not both")
    if options.wait_on_port is not None:
        check_port(options.wait_on_port)
    if options.wait_on_http is not None:
        parse_http_url(options.wait_on_http)
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
    run = Container(rootfs, process, options, runtime)
    try:
        run.prepare()
        run.create()
        run.watch()
        result = _Recorder(run).run()
    except BaseException as e:
        try:
            with deferred_signals():
                run.cleanup()
        except Exception as cleanup_error:  # never hide the first error
            add_note(e, f"and cleaning up failed: {cleanup_error}")
        raise
    with deferred_signals():
        run.cleanup()
    return result

