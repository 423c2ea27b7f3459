"""Taking eStargz blobs apart and putting changed ones back together.

The robustness tests (test_hostile.py, test_fuzz.py) start from small valid
conversions and change one thing. :class:`Layout` holds a blob as its gzip
members, the TOC JSON and, for each TOC entry with an offset, the member that
offset names; :meth:`Layout.blob` reassembles it with every TOC offset and the
footer recomputed, so a change to one member or to the TOC leaves everything
else consistent. :func:`gzip_bomb` makes gzip members that inflate to GiBs from about
1 MB, without ever holding the GiBs, and
:func:`run_measured` runs the CLI and reports its peak RSS.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import estargz
from conftest import CHUNK, REPO, Spec, build_tar, every_kind_specs, pattern
from estargz import FOOTER_SIZE

MiB = 1 << 20
GiB = 1 << 30


# --- seed blobs ------------------------------------------------------------

def convert(specs: list[Spec], **options) -> bytes:
    """The eStargz blob our converter makes of a tar of ``specs``."""
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d, "in.tar"), Path(d, "out.esgz")
        src.write_bytes(build_tar(specs))
        estargz.convert_layer(str(src), str(dst), estargz.ConvertOptions(**options))
        return dst.read_bytes()


@functools.cache
def every_kind_blob() -> bytes:
    """Every entry kind, files of 0 to 6 chunks of ``CHUNK`` bytes (~11 KB)."""
    return convert(every_kind_specs(), chunk_size=CHUNK)


@functools.cache
def shared_members_blob() -> bytes:
    """Every entry kind with ``--min-chunk-size``: small files share gzip
    members and their TOC entries carry ``innerOffset`` (~9 KB). Members
    are cut by compressed bytes: 1024 gives seven of them, so mutations meet
    member boundaries inside the shared data, not one member holding it all."""
    return convert(every_kind_specs(), chunk_size=CHUNK, min_chunk_size=1024)


@functools.cache
def tiny_chunks_blob() -> bytes:
    """A few small files cut into 1-byte chunks: a member per byte (~4 KB)."""
    specs = [
        Spec("d/", tarfile.DIRTYPE, mode=0o755),
        Spec("d/a", data=b"hello chunks\n"),
        Spec("d/b", data=b"xy"),
        Spec("d/empty", data=b""),
        Spec("d/link", tarfile.SYMTYPE, linkname="a"),
        Spec("d/hard", tarfile.LNKTYPE, linkname="d/a"),
        Spec("d/c", data=pattern(40, 5)),
    ]
    return convert(specs, chunk_size=1)


@functools.cache
def stored_blob() -> bytes:
    """Compression level 0: tar headers and TOC JSON appear as they are in
    the blob, so byte-level changes reach the parsers behind gzip (~14 KB)."""
    specs = [Spec("s/", tarfile.DIRTYPE, mode=0o755),
             Spec("s/one", data=pattern(7, 8), uid=7, uname="seven"),
             Spec("s/two", data=pattern(10, 9), pax={"SCHILY.xattr.user.k": "v"}),
             Spec("s/sym", tarfile.SYMTYPE, linkname="one")]
    return convert(specs, chunk_size=3, compression_level=0)


# --- gzip members ----------------------------------------------------------

def gzip_member(data: bytes, level: int = 6) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def split_members(blob: bytes) -> list[bytes]:
    """The gzip members of ``blob`` in order; the footer is the last one."""
    out, pos, view = [], 0, memoryview(blob)
    while pos < len(blob):
        d = zlib.decompressobj(31)
        d.decompress(view[pos:])
        if not d.eof:
            raise ValueError(f"truncated gzip member at {pos}")
        end = len(blob) - len(d.unused_data)
        out.append(blob[pos:end])
        pos = end
    return out


def gzip_bomb(prefix: bytes, size: int, suffix: bytes = b"",
              fill: bytes = bytes(MiB)) -> bytes:
    """One gzip member of ``prefix``, ``size`` bytes of ``fill`` repeated
    (zeros by default), then ``suffix``.

    About 1 KB per MiB of zeros, built without holding the MiBs: the deflate
    stream repeats one byte-aligned segment compressing 1 MiB of ``fill``
    after a full flush, so that no segment refers back to the one before.
    """
    assert len(fill) == MiB
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff",
             head.compress(prefix) + head.flush(zlib.Z_FULL_FLUSH)]
    crc = zlib.crc32(prefix)
    seg = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = seg.compress(fill) + seg.flush(zlib.Z_FULL_FLUSH)
    for _ in range(size // MiB):
        parts.append(segment)
        crc = zlib.crc32(fill, crc)
    rest = fill[:size % MiB] + suffix
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts.append(tail.compress(rest) + tail.flush())
    crc = zlib.crc32(rest, crc)
    total = len(prefix) + size + len(suffix)
    parts.append(crc.to_bytes(4, "little") + (total & 0xFFFFFFFF).to_bytes(4, "little"))
    return b"".join(parts)


# --- tar pieces ------------------------------------------------------------

def toc_tar(toc_json: bytes, size: int | None = None) -> bytes:
    """The TOC tar entry as the converter writes it, plus the end blocks.
    ``size`` overrides the size the header claims."""
    ti = tarfile.TarInfo(estargz.TOC_TAR_NAME)
    ti.size = len(toc_json) if size is None else size
    ti.mode = 0o644
    return (ti.tobuf(tarfile.USTAR_FORMAT) + toc_json + bytes(-len(toc_json) % 512)
            + bytes(1024))


def special_header(kind: bytes, size: int) -> bytes:
    """A bare header of ``kind`` (PAX ``x``, GNU ``L``...) claiming ``size`` bytes."""
    ti = tarfile.TarInfo("././@Special")
    ti.type = kind
    ti.size = size
    return ti.tobuf(tarfile.USTAR_FORMAT)


def pax_header(records: dict[str, str]) -> bytes:
    """A PAX extended header holding ``records``, for the member after it."""
    # The private helper tarfile itself uses: a PAX header with exactly these records.
    return tarfile.TarInfo()._create_pax_generic_header(  # type: ignore[attr-defined]
        records, tarfile.XHDTYPE, "utf-8")


# --- a blob taken apart ----------------------------------------------------

def dump_toc(toc: dict) -> bytes:
    return json.dumps(toc, indent="\t", ensure_ascii=False).encode("utf-8", "surrogatepass")


@dataclass
class Layout:
    members: list[bytes]            # gzip members before the TOC's
    toc: dict                       # the TOC JSON, parsed
    anchors: dict[int, int] = field(default_factory=dict)  # entry -> member at its offset

    @classmethod
    def of(cls, blob: bytes) -> Layout:
        members = split_members(blob)[:-1]  # without the footer
        toc_offset, _ = estargz.parse_footer(blob[-FOOTER_SIZE:])
        starts = _starts(members)
        k = starts.index(toc_offset)
        toc_tar_bytes = zlib.decompress(members[k], 31)
        size = tarfile.TarInfo.frombuf(toc_tar_bytes[:512], "utf-8", "strict").size
        toc = json.loads(toc_tar_bytes[512:512 + size])
        anchors = {i: starts.index(e["offset"]) for i, e in enumerate(toc["entries"])
                   if e.get("offset")}
        return cls(members[:k], toc, anchors)

    def entry(self, name: str, type: str = "reg", nth: int = 0) -> dict:
        """The ``nth`` TOC entry of ``type`` named ``name`` (chunks: nth chunk)."""
        found = [e for e in self.toc["entries"] if e["name"] == name and e["type"] == type]
        return found[nth]

    def member_of(self, name: str, chunk: int = 0) -> int:
        """Index of the member holding chunk ``chunk`` of file ``name`` (0: the file entry)."""
        data = [i for i, e in enumerate(self.toc["entries"])
                if e["name"] == name and e["type"] in ("reg", "chunk") and e.get("offset")]
        return self.anchors[data[chunk]]

    def unpacked(self, k: int) -> bytes:
        return zlib.decompress(self.members[k], 31)

    def repack(self, k: int, data: bytes, level: int = 6) -> None:
        self.members[k] = gzip_member(data, level)

    def edit_member(self, k: int, edit: Callable[[bytes], bytes]) -> None:
        self.repack(k, edit(self.unpacked(k)))

    def toc_offset(self) -> int:
        return sum(map(len, self.members))

    def fixed_toc(self) -> dict:
        """A copy of the TOC with each offset naming its member where it now is."""
        toc = json.loads(json.dumps(self.toc))  # a deep copy, quickly
        starts = _starts(self.members)
        for i, k in self.anchors.items():
            toc["entries"][i]["offset"] = starts[k]
        return toc

    def blob(self, *, toc: dict | None = None, toc_json: bytes | None = None,
             toc_member: bytes | None = None, after_toc: bytes = b"",
             footer: bytes | None = None) -> bytes:
        """The blob: members, the TOC (this dict with offsets fixed, or these
        exact JSON bytes, or this exact gzip member), then the footer."""
        if toc_member is None:
            if toc_json is None:
                if toc is None:
                    toc = self.fixed_toc()
                toc_json = dump_toc(toc)
            toc_member = gzip_member(toc_tar(toc_json))
        body = b"".join(self.members)
        return (body + toc_member + after_toc
                + (estargz.footer_bytes(len(body)) if footer is None else footer))


def _starts(members: list[bytes]) -> list[int]:
    out, pos = [], 0
    for m in members:
        out.append(pos)
        pos += len(m)
    return out


def header_span(layout: Layout, name: str) -> tuple[int, bytes, tarfile.TarInfo]:
    """(member index, the header bytes of ``name`` in it, its TarInfo).

    The converter writes the headers between two payloads into one member,
    so a header (with any PAX header before it) lies within one member.
    """
    upos = 0  # where member k starts in the uncompressed tar stream
    for k in range(len(layout.members)):
        data = layout.unpacked(k)
        first = -upos % 512
        upos += len(data)
        for at in range(first, len(data) - 511, 512):
            block = data[at:at + 512]
            try:
                ti = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                continue
            if ti.name == name and ti.type != tarfile.XHDTYPE:
                # Include a PAX header directly in front, if any.
                start = at
                for back in range(at - 512, first - 1, -512):
                    try:
                        prev = tarfile.TarInfo.frombuf(data[back:back + 512], "utf-8",
                                                       "surrogateescape")
                    except tarfile.HeaderError:
                        continue
                    padded = -(-prev.size // 512) * 512
                    if prev.type == tarfile.XHDTYPE and back + 512 + padded == at:
                        start = back
                    break
                return k, data[start:at + 512], ti
    raise KeyError(name)


def replace_header(layout: Layout, name: str, header: bytes) -> None:
    """Put ``header`` (any number of blocks) where the header of ``name`` is."""
    k, old, _ = header_span(layout, name)
    data = layout.unpacked(k)
    assert data.count(old) == 1
    layout.repack(k, data.replace(old, header))


# --- the CLI, with peak RSS -------------------------------------------------

# Run as ``python3 -I -S -c``: fork, exec the command, write os.wait4's exit
# code and ru_maxrss (KiB) to argv[1]. Measured from pytest directly, a child
# started with vfork() would report pytest's own peak RSS; after a real
# fork() of this tiny trampoline it reports only its own.
TRAMPOLINE = r"""
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, st, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write("%d %d" % (os.waitstatus_to_exitcode(st), ru.ru_maxrss))
"""


@dataclass
class Run:
    code: int
    out: str
    err: str
    rss_mib: float


def run_measured(*args: object) -> Run:
    """Run ``python -m estargz ARGS``: exit code, output and peak RSS in MiB."""
    with tempfile.TemporaryDirectory() as d:
        res = Path(d, "rusage")
        p = subprocess.run([sys.executable, "-I", "-S", "-c", TRAMPOLINE, str(res),
                            sys.executable, "-m", "estargz", *map(str, args)],
                           capture_output=True, cwd=REPO, stdin=subprocess.DEVNULL)
        assert p.returncode == 0 and res.exists(), p.stderr.decode(errors="replace")
        code, rss_kib = map(int, res.read_text().split())
    return Run(code, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"),
               rss_kib / 1024)


def assert_clean_failure(run: Run, *fragments: str) -> None:
    """Exit 1 with exactly one ``estargz: error:`` line holding ``fragments``,
    no traceback and nothing on stdout."""
    lines = run.err.splitlines()
    assert run.code == 1, f"exit {run.code}: {run.err[-2000:]}"
    assert "Traceback" not in run.err, run.err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("estargz: error: "), run.err[-2000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert run.out == ""
