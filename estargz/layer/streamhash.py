"""The sha256 of a layer's uncompressed stream (its diff_id), hashed in a
thread of its own as the writer emits the stream.

The writer's main thread is the converter's bottleneck: it plans units,
builds headers and TOC entries, and writes in order, while the pool
compresses. Hashing the stream there meant reading every payload a second
time on that thread; here the reads and the hashing (both release the GIL)
run beside it, in order, from a queue of header bytes and payload ranges.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from types import TracebackType

from .order import Planned
from .units import read_payload

_STOP = None


class StreamHash:
    """sha256 of header bytes and payload ranges of ``fd``, in the order
    given. A context manager: leaving it stops the thread, so an error in
    the writer leaves no thread behind."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._hash = hashlib.sha256()
        self._queue: queue.SimpleQueue[bytes | tuple[Planned, int, int] | None] = \
            queue.SimpleQueue()
        self._error: BaseException | None = None
        self._abandoned = False  # the writer failed: what is queued is not wanted
        self._thread = threading.Thread(target=self._run, name="estargz-diff-id", daemon=True)
        self._thread.start()

    def update(self, data: bytes | bytearray) -> None:
        """Hash ``data`` (copied if mutable: it is hashed later)."""
        self._queue.put(bytes(data))

    def payload(self, member: Planned, start: int, length: int) -> None:
        """Hash bytes ``[start, start+length)`` of ``member``'s payload."""
        self._queue.put((member, start, length))

    def hexdigest(self) -> str:
        """The digest of everything given; raises what reading raised."""
        self.close()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()

    def close(self) -> None:
        """Hash what is queued, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def __enter__(self) -> StreamHash:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            # An error or Ctrl-C: stop now, without hashing the backlog.
            self._abandoned = True
        self.close()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is not None or self._abandoned:
                continue  # drain until told to stop; an error is raised then
            try:
                if isinstance(item, bytes):
                    self._hash.update(item)
                else:
                    for piece in read_payload(self._fd, *item):
                        self._hash.update(piece)
            except BaseException as e:  # noqa: BLE001  (re-raised by hexdigest)
                self._error = e
