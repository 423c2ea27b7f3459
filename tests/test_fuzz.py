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

Two more surfaces (issue 11), a few seconds each: input layers whose tar
headers are mutated in every encoding (``convert_or_refuse``: refused in one
line with no output, or converted into a blob our verify accepts), and the
JSON documents each transport reads -- an OCI layout's ``index.json``, the
manifest and config, a docker-archive's ``manifest.json``, registry error
bodies and record lines -- mutated and run through a whole-image conversion
or their parser: converted, or one EstargzError.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
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
from conftest import build_tar, every_kind_specs
from estargz import (
    BytesSource,
    ConvertOptions,
    EstargzError,
    ImageConvertOptions,
    LayerReader,
    convert_image,
    convert_layer,
    read_records,
    verify_blob,
)
from estargz.cli import main
from estargz.registry.errors import error_detail
from test_hostile_tar import layout

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


# --- input layers: mutated tar headers -----------------------------------------
#
# A small tar of every entry kind, in PAX and GNU format, with one to four
# edits: a raw header field set to a hostile encoding (octal text with a
# sign, underscores or junk after a NUL; GNU base-256 of any size and sign;
# random bytes), the checksum usually recomputed so the field itself is what
# the walk sees; a PAX header of hostile records put in front of a member;
# or a byte edit. Converting it either fails with one EstargzError line and
# no output, or succeeds with an output our own verify accepts: converter
# and verifier agree on every header.

TAR_SEEDS = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}
TAR_EXAMPLES = 300
RAW_FIELDS = {"name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8),
              "size": (124, 12), "mtime": (136, 12), "type": (156, 1),
              "linkname": (157, 100), "magic": (257, 8), "uname": (265, 32),
              "gname": (297, 32), "devmajor": (329, 8), "devminor": (337, 8),
              "prefix": (345, 155)}
RAW_VALUES = st.one_of(
    st.integers(-2**70, 2**70).map(lambda n: (b"-" if n < 0 else b"") + b"%o" % abs(n)),
    st.tuples(st.sampled_from([0x80, 0xFF]), st.binary(min_size=0, max_size=11)).map(
        lambda t: bytes([t[0]]) + t[1]),
    st.sampled_from([b"", b" " * 12, b"\0" * 12, b"-1", b"+7", b"1_0", b"9", b"abc",
                     b"7" * 12, b"0005\0x", b"\x80" + b"\xff" * 11, b"\xff" * 12,
                     b"a\0b", b"../x", b"stargz.index.json", b"ustar\x0000", b"ustar  \0",
                     b"0", b"2", b"5", b"K", b"L", b"x", b"g", b"S"]),
    st.binary(max_size=16),
)
PAX_KEYS = ["size", "uid", "gid", "mtime", "atime", "ctime", "path", "linkpath", "uname",
            "gname", "SCHILY.xattr.user.k", "GNU.sparse.size", "GNU.sparse.realsize",
            "GNU.sparse.major", "GNU.sparse.minor", "GNU.sparse.map", "comment",
            "hdrcharset", "a\0b"]
PAX_VALUES = st.one_of(
    st.sampled_from(["", "-1", "0", "1", "nan", "inf", "1e400", "99999999999999999999",
                     "9" * 5000, "1_0", "\uff11", "+5", "1.5", "-1.5", "253402300800",
                     "a\0b", "../x", "BINARY", "1,2,x"]),
    st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True).map(repr),
    st.text(max_size=12),
)
TAR_INPUT_OP = st.one_of(
    st.tuples(st.just("field"), POS, st.sampled_from(sorted(RAW_FIELDS)), RAW_VALUES,
              st.booleans()),
    st.tuples(st.just("field"), POS, st.sampled_from(sorted(RAW_FIELDS)), RAW_VALUES,
              st.just(True)),
    st.tuples(st.just("pax"), POS, st.dictionaries(st.sampled_from(PAX_KEYS), PAX_VALUES,
                                                   min_size=1, max_size=3)),
    BYTE_OP,
)


def tar_seed(name: str) -> bytes:
    return build_tar(every_kind_specs(), fmt=TAR_SEEDS[name])


