"""Decompressing multi-member gzip streams while knowing where members start.

eStargz relies on gzip members starting at exact compressed offsets, so the
verifier needs, for every member, the pair (uncompressed position, compressed
offset). ``GzipMembersReader`` is a plain ``read``-able decompressor that
records those pairs as it goes.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable, Container

from .._exceptions import EstargzError, InvalidBlob

_PIECE = 1 << 20
# Compressed bytes handed to zlib per call.
_FEED = 1 << 14


class GzipMembersReader:
    """Decompress concatenated gzip members read through ``read_compressed``.

    ``read_compressed(n)`` returns up to ``n`` compressed bytes, ``b""`` at the
    end. ``base`` is the compressed offset of its first byte. Each member's
    start is appended to :attr:`member_starts` as ``(upos, coffset)`` -- or, when
    ``track_members`` is a set of offsets, only the starts at those offsets.
    Truncated or corrupt data raises ``error`` (default :class:`InvalidBlob`).
    """

    def __init__(self, read_compressed: Callable[[int], bytes], base: int = 0,
                 error: Callable[..., EstargzError] = InvalidBlob,
                 track_members: bool | Container[int] = True) -> None:
        self._read = read_compressed
        self._cpos = base
        self._in = memoryview(b"")
        self._at = 0  # position in ``_in`` of the first byte not yet consumed
        self._d: zlib._Decompress | None = None
        self._upos = 0
        self._error = error
        # Which member starts to record: all, none, or only those at the given
        # compressed offsets (a hostile blob of millions of empty members
        # would otherwise fill memory with starts nobody asks about).
        self._wanted: Container[int] | None = (
            None if track_members is True else
            frozenset() if track_members is False else track_members)
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
                if self._at == len(self._in) and not self._refill():
                    break
                self._d = zlib.decompressobj(31)
                self.members += 1
                if self._wanted is None or self._cpos in self._wanted:
                    self.member_starts.append((self._upos, self._cpos))
            # zlib copies the input left over after a member into
            # ``unused_data``; feeding it a bounded slice keeps that copy small
            # when members are tiny (chunk size 1, or a hostile run of empty
            # members), instead of copying the rest of a 1 MiB piece per member.
            src = self._in[self._at:self._at + _FEED]
            d = self._d
            try:
                data = d.decompress(src, min(need, _PIECE))
            except zlib.error as e:
                raise self._error(f"invalid gzip data: {e}", offset=self._cpos) from None
            # At a member's end the leftover input is ``unused_data`` (and
            # ``unconsumed_tail`` may repeat it); before, it is the tail.
            used = len(src) - len(d.unused_data if d.eof else d.unconsumed_tail)
            self._at += used
            self._cpos += used
            if d.eof:
                self._d = None
            if data:
                out.append(data)
                need -= len(data)
                self._upos += len(data)
            elif self._d is not None and self._at == len(self._in) and not self._refill():
                raise self._error("gzip stream is truncated", offset=self._cpos)
        return b"".join(out)

    def _refill(self) -> bool:
        """Read the next piece of compressed input; False at the end."""
        self._in = memoryview(self._read(_PIECE))
        self._at = 0
        return len(self._in) > 0
