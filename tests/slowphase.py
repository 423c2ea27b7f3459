"""Run the estargz CLI with one phase of the work slowed down, for the
cancellation tests (tests/test_cancel.py).

    python tests/slowphase.py PHASE MARKER -- ESTARGZ-ARGS...

PHASE is one of PHASES. The phase's function is wrapped so that it creates
the file MARKER when it starts and then runs at a crawl (a short sleep per
piece of data), so the phase lasts far longer than the test waits; the test
then signals the process. Only the speed changes: the work, its threads and
its cancellation checks are the real ones, so the process stops within the
bound only if the phase really checks for cancellation.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import estargz.layer.converter as converter
import estargz.layer.layerinput as layerinput
import estargz.registry.upload as registry_upload
from estargz.cli import main

#: Seconds slept per piece of data in the slowed phase.
CRAWL = 0.05


class _Slow:
    """A reader that sleeps before each read and returns at most 64 KiB."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src

    def read(self, n: int = -1) -> bytes:
        time.sleep(CRAWL)
        return self._src.read(min(n, 64 << 10) if n >= 0 else 64 << 10)

    def peek(self, n: int = 0) -> bytes:
        return self._src.peek(n)  # type: ignore[attr-defined]


def _announce(marker: Path) -> None:
    marker.touch()


def slow_decompress(marker: Path) -> None:
    real = layerinput._decompress_into

    def slowed(kind: str, head: bytes, src: BinaryIO, dst: BinaryIO) -> None:
        _announce(marker)
        real(kind, head, _Slow(src), dst)  # type: ignore[arg-type]
    layerinput._decompress_into = slowed


def slow_compress(marker: Path) -> None:
    real: Callable[..., Iterator[bytes]] = converter.read_payload

    def slowed(*args: Any) -> Iterator[bytes]:
        _announce(marker)
        for piece in real(*args):
            time.sleep(CRAWL)
            yield piece
    converter.read_payload = slowed  # type: ignore[assignment]


class _SlowFile:
    """A file opened for reading whose reads crawl (a request body)."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "rb")  # noqa: SIM115  (closed by its reader, as the real one)
        self._size = os.fstat(self._f.fileno()).st_size

    def __len__(self) -> int:
        return self._size - self._f.tell()

    def read(self, n: int = -1) -> bytes:
        time.sleep(CRAWL)
        return self._f.read(min(n, 64 << 10) if n >= 0 else 64 << 10)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


def slow_upload(marker: Path) -> None:
    def slowed(path: str, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode == "rb":  # a blob body
            _announce(marker)
            return _SlowFile(path)
        return open(path, mode, *args, **kwargs)
    # The upload module only opens files to send them.
    registry_upload.open = slowed  # type: ignore[attr-defined]


PHASES: dict[str, Callable[[Path], None]] = {
    "decompress": slow_decompress,
    "compress": slow_compress,
    "upload": slow_upload,
}


if __name__ == "__main__":
    phase, marker, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: slowphase.py PHASE MARKER -- ARGS..."
    PHASES[phase](Path(marker))
    main(args)
