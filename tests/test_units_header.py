"""The converter's fast tar header (``units.ustar_header``) against tarfile:
the same bytes as ``TarInfo.tobuf(PAX_FORMAT)`` whenever it answers, and
no answer (tarfile's PAX header instead) whenever one ustar block cannot
hold the entry."""

from __future__ import annotations

import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estargz.layer.units import ustar_header

TYPES = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
         tarfile.BLKTYPE, tarfile.FIFOTYPE]
# Names around the 100- and 32-byte limits, ASCII or not, slashes included.
TEXT = st.text(alphabet=st.sampled_from("ab/._- \\\"é日\x7f"), max_size=110)
SHORT = st.text(alphabet=st.sampled_from("abc_é"), max_size=36)
# Numbers around what 7 and 11 octal digits hold, and beyond.
NUMBER_7 = st.one_of(st.integers(0, 2000), st.integers(8 ** 7 - 2, 8 ** 7 + 1))
NUMBER_11 = st.one_of(st.integers(0, 10 ** 6), st.integers(8 ** 11 - 2, 8 ** 11 + 1))
MTIME = st.one_of(NUMBER_11, st.integers(-5, -1),
                  st.floats(0, 2 ** 33, allow_nan=False).filter(lambda f: f != int(f)))


def _info(name: str, type_: bytes, mode: int, uid: int, gid: int, size: int,
          mtime: float, linkname: str, uname: str, gname: str, major: int, minor: int,
          pax: dict[str, str]) -> tarfile.TarInfo:
    o = tarfile.TarInfo(name)
    o.type, o.mode, o.uid, o.gid, o.size, o.mtime = type_, mode, uid, gid, size, mtime
    o.linkname, o.uname, o.gname, o.devmajor, o.devminor = linkname, uname, gname, major, minor
    o.pax_headers = pax
    return o


def _tarfile(o: tarfile.TarInfo) -> bytes | None:
    try:
        return o.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    except ValueError:
        return None


@settings(max_examples=3000, deadline=None, derandomize=True, database=None)
@given(TEXT, st.sampled_from(TYPES), st.integers(0, 0o177777), NUMBER_7, NUMBER_7, NUMBER_11,
       MTIME, TEXT, SHORT, SHORT, NUMBER_7, NUMBER_7,
       st.sampled_from([{}, {"SCHILY.xattr.user.a": "b"}]))
def test_same_bytes_as_tarfile_or_no_answer(name, type_, mode, uid, gid, size, mtime,
                                             linkname, uname, gname, major, minor, pax):
    o = _info(name, type_, mode, uid, gid, size, mtime, linkname, uname, gname, major, minor,
              pax)
    expected = _tarfile(o)
    got = ustar_header(o)
    if got is not None:
        assert got == expected
    elif expected is not None:
        # No answer: tarfile needs more than one block (a PAX record).
        assert len(expected) > tarfile.BLOCKSIZE


@pytest.mark.parametrize("o, single_block", [
    (_info("usr/bin/env", tarfile.REGTYPE, 0o755, 0, 0, 1234, 1700000000, "", "root",
           "root", 0, 0, {}), True),
    (_info("etc", tarfile.DIRTYPE, 0o755, 0, 0, 0, 1700000000, "", "", "", 0, 0, {}), True),
    (_info("dev/null", tarfile.CHRTYPE, 0o666, 0, 0, 0, 1, "", "", "", 1, 3, {}), True),
    (_info("a" * 100, tarfile.REGTYPE, 0o644, 0, 0, 0, 0, "", "", "", 0, 0, {}), True),
    # A directory's name gets its slash first: 100 characters no longer fit.
    (_info("d" * 100, tarfile.DIRTYPE, 0o755, 0, 0, 0, 0, "", "", "", 0, 0, {}), False),
    (_info("é", tarfile.REGTYPE, 0o644, 0, 0, 0, 0, "", "", "", 0, 0, {}), False),
    (_info("f", tarfile.REGTYPE, 0o644, 0, 0, 0, 1.5, "", "", "", 0, 0, {}), False),
    (_info("f", tarfile.REGTYPE, 0o644, 8 ** 7, 0, 0, 0, "", "", "", 0, 0, {}), False),
])
def test_known_entries(o: tarfile.TarInfo, single_block: bool) -> None:
    got = ustar_header(o)
    assert (got is not None) == single_block
    if got is not None:
        assert got == o.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        assert len(got) == tarfile.BLOCKSIZE
