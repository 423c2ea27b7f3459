"""Random-access byte sources: what the reader and verifier read blobs from.

Anything with a ``size`` and a ``read_at(offset, length)`` will do, so the
same reader works on a local file, bytes in memory, or (later) a registry
blob fetched with HTTP range requests.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from .._exceptions import InvalidBlob, InvalidInput, StorageError
from .inputfile import kind_problem, require_regular_file


@runtime_checkable
class RangeSource(Protocol):
    """A blob readable at any offset."""

    @property
    def size(self) -> int: ...

    def read_at(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset``, or raise."""
        ...


class BytesSource:
    """A blob held in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    @property
    def size(self) -> int:
        return len(self._data)

    def read_at(self, offset: int, length: int) -> bytes:
        check_range(self.size, offset, length)
        return bytes(self._data[offset:offset + length])


class FileSource:
    """A blob in a local file, read with ``pread`` (safe from many threads)."""

    def __init__(self, path: str) -> None:
        # A blob is read by offset: a FIFO (whose open() would block without
        # a writer) or a device is refused, checked before and after opening.
        require_regular_file(path, "blob")
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as e:
            raise StorageError(f"cannot open {path}: {e.strerror}") from None
        self.path = path
        st = os.fstat(self._fd)
        why = kind_problem(st.st_mode, fifo_ok=False)
        if why:
            self.close()
            raise InvalidInput(f"blob {path} is {why}, not a regular file")
        self._size = st.st_size

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        check_range(self._size, offset, length)
        parts = []
        while length:
            got = os.pread(self._fd, min(length, 1 << 24), offset)
            if not got:
                raise InvalidBlob(f"{self.path} shrank while being read", offset=offset)
            parts.append(got)
            offset += len(got)
            length -= len(got)
        return b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CountingSource:
    """Wraps a source and records every range read from it."""

    def __init__(self, inner: RangeSource) -> None:
        self.inner = inner
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def bytes_read(self) -> int:
        return sum(n for _, n in self.reads)

    def read_at(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.inner.read_at(offset, length)


def check_range(size: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidBlob(f"read of {length} bytes at {offset} is outside the "
                          f"{size}-byte blob", offset=offset)


class SequentialReader:
    """A ``read``-able view of ``[start, end)`` of a source, for streaming."""

    def __init__(self, source: RangeSource, start: int, end: int) -> None:
        self._src = source
        self._pos = start
        self._end = end

    def read(self, n: int) -> bytes:
        n = min(n, self._end - self._pos)
        if n <= 0:
            return b""
        data = self._src.read_at(self._pos, n)
        self._pos += n
        return data