def apply_tar_input_op(data: bytes, op: tuple) -> bytes:
    if op[0] not in ("field", "pax"):
        return apply_byte_op(data, op)
    blocks = header_blocks(data, 0)
    if not blocks:
        return data
    at = blocks[op[1] % len(blocks)]
    if op[0] == "pax":
        try:
            return data[:at] + blobcraft.pax_header(op[2]) + data[at:]
        except (ValueError, UnicodeError):
            return data
    start, width = RAW_FIELDS[op[2]]
    block = bytearray(data[at:at + 512])
    block[start:start + width] = op[3][:width].ljust(width, b"\0")
    if op[4]:  # the checksum made right, so that the field is what is judged
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
    return data[:at] + bytes(block) + data[at + 512:]


def convert_or_refuse(tar: bytes, where: Path) -> None:
    """Convert ``tar``: an EstargzError of one line and no output, or an
    output that verifies. Anything else escapes."""
    src, dst = where / "in.tar", where / "out.esgz"
    src.write_bytes(tar)
    dst.unlink(missing_ok=True)
    try:
        result = convert_layer(str(src), str(dst), ConvertOptions(workers=1))
    except EstargzError as e:
        assert_one_line(e)
        assert not dst.exists()
        return
    verify_blob(BytesSource(dst.read_bytes()), result.toc_digest)


def test_mutated_tar_headers_convert_to_what_verify_accepts_or_are_refused(scratch):
    count = 0

    @settings(max_examples=TAR_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(seed=st.sampled_from(sorted(TAR_SEEDS)),
           ops=st.lists(TAR_INPUT_OP, min_size=1, max_size=4))
    def check(seed, ops):
        nonlocal count
        count += 1
        data = tar_seed(seed)
        for op in ops:
            data = apply_tar_input_op(data, op)
        with time_limit(HANG_SECONDS):
            convert_or_refuse(data, scratch.parent)

    check()
    assert count >= TAR_EXAMPLES


def test_tar_seeds_convert_and_verify(scratch):
    for name in TAR_SEEDS:
        convert_or_refuse(tar_seed(name), scratch.parent)
        assert (scratch.parent / "out.esgz").exists()


# --- the JSON documents each transport reads -------------------------------------
#
# An OCI layout's index.json, the image's manifest and config in it, and a
# docker-archive's manifest.json (the documents a registry serves take the
# same path through image conversion as a layout's), plus registry error
# bodies and record lines: a real document with one to three edits -- a
# value anywhere replaced by random JSON, a key or element removed, or a
# byte edit of the text (deep nesting, NaN, 1e400, truncation) -- goes
# through the real consumer: a whole-image conversion, or the parsing
# function. It converts or fails with one EstargzError line; never a
# RecursionError, KeyError or TypeError.

JSON_DOCS = ("index.json", "manifest", "config", "docker manifest.json")
JSON_EXAMPLES = 100
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=10) | st.sampled_from(["sha256:" + "0" * 64, "../x", "latest"]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["mediaType", "digest", "size", "manifests",
                                       "layers", "config", "Config", "Layers", "RepoTags",
                                       "rootfs", "diff_ids", "annotations", "platform",
                                       "x"]) | st.text(max_size=5), children, max_size=3),
    max_leaves=8)
JSON_TOKENS = [b"[" * 100, b"{" * 70, b"[" * 100_000, b"NaN", b"1e400", b'"\\ud800"', b"\xff",
               b"}", b",", b'"', b"null", b"-0", b"\x00"]
DOC_OP = st.one_of(
    st.tuples(st.just("replace"), POS, JSON_VALUES),
    st.tuples(st.just("remove"), POS),
    st.tuples(st.just("insert"), POS, st.sampled_from(JSON_TOKENS)),
    st.tuples(st.just("truncate"), POS),
    st.tuples(st.just("set"), POS, st.sampled_from(INTERESTING) | st.integers(0, 255)),
)


