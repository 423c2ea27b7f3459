"""Decompressing multi-member gzip streams while knowing where members start.

eStargz relies on gzip members starting at exact compressed offsets, so the
verifier needs, for every member, the pair (uncompressed position, compressed
offset). ``GzipMembersReader`` is a plain ``read``-able decompressor that
records those pairs as it goes.
"""

from __future__ import annotations

import zlib
from collections import deque
from typing import Callable, Optional

from ._exceptions import EstargzError, InvalidBlob

_PIECE = 1 << 20


class GzipMembersReader:
    """Decompress concatenated gzip members read through ``read_compressed``.

    ``read_compressed(n)`` returns up to ``n`` compressed bytes, ``b""`` at the
    end. ``base`` is the compressed offset of its first byte. Each member's
    start is appended to :attr:`member_starts` as ``(upos, coffset)``.
    Truncated or corrupt data raises ``error`` (default :class:`InvalidBlob`).
    """

    def __init__(self, read_compressed: Callable[[int], bytes], base: int = 0,
                 error: Callable[..., EstargzError] = InvalidBlob,
                 track_members: bool = True) -> None:
        self._read = read_compressed
        self._cpos = base
        self._in = b""
        self._d: Optional["zlib._Decompress"] = None
        self._upos = 0
        self._error = error
        self._track = track_members
        self.member_starts: deque[tuple[int, int]] = deque()
        self.members = 0

    @property
    def compressed_offset(self) -> int:
        """Compressed offset of the first byte not yet consumed."""
        return self._cpos

    def tell(self) -> int:
        return self._upos

    def at_member_end(self) -> bool:
        """True when no member is open (the stream is between members)."""
        return self._d is None

    def read(self, n: int = -1) -> bytes:
        """Return up to ``n`` decompressed bytes; fewer only at the end."""
        if n < 0:
            n = 1 << 62
        out = []
        need = n
        while need > 0:
            if self._d is None:
                if not self._in:
                    self._in = self._read(_PIECE)
                    if not self._in:
                        break
                self._d = zlib.decompressobj(31)
                self.members += 1
                if self._track:
                    self.member_starts.append((self._upos, self._cpos))
            src = self._in
            try:
                data = self._d.decompress(src, min(need, _PIECE))
            except zlib.error as e:
                raise self._error(f"invalid gzip data: {e}", offset=self._cpos) from None
            if self._d.eof:
                self._in = self._d.unused_data
                self._d = None
            else:
                self._in = self._d.unconsumed_tail
            self._cpos += len(src) - len(self._in)
            if data:
                out.append(data)
                need -= len(data)
                self._upos += len(data)
            elif self._d is not None and not self._in:
                more = self._read(_PIECE)
                if not more:
                    raise self._error("gzip stream is truncated", offset=self._cpos)
                self._in = more
        return b"".join(out)


def decompress_member(data: bytes, limit: int,
                      error: Callable[..., EstargzError] = InvalidBlob,
                      offset: int = 0) -> tuple[bytes, int]:
    """Decompress the one gzip member at the start of ``data``.

    Returns ``(payload, compressed_length)``. The payload may not exceed
    ``limit`` bytes (a gzip bomb raises instead of filling memory).
    """
    d = zlib.decompressobj(31)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise error(f"invalid gzip member: {e}", offset=offset) from None
    if len(out) > limit:
        raise error(f"gzip member inflates past {limit} bytes", offset=offset)
    if not d.eof:
        raise error("gzip member is truncated", offset=offset)
    return out, len(data) - len(d.unused_data)
