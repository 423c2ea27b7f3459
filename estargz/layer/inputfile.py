"""Opening a file a user named as input, refusing what is not one.

Named as a layer, ``/dev/zero`` would be read for ever (zeros are an empty
tar, spooled without end); a FIFO nobody writes to blocks ``open()`` for
ever; a directory fails late, with a bare ``EISDIR``. So an input's type is
checked before it is opened (``stat``), and again on the open descriptor
(``fstat``: the path may have changed in between). Regular files are read as
they are. FIFOs and pipes (``<(zcat layer.tar.gz)``, a shell pipeline) are
opened without blocking, then given :data:`FIFO_WAIT` seconds for a writer
to appear; anything else (devices, sockets, directories) is refused with one
line naming it.
"""

from __future__ import annotations

import io
import os
import select
import stat
import time
from typing import BinaryIO

from .._cancel import check_cancelled
from .._exceptions import InvalidInput, StorageError

#: Seconds a FIFO may have no writer before it is refused. A writer started
#: with the command (a shell pipeline, process substitution) is there at
#: once; one blocked in open() on the FIFO joins as soon as we open it.
FIFO_WAIT = 3.0

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_problem(mode: int, fifo_ok: bool = True) -> str | None:
    """Why a file of ``st_mode`` ``mode`` cannot be read as input, or ``None``."""
    if stat.S_ISREG(mode) or (fifo_ok and stat.S_ISFIFO(mode)):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO, which cannot be read more than once"
    for test, name in _KINDS:
        if test(mode):
            return name
    return "of an unknown kind"


def require_regular_file(path: str, what: str) -> None:
    """Raise unless ``path`` is a regular file (for inputs read by seeking,
    such as archives); a missing path is left to the caller's ``open``."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    why = kind_problem(mode, fifo_ok=False)
    if why:
        raise InvalidInput(f"{what} {path} is {why}, not a regular file")


def check_stdin(stream: BinaryIO, what: str) -> None:
    """Raise unless ``stream`` (standard input) is a file, a pipe or a
    socket: not a terminal, a device (``< /dev/zero``) or a directory. A
    stream without a descriptor (replaced in memory, as by a test runner)
    is taken as it is."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return
    mode = os.fstat(fd).st_mode
    if os.isatty(fd):
        raise InvalidInput(f"{what} on standard input is a terminal; pipe or redirect a file")
    if not (stat.S_ISSOCK(mode) or kind_problem(mode) is None):
        raise InvalidInput(f"{what} on standard input is {kind_problem(mode)}, not a regular file")


def open_input(path: str, what: str) -> BinaryIO:
    """Open ``path`` for reading as binary, refusing what is not a regular
    file or a FIFO with a writer (``what`` names the input in messages)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise StorageError(f"cannot open {path}: {e.strerror}") from None
    why = kind_problem(mode)
    if why:
        raise InvalidInput(f"{what} {path} is {why}, not a regular file")
    try:
        # O_NONBLOCK: opening a FIFO without a writer must not block.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise StorageError(f"cannot open {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        why = kind_problem(mode)
        if why:
            raise InvalidInput(f"{what} {path} is {why}, not a regular file")
        head = _wait_for_writer(fd, path, what) if stat.S_ISFIFO(mode) else b""
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    if head:
        return io.BufferedReader(_Replay(head, fd))
    return os.fdopen(fd, "rb")


def _wait_for_writer(fd: int, path: str, what: str) -> bytes:
    """Wait until FIFO ``fd`` has a writer; return what was read meanwhile.

    A non-blocking read tells them apart: EAGAIN means a writer with no data
    yet, end of file means no writer (yet), data means both."""
    deadline = time.monotonic() + FIFO_WAIT
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        try:
            head = os.read(fd, 1)
        except BlockingIOError:
            return b""
        if head:
            return head
        left = deadline - time.monotonic()
        if left <= 0:
            raise InvalidInput(f"{what} {path} is a FIFO that no process writes to "
                               f"(waited {FIFO_WAIT:g} s)")
        check_cancelled()
        # Wakes when a writer joins and writes or leaves; a writer that
        # only joins is seen by the next read.
        poller.poll(int(min(left, 0.2) * 1000) + 1)


class _Replay(io.RawIOBase):
    """FIFO ``fd`` with the ``head`` bytes read while waiting put back."""

    def __init__(self, head: bytes, fd: int) -> None:
        super().__init__()
        self._head = head
        self._fd = fd

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return os.readv(self._fd, [buffer])

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()
