"""Turning any input layer into a seekable, uncompressed tar file.

Input may be a plain tar, gzip tar or zstd tar (told apart by content, never
by name), from a file or stdin. Conversion reorders entries, so it needs random
access: a plain tar in a regular file is used in place; anything else is
decompressed into an anonymous temporary file, which the kernel removes
however the process ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from .._cancel import check_cancelled
from .._exceptions import InvalidInput, StorageError
from .._progress import Meter, progress_meter
from .gzipstream import GzipMembersReader
from .inputfile import check_stdin, open_input

GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER_MAGIC = {
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x04\x22\x4d\x18": "lz4",
}


def detect_compression(head: bytes) -> str:
    """Return ``"gzip"``, ``"zstd"`` or ``"tar"`` for the first bytes of a layer."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    for magic, name in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raise InvalidInput(f"{name}-compressed layers are not supported "
                               "(use tar, tar+gzip or tar+zstd)")
    return "tar"


@contextlib.contextmanager
def open_tar(path: str, tmpdir: str | None = None) -> Iterator[BinaryIO]:
    """Yield a seekable binary file holding the uncompressed tar of ``path``.

    ``path`` ``"-"`` reads standard input.
    """
    with contextlib.ExitStack() as stack:
        if path == "-":
            src: BinaryIO = sys.stdin.buffer
            check_stdin(src, "input layer")
        else:
            src = stack.enter_context(open_input(path, "input layer"))
        head = _peek(src, 8)
        kind = detect_compression(head)
        if kind == "tar" and path != "-" and stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            src.seek(0)
            yield src
            return
        spool = stack.enter_context(tempfile.TemporaryFile(dir=tmpdir))
        try:
            _decompress_into(kind, head, src, spool)
        except OSError as e:
            raise StorageError(f"cannot spool the input layer: {e.strerror or e}") from None
        spool.seek(0)
        yield spool


def decompress_file(path: str, dst: BinaryIO) -> str:
    """Write the uncompressed tar of layer file ``path`` to ``dst``; return
    what it was (``"gzip"``, ``"zstd"`` or ``"tar"``, then copied as is).

    For callers that keep one decompressed copy to read several times
    (``estargz optimize`` stages each layer so).
    """
    try:
        with open(path, "rb") as src:
            head = _peek(src, 8)
            kind = detect_compression(head)
            _decompress_into(kind, head, src, dst)
    except OSError as e:
        raise StorageError(f"cannot decompress {path}: {e.strerror or e}") from None
    return kind


def _peek(src: BinaryIO, n: int) -> bytes:
    if hasattr(src, "peek"):
        peeked: bytes = src.peek(n)
        return peeked[:n]
    # Unbuffered stdin: read and remember; _Chain replays it.
    return src.read(n)


class _Chain:
    """``head`` followed by the rest of ``src``, as one ``read``-able stream."""

    def __init__(self, head: bytes, src: BinaryIO) -> None:
        self._head = head
        self._src = src

    def read(self, n: int) -> bytes:
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._src.read(n)


class _Cancellable:
    """A reader that stops at the next read once cancellation is requested
    (copy loops that run in C, like zstandard's copy_stream, call it), and
    counts the compressed bytes read on ``counted``."""

    def __init__(self, src: BinaryIO, counted: Meter) -> None:
        self._src = src
        self._counted = counted

    def read(self, n: int = -1) -> bytes:
        check_cancelled()
        data = self._src.read(n)
        self._counted.add(len(data))
        return data


def _input_size(src: BinaryIO) -> int | None:
    """The size of ``src`` when it is a regular file (not a pipe)."""
    try:
        st = os.fstat(src.fileno())
    except (OSError, AttributeError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _decompress_into(kind: str, head: bytes, src: BinaryIO, dst: BinaryIO) -> None:
    raw: BinaryIO = src if hasattr(src, "peek") else _Chain(head, src)  # type: ignore
    counted = progress_meter("decompress", _input_size(src))
    raw = _Cancellable(raw, counted)  # type: ignore[assignment]
    if kind == "tar":
        shutil.copyfileobj(raw, dst, 1 << 20)
    elif kind == "gzip":
        reader = GzipMembersReader(raw.read, error=_gzip_error, track_members=False)
        while True:
            check_cancelled()
            data = reader.read(1 << 20)
            if not data:
                break
            dst.write(data)
    else:
        # Optional where it matters: the rootless helper runs this package
        # under a bare python3, which has zstandard only if zstd layers need it.
        import zstandard

        try:
            zstandard.ZstdDecompressor().copy_stream(raw, dst, read_size=1 << 20,
                                                     write_size=1 << 20)
        except zstandard.ZstdError as e:
            raise InvalidInput(f"invalid zstd input: {e}") from None


def _gzip_error(message: str, offset: int | None = None) -> InvalidInput:
    where = f" at compressed offset {offset}" if offset is not None else ""
    return InvalidInput(f"input layer: {message}{where}")
