"""A server's readiness, seen from outside: :class:`ReadinessProbe`.

Most images in pipelines are servers: they never exit, and what they read
before they serve is what start-up needs.  ``wait_on_port`` ends the profile
once the workload accepts TCP connections on a port, ``wait_on_http`` once an
HTTP GET of a URL answers 2xx.

Where the probe connects from: the sandbox has a network namespace of its own
(only ``lo``) unless ``net_host``, so ``127.0.0.1:PORT`` on the host is not
the workload's.  The probe runs in a thread that first enters the
container's network namespace with ``setns(CLONE_NEWNET)`` on
``/proc/INIT/ns/net``; sockets belong to the namespace of the thread that
creates them, so every attempt is a real connection, made where a client in
the pod would make it.  That works for both modes: as root, and rootless,
where the container's namespace belongs to our user namespace, in which the
profiler is root.  ``setns`` of a network namespace is per thread
(setns(2) refuses a multithreaded caller only for mount and user
namespaces), so the rest of the process stays in its own namespace.  Polling
``/proc/INIT/net/tcp`` for a LISTEN socket would need no privilege, but it
can say nothing about HTTP, and a listening socket is not yet an answering
server; one mechanism serves both conditions.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import ProfilingError
from ..linux import CLONE_NEWNET, setns

#: Seconds between attempts: a refused loopback connection costs microseconds,
#: and a server that becomes ready is noticed within this.
INTERVAL = 0.02
#: Longest wait of one attempt (connect, or the HTTP answer).
ATTEMPT_TIMEOUT = 1.0
_JOIN_TIMEOUT = ATTEMPT_TIMEOUT + 1.0


def check_port(port: int) -> int:
    """``port`` if it is a TCP port (1-65535), else :class:`ProfilingError`."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ProfilingError(f"{port!r} is not a TCP port (1-65535)")
    return port


@dataclass(frozen=True)
class HttpTarget:
    """What ``wait_on_http`` asks for, parsed."""

    url: str
    host: str
    port: int
    path: str


def parse_http_url(url: str) -> HttpTarget:
    """``http://HOST[:PORT][/PATH][?QUERY]``; :class:`ProfilingError` for
    anything else (https is not probed: the sandbox's servers are reached on
    loopback, where a certificate would have to be trusted blindly)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ProfilingError(f"{url!r} is not a valid URL: {e}") from None
    if parts.scheme != "http":
        raise ProfilingError(f"{url!r} is not an http:// URL")
    if not parts.hostname:
        raise ProfilingError(f"{url!r} names no host")
    if parts.username is not None or parts.fragment:
        raise ProfilingError(f"{url!r}: credentials and fragments are not supported")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return HttpTarget(url, parts.hostname, check_port(80 if port is None else port), path)


def _net_ns(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class ReadinessProbe:
    """Polls a port or a URL from the container's network namespace, in a
    thread, until it answers; then :attr:`ready` is set and :meth:`fileno`
    becomes readable (for the recording loop's selector)."""

    def __init__(self, pid: int, port: int | None = None, url: str | None = None) -> None:
        if (port is None) == (url is None):
            raise ValueError("give exactly one of port and url")
        self.pid = pid
        self.port = None if port is None else check_port(port)
        self.target = None if url is None else parse_http_url(url)
        #: What is waited for, for messages: "port 8080", "http://…".
        self.what = f"port {self.port}" if self.target is None else self.target.url
        self.ready = False
        #: Why the last attempt failed ("connection refused", "HTTP 503 …").
        self.last: str | None = None
        #: Set when the probe could not run at all.
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def fileno(self) -> int:
        return self._r

    def attempt(self) -> str | None:
        """One attempt from the calling thread's namespace: None if it
        answered, else why not."""
        if self.target is None:
            assert self.port is not None
            return _connect(self.port)
        return _get(self.target)

    def start(self) -> None:
        """Start polling (call once the container's init exists)."""
        self._thread = threading.Thread(target=self._poll, name="estargz-readiness",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and release the thread and the pipe."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT)
            self._thread = None
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._r = self._w = -1

    def not_ready(self, why: str) -> str:
        """A note for a profile that ended (``why``) before readiness."""
        last = f" (last attempt: {self.last})" if self.last else ""
        return f"{self.what} was not ready when {why}{last}"

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._w, b"!")

    def _poll(self) -> None:
        theirs = f"/proc/{self.pid}/ns/net"
        try:
            if _net_ns(theirs) != _net_ns("/proc/thread-self/ns/net"):
                fd = os.open(theirs, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    setns(fd, CLONE_NEWNET)  # this thread only
                finally:
                    os.close(fd)
        except OSError as e:
            self.error = (f"cannot enter the sandbox's network namespace to probe "
                          f"{self.what}: {e.strerror or e}")
            self._wake()
            return
        while not self._stop.is_set():
            outcome = self.attempt()
            if outcome is None:
                self.ready = True
                self._wake()
                return
            self.last = outcome
            self._stop.wait(INTERVAL)


def _connect(port: int) -> str | None:
    """Connect to ``port`` on IPv4 and IPv6 loopback; None if either accepts."""
    first: str | None = None
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(ATTEMPT_TIMEOUT)
                s.connect((host, port))
                return None
        except OSError as e:
            first = first or (e.strerror or str(e)).lower()
    return first


def _get(target: HttpTarget) -> str | None:
    """GET the URL; None on a 2xx answer, else why not."""
    conn = http.client.HTTPConnection(target.host, target.port, timeout=ATTEMPT_TIMEOUT)
    try:
        conn.request("GET", target.path, headers={"User-Agent": "estargz-readiness"})
        resp = conn.getresponse()
        resp.read(64 << 10)
        if 200 <= resp.status < 300:
            return None
        return f"HTTP {resp.status} {resp.reason}".strip()
    except (OSError, http.client.HTTPException) as e:
        return (getattr(e, "strerror", None) or str(e) or type(e).__name__).lower()
    finally:
        conn.close()
