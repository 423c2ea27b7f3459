"""A bandwidth- and latency-shaping reverse proxy in front of a registry.

:class:`ShapingProxy` listens on 127.0.0.1 and forwards every request to an
upstream ``HOST:PORT`` (Debian's ``docker-registry``, see
:func:`services.running_registry`), so that a client pulling through it sees
a slower network:

* ``latency``: seconds added once per request, before it is forwarded (one
  round trip of a distant registry; a lazy puller pays it per range request);
* ``bandwidth``: bits per second for all response bodies together, from one
  shared token bucket, so parallel downloads share the link as they would.

It streams bodies (never holds a blob in memory), passes ``Range`` and every
other end-to-end header both ways, and logs every request with its start and
end time and the body bytes sent, plus a time series of bytes sent, so a
benchmark can tell how many bytes went out before a moment (``bytes_until``)
and in total.

Importable outside a test run (the start-up benchmark uses it); the server
around the handler is ``services.LoopbackProxy``, shared with the tests'
``FaultProxy``.
"""

from __future__ import annotations

import bisect
import contextlib
import http.client
import http.server
import socket
import threading
import time
from dataclasses import dataclass

from services import LoopbackProxy, ProxyHandler

__all__ = ["ShapingProxy", "TokenBucket", "Request"]

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
               "te", "trailers", "transfer-encoding", "upgrade"}
# Small enough that the bucket paces smoothly at 20 Mbit/s (16 KiB = 6.5 ms).
_CHUNK = 16 << 10


class TokenBucket:
    """Paces byte counts to ``rate`` bytes/s, shared by all threads.

    A virtual clock: each :meth:`consume` reserves the next slot of the link
    and sleeps until its bytes would have gone out, allowing a burst of
    ``burst`` bytes when the link was idle."""

    def __init__(self, rate: float, burst: int = 4 * _CHUNK) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst
        self._free_at = 0.0  # monotonic time at which the link is idle again
        self._lock = threading.Lock()

    def consume(self, n: int) -> None:
        """Block until ``n`` bytes may be sent."""
        with self._lock:
            now = time.monotonic()
            start = max(self._free_at, now - self.burst / self.rate)
            self._free_at = start + n / self.rate
            due = self._free_at - self.burst / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


@dataclass
class Request:
    """One request the proxy forwarded."""

    method: str
    path: str
    #: The request's Range header, if any.
    range: str | None
    status: int
    #: Response body bytes sent to the client.
    sent: int
    #: time.monotonic() when the request arrived and when its answer was sent.
    start: float
    end: float


class ShapingProxy(LoopbackProxy):
    """A shaping reverse proxy; see the module docstring.

    ``bandwidth`` is in bits/s (None: unlimited), ``latency`` in seconds.
    Use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(self, upstream: str, *, bandwidth: float | None = None,
                 latency: float = 0.0, max_threads: int = 64) -> None:
        self.upstream = upstream
        self.bandwidth = bandwidth
        self.latency = latency
        self.bucket = TokenBucket(bandwidth / 8) if bandwidth else None
        self.log: list[Request] = []
        # (monotonic time, cumulative body bytes sent), appended per chunk.
        self._times: list[float] = []
        self._totals: list[int] = []
        self._total = 0
        self._lock = threading.Lock()
        # Snapshotters open many connections at once during a pull.
        super().__init__(_Handler, max_threads, request_queue_size=128)

    # --- accounting ---------------------------------------------------------

    def reset(self) -> None:
        """Forget the log and the byte counts (between runs)."""
        with self._lock:
            self.log.clear()
            self._times.clear()
            self._totals.clear()
            self._total = 0

    @property
    def total_bytes(self) -> int:
        """Body bytes sent since the last :meth:`reset`."""
        with self._lock:
            return self._total

    def bytes_until(self, t: float) -> int:
        """Body bytes sent up to monotonic time ``t``."""
        with self._lock:
            i = bisect.bisect_right(self._times, t)
            return self._totals[i - 1] if i else 0

    def requests(self, method: str | None = None, contains: str = "",
                 until: float | None = None) -> list[Request]:
        """Logged requests (method, substring of the path, started by ``until``)."""
        with self._lock:
            return [r for r in self.log
                    if (method is None or r.method == method) and contains in r.path
                    and (until is None or r.start <= until)]

    def _sent(self, n: int) -> None:
        with self._lock:
            self._total += n
            self._times.append(time.monotonic())
            self._totals.append(self._total)

    def _record(self, r: Request) -> None:
        with self._lock:
            self.log.append(r)


class _Handler(ProxyHandler):
    timeout = 120
    proxy: ShapingProxy

    def _handle(self) -> None:
        proxy, method = self.proxy, self.command
        start = time.monotonic()
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.send_error(411, "chunked requests are not supported by this proxy")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if proxy.latency:
            time.sleep(proxy.latency)
        host, _, port = proxy.upstream.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        sent = 0
        status = 502
        try:
            conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            if body or method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            up = conn.getresponse()
            status = up.status
            self.send_response(up.status, up.reason)
            chunked = False
            for name, value in up.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            if method != "HEAD" and up.getheader("Content-Length") is None:
                # Unknown length: end the body by closing the connection.
                chunked = True
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if method != "HEAD":
                while True:
                    data = up.read(_CHUNK)
                    if not data:
                        break
                    if proxy.bucket is not None:
                        proxy.bucket.consume(len(data))
                    self.wfile.write(data)
                    sent += len(data)
                    proxy._sent(len(data))
            if chunked:
                self.wfile.flush()
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
        finally:
            conn.close()
            proxy._record(Request(method, self.path, self.headers.get("Range"), status,
                                  sent, start, time.monotonic()))

