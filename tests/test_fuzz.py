"""Mutation fuzzing: no mutated blob gets anything but an EstargzError.

Seeds are three small valid conversions (see ``blobcraft``): every entry kind
in 1000-byte chunks; small files in 1-byte chunks (a gzip member per byte);
and compression level 0, whose members hold tar headers as they are.
Hypothesis draws one seed and one to four mutations, applied to one target:

* ``blob``: the blob's bytes -- flip a bit, overwrite a byte, truncate,
  insert bytes, delete a range, splice in a range of any seed;
* ``member``: the uncompressed bytes of one gzip member before the TOC, with
  the same edits or tar-aware ones (a header field re-encoded by tarfile, a
  PAX header of hostile records put in front of a header), recompressed,
  every TOC offset and the footer recomputed (``blobcraft.Layout``): this
  reaches tar headers and file data behind valid gzip;
* ``toc``: the same edits on the TOC's uncompressed tar entry (header, JSON,
  padding), recompressed, footer recomputed;
* ``json``: the TOC as JSON -- set a field to a hostile value, drop or copy a
  field, duplicate, remove or swap entries -- then rebuilt.

Each mutated blob goes through ``verify_blob``, through ``LayerReader`` (every
file read with ``iter_file``, its ``chunks`` listed) and, when the TOC opens,
through the ``ls`` command (both formats) in-process. Anything but an
``EstargzError`` fails the test (Hypothesis then shrinks the mutations), as
do an error message of more than one line and an example running longer
than ``HANG_SECONDS``.

Examples are derandomized (the same in every run, no example database), and
the number actually run is counted and asserted: 12 000 in all, about a
minute on one core.
"""

from __future__ import annotations

import json
import signal
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blobcraft
from blobcraft import Layout, gzip_member, toc_tar
from estargz import BytesSource, EstargzError, LayerReader, verify_blob
from estargz.cli import main

SEEDS = {
    "every-kind": blobcraft.every_kind_blob,
    "1-byte-chunks": blobcraft.tiny_chunks_blob,
    "stored": blobcraft.stored_blob,
    "shared-members": blobcraft.shared_members_blob,
}
EXAMPLES = {"blob": 4000, "member": 3500, "toc": 2500, "json": 2000}
assert sum(EXAMPLES.values()) >= 10_000
HANG_SECONDS = 10

# --- mutations ---------------------------------------------------------------

POS = st.integers(0, 1 << 20)  # taken modulo the length of what is mutated
INTERESTING = [0x00, 0xFF, 0x7F, 0x80, 0x01, ord("0"), ord("7"), ord("9"), ord(" "),
               ord('"'), ord("{"), ord("["), ord(","), ord(":"), ord("\n"), ord("-")]
TOKENS = [b"nan", b"-1", b"1e999", b"99999999999999999999", b"\\ud800", b'"', b"{", b"[" * 64,
          b"\x00" * 512, b"\x80\xff\xff\xff\xff\xff\xff\xff", b"30 mtime=nan\n",
          b"20 size=-1\n", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff",
          b"0000000000000000STARGZ"]

BYTE_OP = st.one_of(
    st.tuples(st.just("flip"), POS, st.integers(0, 7)),
    st.tuples(st.just("set"), POS, st.sampled_from(INTERESTING) | st.integers(0, 255)),
    st.tuples(st.just("truncate"), POS),
    st.tuples(st.just("insert"), POS, st.sampled_from(TOKENS) | st.binary(min_size=1,
                                                                          max_size=32)),
    st.tuples(st.just("delete"), POS, st.integers(1, 600)),
    st.tuples(st.just("splice"), POS, st.sampled_from(sorted(SEEDS)), POS,
              st.integers(1, 1024)),
)


# Tar-aware edits of a member's uncompressed bytes: change a field of one of
# its headers (re-encoded by tarfile, with PAX records where a value needs
# them), or put a PAX header with hostile records in front of one.
HEADER_FIELDS = st.one_of(
    st.tuples(st.sampled_from(["mode", "uid", "gid", "devmajor"]),
              st.sampled_from([0, 0o7777, 2**21, 2**32, 2**62])),
    st.tuples(st.just("size"), st.sampled_from([0, 1, 511, 512, 2**33, 2**62])),
    st.tuples(st.just("mtime"), st.sampled_from([0, 1, 2**33, 2**62, 1.5])),
    st.tuples(st.sampled_from(["name", "linkname"]),
              st.sampled_from(["", "a", "../x", "stargz.index.json", "x" * 200])),
    st.tuples(st.just("type"), st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE,
                                                tarfile.SYMTYPE, tarfile.LNKTYPE,
                                                tarfile.GNUTYPE_SPARSE, tarfile.XHDTYPE,
                                                tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME,
                                                tarfile.CONTTYPE, b"V"])),
)
PAX_RECORDS = st.sampled_from([
    {"mtime": "nan"}, {"mtime": "-inf"}, {"mtime": "1e400"}, {"mtime": "-1e30"},
    {"mtime": "1.5"}, {"size": "-1"}, {"size": "99999999999999999999"}, {"uid": "-5"},
    {"path": "stargz.index.json"}, {"path": "../x"}, {"linkpath": "x" * 300},
    {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "10"},
    {"GNU.sparse.map": "1,2,x"}, {"GNU.sparse.size": "10", "GNU.sparse.numblocks": "1"},
    {"SCHILY.xattr.user.k": "v"}, {"hdrcharset": "BINARY"}, {"comment": "x" * 2000},
])
TAR_OP = st.one_of(
    st.tuples(st.just("header"), POS, HEADER_FIELDS),
    st.tuples(st.just("pax"), POS, PAX_RECORDS),
)


