"""Process-wide, cooperative cancellation: how Ctrl-C stops work promptly.

Python delivers signals to the main thread only, and only between bytecodes,
while most of a conversion runs in worker threads (layers in parallel, chunks
compressed in parallel) or waits in C (zlib, reads, sockets). So a signal
alone would stop nothing but the main thread's wait, and the workers would
finish the image before anyone noticed. Instead:

* :func:`interrupt_on_signals` (the CLI's one signal guard) turns the first
  SIGINT or SIGTERM into :func:`request_cancel` plus ``KeyboardInterrupt`` in
  the main thread; later signals are ignored, so the cleanup the first one
  started is never cut short by a second (SIGKILL remains for that);
* every long loop (the tar walk, decompression, compression, blob transfers,
  extraction, the profiling wait) calls :func:`check_cancelled` once per
  chunk, which raises :class:`~estargz._exceptions.Cancelled` in that thread;
  a wait between retries is :func:`sleep_or_cancel`, which ends at once.

A chunk is at most a few MiB of work, so every thread stops within a
fraction of a second; a thread blocked in a socket read stops at its read
timeout, and the CLI does not wait for it (it exits once the outputs are
cleaned up).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from ._exceptions import Cancelled

__all__ = ["cancel_requested", "check_cancelled", "interrupt_on_signals", "request_cancel",
           "reset_cancel", "sleep_or_cancel"]

_CANCEL = threading.Event()


def request_cancel() -> None:
    """Ask every loop of this process to stop at its next check."""
    _CANCEL.set()


def cancel_requested() -> bool:
    """Whether :func:`request_cancel` was called (and not reset since)."""
    return _CANCEL.is_set()


def check_cancelled() -> None:
    """Raise :class:`Cancelled` if cancellation was requested: call it once per
    chunk of work in every loop that can run for more than a moment."""
    if _CANCEL.is_set():
        raise Cancelled()


def sleep_or_cancel(seconds: float) -> None:
    """Wait ``seconds`` (a retry's back-off), raising :class:`Cancelled` as
    soon as cancellation is requested rather than after the wait."""
    if _CANCEL.wait(seconds):
        raise Cancelled()


def reset_cancel() -> None:
    """Forget a request (a library caller that runs again after an interrupt)."""
    _CANCEL.clear()


@contextlib.contextmanager
def interrupt_on_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
                         ) -> Iterator[None]:
    """In the block (main thread only), the first of ``signums`` requests
    cancellation and raises ``KeyboardInterrupt``; the ones after it are
    ignored so that cleanup runs to the end. Handlers are restored after."""
    def handler(signum: int, frame: Any) -> None:
        if _CANCEL.is_set():
            return  # cleanup is under way: let it finish
        request_cancel()
        raise KeyboardInterrupt(f"signal {signum}")
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