def _slots(obj: object) -> list[tuple[object, object]]:
    """Every (container, key or index) in ``obj``, depth first."""
    out: list[tuple[object, object]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((obj, k))
            out += _slots(v)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append((obj, i))
            out += _slots(v)
    return out


def mutate_doc(doc: object, ops: list) -> bytes:
    doc = json.loads(json.dumps(doc))
    text = None
    for op in ops:
        if op[0] in ("replace", "remove") and text is None:
            slots = _slots(doc)
            if not slots:
                continue
            parent, key = slots[op[1] % len(slots)]
            if op[0] == "replace":
                parent[key] = op[2]
            else:
                del parent[key]
        elif op[0] in ("insert", "truncate", "set"):
            if text is None:
                text = json.dumps(doc).encode()
            text = apply_byte_op(text, op)
    return json.dumps(doc).encode() if text is None else text


@pytest.fixture(scope="module")
def image_layout(tmp_path_factory):
    """A one-layer OCI layout: its directory and its three documents."""
    root = tmp_path_factory.mktemp("fuzz-layout")
    layout(root, gzip.compress(build_tar(every_kind_specs()), mtime=0))
    index = json.loads((root / "index.json").read_bytes())
    blob = root / "blobs" / "sha256"
    manifest = json.loads((blob / index["manifests"][0]["digest"][7:]).read_bytes())
    config = json.loads((blob / manifest["config"]["digest"][7:]).read_bytes())
    return root, {"index.json": index, "manifest": manifest, "config": config}


def _put_blob(root: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return "sha256:" + digest


def run_document(doc_name: str, data: bytes, root: Path, docs: dict, work: Path) -> None:
    """Put the mutated document ``data`` in place of ``doc_name`` and convert."""
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(root, src)
    if doc_name == "docker manifest.json":
        ref = f"docker-archive:{work / 'image.tar'}"
        with tarfile.open(work / "image.tar", "w") as tf:
            members = {"manifest.json": data,
                       "config.json": json.dumps(docs["config"]).encode(),
                       "layer.tar": build_tar(every_kind_specs())}
            for name, content in members.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(content)
                tf.addfile(ti, io.BytesIO(content))
    else:
        ref = f"oci:{src}:latest"
        index = data if doc_name == "index.json" else None
        if doc_name in ("manifest", "config"):
            manifest = data if doc_name == "manifest" else json.dumps(dict(
                docs["manifest"], config=dict(docs["manifest"]["config"],
                                              digest=_put_blob(src, data),
                                              size=len(data)))).encode()
            entry = dict(docs["index.json"]["manifests"][0], digest=_put_blob(src, manifest),
                         size=len(manifest))
            index = json.dumps(dict(docs["index.json"], manifests=[entry])).encode()
        (src / "index.json").write_bytes(index or b"")
    dst = work / "dst"
    shutil.rmtree(dst, ignore_errors=True)
    try:
        convert_image(ref, f"oci:{dst}:x", ImageConvertOptions(
            layer=ConvertOptions(workers=1), all_platforms=True))
    except EstargzError as e:
        assert_one_line(e)


@pytest.mark.parametrize("doc_name", JSON_DOCS)
def test_mutated_transport_documents_convert_or_raise_only_estargz_errors(
        doc_name, image_layout, tmp_path):
    root, docs = image_layout
    seed = [{"Config": "config.json", "RepoTags": ["fuzz:1"], "Layers": ["layer.tar"]}] \
        if doc_name == "docker manifest.json" else docs[doc_name]
    count = 0

    @settings(max_examples=JSON_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(ops=st.lists(DOC_OP, min_size=1, max_size=3))
    def check(ops):
        nonlocal count
        count += 1
        with time_limit(HANG_SECONDS):
            run_document(doc_name, mutate_doc(seed, ops), root, docs, tmp_path)

    check()
    assert count >= JSON_EXAMPLES


def test_unmutated_transport_documents_convert(image_layout, tmp_path):
    root, docs = image_layout
    seed = [{"Config": "config.json", "RepoTags": ["fuzz:1"], "Layers": ["layer.tar"]}]
    for doc_name in JSON_DOCS:
        doc = seed if doc_name == "docker manifest.json" else docs[doc_name]
        run_document(doc_name, json.dumps(doc).encode(), root, docs, tmp_path)
        assert (tmp_path / "dst" / "index.json").exists(), doc_name


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(ops=st.lists(DOC_OP, min_size=1, max_size=3))
def test_mutated_registry_error_bodies_and_record_lines(ops):
    body = mutate_doc({"errors": [{"code": "DENIED", "message": "no", "detail": {}}]}, ops)
    assert isinstance(error_detail(body), str)
    line = mutate_doc({"path": "/bin/sh", "manifestDigest": "sha256:" + "0" * 64,
                       "layerIndex": 0}, ops)
    try:
        read_records([line.decode("utf-8", "replace")])
    except EstargzError as e:
        assert_one_line(e)