def header_blocks(data: bytes, first: int) -> list[int]:
    """Offsets in ``data`` of blocks that parse as tar headers; ``first`` is
    the first offset aligned to the tar stream."""
    out = []
    for at in range(first, len(data) - 511, 512):
        try:
            tarfile.TarInfo.frombuf(data[at:at + 512], "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            continue
        out.append(at)
    return out


def apply_tar_op(data: bytes, first: int, op: tuple) -> bytes:
    blocks = header_blocks(data, first)
    if not blocks:
        return data
    at = blocks[op[1] % len(blocks)]
    try:
        if op[0] == "pax":
            new = blobcraft.pax_header(op[2]) + data[at:at + 512]
        else:
            ti = tarfile.TarInfo.frombuf(data[at:at + 512], "utf-8", "surrogateescape")
            setattr(ti, *op[2])
            new = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    except (ValueError, UnicodeError):  # a value tarfile will not write
        return data
    return data[:at] + new + data[at + 512:]


def apply_byte_op(data: bytes, op: tuple) -> bytes:
    b = bytearray(data)
    n = len(b)
    kind, pos = op[0], op[1]
    if kind == "flip" and n:
        b[pos % n] ^= 1 << op[2]
    elif kind == "set" and n:
        b[pos % n] = op[2]
    elif kind == "truncate":
        del b[pos % (n + 1):]
    elif kind == "insert":
        at = pos % (n + 1)
        b[at:at] = op[2]
    elif kind == "delete" and n:
        del b[pos % n:pos % n + op[2]]
    elif kind == "splice":
        src = SEEDS[op[2]]()
        start = op[3] % len(src)
        at = pos % (n + 1)
        b[at:at + op[4]] = src[start:start + op[4]]
    return bytes(b)


INT_FIELDS = ["size", "mode", "uid", "gid", "offset", "devMajor", "devMinor", "chunkOffset",
              "chunkSize"]
STR_FIELDS = ["name", "type", "modtime", "linkName", "userName", "groupName", "digest",
              "chunkDigest"]
INTS = [0, 1, 2, 13, 1000, 0o7777, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1]
STRS = ["", "a", "../x", "/", "./etc", "etc/small", "d/a", "s/one", "a\nb", "\ud800",
        "x" * 300, "sha256:" + "0" * 64, "sha256:", "reg", "dir", "chunk", "hardlink",
        "symlink", "char", "fifo", "2000-01-01T00:00:00Z"]
ANY: list[object] = [None, True, -1, 2**63, 2**64, 1.5, float("inf"), [], {}, "1", 1]
XATTRS = [{}, {"k": "!!"}, {"user.k": "aGk="}, {"\udc80": "aGk="}, {"user.k": 7}]
FIELD_VALUE = st.one_of(
    st.tuples(st.sampled_from(INT_FIELDS), st.sampled_from(INTS)),
    st.tuples(st.sampled_from(STR_FIELDS), st.sampled_from(STRS)),
    st.tuples(st.just("xattrs"), st.sampled_from(XATTRS)),
    st.tuples(st.sampled_from(INT_FIELDS + STR_FIELDS + ["xattrs", "unknown"]),
              st.sampled_from(ANY + INTS[:3] + STRS[:3])),
)
SET_OP = st.tuples(st.just("set"), POS, FIELD_VALUE)
JSON_OP = st.one_of(
    SET_OP, SET_OP, SET_OP,  # the op most likely to leave a TOC that still opens
    st.tuples(st.just("drop"), POS, st.sampled_from(INT_FIELDS + STR_FIELDS + ["xattrs"])),
    st.tuples(st.just("copy"), POS, POS, st.sampled_from(INT_FIELDS + STR_FIELDS)),
    st.tuples(st.just("nudge"), POS, st.sampled_from(["offset", "size", "chunkOffset",
                                                      "chunkSize"]),
              st.sampled_from([-512, -10, -1, 1, 10, 512])),
    st.tuples(st.just("dup"), POS, POS),
    st.tuples(st.just("remove"), POS),
    st.tuples(st.just("swap"), POS, POS),
    st.tuples(st.just("top"), st.sampled_from(["version", "entries", "extra"]),
              st.sampled_from(ANY + INTS[:3])),
)


def apply_json_op(toc: dict, op: tuple) -> None:
    kind = op[0]
    if kind == "top":
        toc[op[1]] = op[2]
        return
    entries = toc["entries"]
    if not isinstance(entries, list) or not entries:
        return
    n = len(entries)
    if not isinstance(entries[op[1] % n], dict):
        return
    if kind == "set":
        field, value = op[2]
        entries[op[1] % n][field] = value
    elif kind == "drop":
        entries[op[1] % n].pop(op[2], None)
    elif kind == "copy" and isinstance(entries[op[2] % n], dict):
        entries[op[1] % n][op[3]] = entries[op[2] % n].get(op[3])
    elif kind == "nudge":
        e = entries[op[1] % n]
        if isinstance(e.get(op[2]), int):
            e[op[2]] += op[3]
    elif kind == "dup":
        entries.insert(op[2] % (n + 1), dict(entries[op[1] % n]))
    elif kind == "remove":
        del entries[op[1] % n]
    elif kind == "swap":
        i, j = op[1] % n, op[2] % n
        entries[i], entries[j] = entries[j], entries[i]


_layouts: dict[str, Layout] = {}
_aligns: dict[str, list[int]] = {}  # per member: its first tar-block-aligned offset


def layout_of(seed: str) -> Layout:
    """A fresh Layout of ``seed`` (members list copied; the TOC is copied
    by ``fixed_toc`` before any change)."""
    if seed not in _layouts:
        _layouts[seed] = base = Layout.of(SEEDS[seed]())
        upos, _aligns[seed] = 0, []
        for k in range(len(base.members)):
            _aligns[seed].append(-upos % 512)
            upos += len(base.unpacked(k))
    base = _layouts[seed]
    return Layout(list(base.members), base.toc, base.anchors)


def mutate(target: str, seed: str, member: int, ops: list) -> bytes:
    if target == "blob":
        data = SEEDS[seed]()
        for op in ops:
            data = apply_byte_op(data, op)
        return data
    layout = layout_of(seed)
    if target == "member":
        k = member % len(layout.members)
        data = layout.unpacked(k)
        for op in ops:
            if op[0] in ("header", "pax"):
                data = apply_tar_op(data, _aligns[seed][k], op)
            else:
                data = apply_byte_op(data, op)
        layout.repack(k, data)
        return layout.blob()
    toc = layout.fixed_toc()
    if target == "toc":
        data = toc_tar(json.dumps(toc, indent="\t").encode())
        for op in ops:
            data = apply_byte_op(data, op)
        return layout.blob(toc_member=gzip_member(data))
    for op in ops:
        apply_json_op(toc, op)
    return layout.blob(toc_json=json.dumps(toc, indent="\t").encode())


# --- what every mutated blob goes through --------------------------------------

class Hang(Exception):
    """An example ran longer than HANG_SECONDS."""


@contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise Hang(f"example ran longer than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def scratch():
    """A file for the CLI to read, in memory where possible: thousands of
    writes to a disk-backed /tmp can take longer than the checks."""
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="estargz-fuzz-",
                                     dir=shm if shm.is_dir() else None) as d:
        yield Path(d, "blob.esgz")


_runner = CliRunner()


def exercise(blob: bytes, scratch: Path) -> None:
    """Verify, open, read every file and list ``blob``. An EstargzError is
    caught here (its message must be one line: the CLI prints it as one);
    anything else escapes."""
    try:
        verify_blob(BytesSource(blob))
    except EstargzError as e:
        assert_one_line(e)
    try:
        reader = LayerReader(BytesSource(blob))
    except EstargzError as e:
        assert_one_line(e)
        return
    for entry in reader.entries:
        if entry.type in ("reg", "hardlink"):
            try:
                reader.chunks(entry.name)
                for _ in reader.iter_file(entry.name):
                    pass
            except EstargzError as error:
                assert_one_line(error)
    # The TOC opened, so listing it must succeed, in both formats.
    scratch.write_bytes(blob)
    for args in (["ls"], ["ls", "--json"]):
        result = _runner.invoke(main, ["layer", args[0], str(scratch), *args[1:]])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == 0, (args, result.output)


def assert_one_line(error: EstargzError) -> None:
    assert "\n" not in str(error) and "\r" not in str(error), repr(str(error))


def run_examples(target: str, scratch: Path) -> int:
    count = 0

    @settings(max_examples=EXAMPLES[target], deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    @given(seed=st.sampled_from(sorted(SEEDS)), member=POS,
           ops=st.lists({"json": JSON_OP, "member": TAR_OP | BYTE_OP}.get(target, BYTE_OP),
                        min_size=1, max_size=4))
    def check(seed, member, ops):
        nonlocal count
        count += 1
        blob = mutate(target, seed, member, ops)
        with time_limit(HANG_SECONDS):
            exercise(blob, scratch)

    check()
    return count


@pytest.mark.parametrize("target", list(EXAMPLES))
def test_mutated_blobs_raise_only_estargz_errors(target, scratch):
    assert run_examples(target, scratch) >= EXAMPLES[target]


def test_seeds_are_valid_and_reassemble():
    # The mutations start from blobs that verify, and rebuilding one
    # unchanged through each target keeps it valid.
    for name, make in SEEDS.items():
        assert verify_blob(BytesSource(make())).entries > 0
        for target in ("member", "toc", "json"):
            verify_blob(BytesSource(mutate(target, name, 0, [])))
