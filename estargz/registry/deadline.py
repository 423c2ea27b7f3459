"""Deadlines for registry operations: one operation (a manifest, a token, a
blob transfer with its resumes, an upload with its restarts) ends by a time
fixed when it starts, however the server paces its bytes.

A read timeout cannot promise that: it bounds each wait for the next bytes,
so a server that sends a byte a second never trips it, and one response is
many reads (its headers line by line, its body 64 KiB at a time, each filled
from as many socket reads as it takes). Two things can:

* the loops that read bodies check the clock after every piece
  (:meth:`Deadline.check`);
* a watchdog timer per operation shuts down the sockets the operation is
  using when its deadline passes, so a read blocked inside urllib3 or
  http.client (trickled headers, a dragged-out TLS handshake, a body piece
  filled a byte at a time, an upload the server does not read) returns at
  once with an error, which the caller reports as the deadline's.

The watchdog also acts on cancellation (:mod:`estargz._cancel`): Ctrl-C
cuts a blocked read within :data:`CANCEL_POLL` seconds, and the operation
raises :class:`~estargz._exceptions.Cancelled` instead of waiting for its
read timeout.

A connection learns which operation uses it from a thread-local that
:meth:`Deadline.active` sets around each request: urllib3 connects, sends and
reads the headers in the calling thread. Connections are used by one
request at a time, so a connection claimed by another operation since is
never shut down by this one's watchdog.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import requests.adapters
import urllib3.connection
import urllib3.connectionpool
import urllib3.poolmanager

from .._cancel import cancel_requested
from .._exceptions import Cancelled, EstargzError
from .errors import DeadlineExceeded

#: Longest deadline an operation gets, whatever the settings: a timer
#: cannot wait much longer than this anyway (threading.TIMEOUT_MAX).
MAX_DEADLINE = 30 * 24 * 3600.0
#: How often the watchdog looks for a cancellation request, in seconds.
CANCEL_POLL = 0.25

_current = threading.local()
#: Guards which deadline owns a connection, so a watchdog never shuts down a
#: connection another operation has just claimed.
_owners = threading.Lock()


def _seconds(value: float) -> str:
    """``5`` for 5.0, ``3.5`` for 3.5, ``68.2`` for 68.1875, ``0.05`` for
    0.05: for messages."""
    text = f"{value:.1f}" if value >= 1 else f"{value:.2g}"
    return text.rstrip("0").rstrip(".") if "." in text else text


class Deadline:
    """The time by which one registry operation must be done, and how many
    body bytes it has received so far. A context manager: the watchdog
    runs between ``__enter__`` and ``__exit__``."""

    def __init__(self, seconds: float, who: str, what: str) -> None:
        self.seconds = min(max(seconds, 0.0), MAX_DEADLINE)
        #: The server and the request in flight, for the message.
        self.who, self.what = who, what
        self.received = 0
        self.start = time.monotonic()
        self.end = self.start + self.seconds
        self._fired = False
        #: ``(connection, socket)``: the socket as the connection had it. A
        #: response that ends the connection ("Connection: close") goes on
        #: reading a socket the connection no longer holds.
        self._socks: list[tuple[Any, socket.socket]] = []
        self._done = threading.Event()

    def __enter__(self) -> Deadline:
        threading.Thread(target=self._watch, name="estargz-deadline", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        with _owners:
            self._socks.clear()

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.end - time.monotonic())

    @property
    def expired(self) -> bool:
        return self._fired or time.monotonic() >= self.end

    def note(self, who: str, what: str) -> None:
        """Record the request now in flight (named if the deadline passes)."""
        self.who, self.what = who, what

    @property
    def label(self) -> str:
        """``the 3 s deadline``, for messages."""
        return f"the {_seconds(self.seconds)} s deadline"

    def error(self) -> EstargzError:
        """What a request cut by this deadline raises: :class:`Cancelled` if
        the run is being cancelled, else :class:`DeadlineExceeded`."""
        if cancel_requested():
            return Cancelled()
        elapsed = time.monotonic() - self.start
        return DeadlineExceeded(f"{self.who}: {self.what} exceeded {self.label} "
                                f"({self.received} bytes in {elapsed:.1f} s)")

    def check(self) -> None:
        """Raise :class:`DeadlineExceeded` if the deadline has passed
        (:class:`Cancelled` if the run is being cancelled)."""
        if self.expired or cancel_requested():
            raise self.error()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Connections used in this block (by this thread) belong to this deadline."""
        previous = getattr(_current, "deadline", None)
        _current.deadline = self
        try:
            yield
        finally:
            _current.deadline = previous

    def _watch(self) -> None:
        while not self._done.wait(min(self.remaining(), CANCEL_POLL)):
            if self.remaining() <= 0 or cancel_requested():
                self._fire()
                return

    def _fire(self) -> None:
        self._fired = True
        with _owners:
            for conn, sock in self._socks:
                if getattr(conn, "_estargz_deadline", None) is not self:
                    continue  # back in the pool and taken by another operation
                # socket.socket's shutdown, not SSLSocket's: that one also
                # drops the TLS object under the reading thread.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _claim(conn: Any) -> None:
    with _owners:
        conn._estargz_deadline = getattr(_current, "deadline", None)


def _track(conn: Any) -> None:
    """Remember the connection's socket now, for the watchdog of its deadline."""
    deadline: Deadline | None = getattr(conn, "_estargz_deadline", None)
    sock = getattr(conn, "sock", None)
    if deadline is not None and sock is not None:
        with _owners:
            deadline._socks.append((conn, sock))


def _check(conn: Any) -> None:
    deadline: Deadline | None = getattr(conn, "_estargz_deadline", None)
    if deadline is not None and deadline._fired:
        # A socket timeout to urllib3, which closes the connection; the
        # registry client then reports the deadline.
        raise TimeoutError("deadline exceeded")


class _Watched:
    """Mixin for urllib3's connections: claimed by the current deadline at
    connect and at every request, and refusing to go on once it fired
    (the watchdog may have fired before the socket existed)."""

    def connect(self) -> None:
        _claim(self)
        super().connect()  # type: ignore[misc]
        _track(self)
        _check(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _claim(self)
        _track(self)  # a kept-alive connection: its socket is already there
        super().request(*args, **kwargs)  # type: ignore[misc]
        _check(self)

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        _track(self)
        _check(self)
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _watch_pools(manager: Any) -> None:
    # Only urllib3's own pools are replaced: a SOCKS proxy manager has pools
    # of its own (its connections then have the read timeout only).
    if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:
        manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


class WatchedAdapter(requests.adapters.HTTPAdapter):
    """An adapter whose connections a :class:`Deadline`'s watchdog can cut."""

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        _watch_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        _watch_pools(manager)
        return manager
