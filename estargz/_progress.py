"""Byte-level progress of the long loops, for whoever wants to show it.

The library draws nothing: a caller (the CLI) installs a *sink* for the
current thread with :func:`reporting_to`, and the loops that already call
:func:`~estargz._cancel.check_cancelled` once per chunk (download, copy,
decompression, compression, upload) count their bytes on a :class:`Meter`.
A sink is per thread because layers convert in parallel threads, each with
its own display line; a loop in a thread without a sink costs one attribute
lookup per chunk.

Events are ``sink(phase, done, total)``: ``phase`` is one of
:data:`PHASES`, ``done`` the bytes done in it so far, ``total`` its size
when known (``None`` otherwise). A phase's first event has ``done == 0``
and its last ``done == total`` when the total is known; events in between
come at most every :data:`INTERVAL` seconds, so a sink may do some work.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["INTERVAL", "PHASES", "Meter", "ProgressSink", "progress_meter", "reporting_to"]

#: ``sink(phase, done, total)``.
ProgressSink = Callable[[str, int, "int | None"], None]

#: The phases, in the order a layer goes through them.
PHASES = ("fetch", "decompress", "compress", "upload")

#: Seconds between two events of one meter (its first and last excepted).
INTERVAL = 0.1

_LOCAL = threading.local()


@contextlib.contextmanager
def reporting_to(sink: ProgressSink | None) -> Iterator[None]:
    """Send this thread's progress events to ``sink`` (none: stop sending)
    until the block ends."""
    before = getattr(_LOCAL, "sink", None)
    _LOCAL.sink = sink
    try:
        yield
    finally:
        _LOCAL.sink = before


class Meter:
    """Counts one phase's bytes and tells this thread's sink, throttled."""

    __slots__ = ("_last", "_sink", "done", "phase", "total")

    def __init__(self, phase: str, total: int | None, sink: ProgressSink | None) -> None:
        self.phase = phase
        self.total = total
        self.done = 0
        self._sink = sink
        self._last = time.monotonic()
        if sink is not None:
            sink(phase, 0, total)

    def add(self, n: int) -> None:
        """Count ``n`` more bytes done."""
        self.done += n
        if self._sink is None:
            return
        now = time.monotonic()
        if now - self._last >= INTERVAL or (self.total is not None and self.done >= self.total):
            self._last = now
            self._sink(self.phase, self.done, self.total)

    def finish(self) -> None:
        """The phase is over: report its final count (unthrottled)."""
        if self._sink is not None:
            self._sink(self.phase, self.done, self.total)


def progress_meter(phase: str, total: int | None = None) -> Meter:
    """A meter for ``phase`` reporting to this thread's sink (if any)."""
    return Meter(phase, total, getattr(_LOCAL, "sink", None))
