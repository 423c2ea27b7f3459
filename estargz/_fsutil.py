"""Writing files so that they appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from ._exceptions import StorageError


def unlink_quietly(path: str) -> None:
    """Remove ``path`` if it exists; cleanup must not mask the real error."""
    with contextlib.suppress(OSError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_output(dst: str, *, fsync: bool = True) -> Iterator[BinaryIO]:
    """Yield a file that becomes ``dst`` only if the block completes.

    The file is written beside ``dst`` (same filesystem, so the final rename
    is atomic), flushed to disk, given the mode a plain ``open`` would give,
    and renamed. On any exception, Ctrl-C included, it is removed and the
    exception propagates; an ``OSError`` while writing becomes a one-line
    :class:`StorageError` naming ``dst``.
    """
    directory = os.path.dirname(os.path.abspath(dst))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dst)}.",
                                   suffix=".tmp")
    except OSError as e:
        raise StorageError(f"cannot write {dst}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dst)
    except OSError as e:
        unlink_quietly(tmp)
        raise StorageError(f"cannot write {dst}: {e.strerror or e}") from None
    except BaseException:
        unlink_quietly(tmp)
        raise
