"""StreamHash, the converter's diff_id: header bytes and payload ranges of
the input tar hashed in order on a thread of its own."""

from __future__ import annotations

import hashlib
import os
import tarfile
import threading
from pathlib import Path

import pytest

from conftest import Spec, build_tar
from estargz import InvalidInput
from estargz.layer.streamhash import StreamHash


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return [m for m in tf if m.isreg()]


def test_digest_is_the_stream_in_order(tmp_path: Path) -> None:
    path = tmp_path / "in.tar"
    path.write_bytes(build_tar([Spec("a", data=b"alpha" * 1000), Spec("b", data=os.urandom(70000)),
                                Spec("c", data=b"")]))
    a, b, _ = _members(path)
    data = path.read_bytes()
    expected = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        with StreamHash(fd) as h:
            steps: list[bytes | bytearray | tuple[tarfile.TarInfo, int, int]] = [
                b"head", (b, 100, 5000), bytearray(b"mid"), (a, 0, a.size), (b, 0, 100)]
            for step in steps:
                if isinstance(step, tuple):
                    m, start, length = step
                    h.payload(m, start, length)
                    expected.update(data[m.offset_data + start:m.offset_data + start + length])
                else:
                    h.update(step)
                    expected.update(step)
            assert h.hexdigest() == expected.hexdigest()
    finally:
        os.close(fd)


def test_a_read_error_is_raised_by_hexdigest(tmp_path: Path) -> None:
    path = tmp_path / "in.tar"
    path.write_bytes(build_tar([Spec("a", data=b"x" * 5000)]))
    (a,) = _members(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        with StreamHash(fd) as h:
            os.truncate(path, 512)  # the payload is gone: a short read
            h.payload(a, 0, a.size)
            with pytest.raises(InvalidInput, match="input tar is truncated in the data of 'a'"):
                h.hexdigest()
    finally:
        os.close(fd)


class _CountingInfo(tarfile.TarInfo):
    """A member that counts how often its payload is read."""

    reads = 0

    @property
    def offset_data(self) -> int:
        _CountingInfo.reads += 1
        return self._at

    @offset_data.setter
    def offset_data(self, value: int) -> None:
        self._at = value


def test_leaving_on_an_error_stops_without_hashing_the_backlog(tmp_path: Path) -> None:
    path = tmp_path / "in.tar"
    path.write_bytes(build_tar([Spec("a", data=os.urandom(1 << 16))]))
    (a,) = _members(path)
    m = _CountingInfo("a")
    m.size, m.offset_data = a.size, a.offset_data
    _CountingInfo.reads = 0
    before = {t.name for t in threading.enumerate()}
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(KeyError), StreamHash(fd) as h:
            for _ in range(20000):
                h.payload(m, 0, m.size)
            raise KeyError("the writer failed")
    finally:
        os.close(fd)
    # Only what was in hand when the writer failed was read, not the backlog.
    assert _CountingInfo.reads < 20000
    assert "estargz-diff-id" not in {t.name for t in threading.enumerate()} - before
