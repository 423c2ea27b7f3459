"""Converting a tar layer into an eStargz blob.

How the output is built (see docs/format.md for the picture):

1. The input is indexed (headers only) and ordered (``order.py``).
2. The ordered entries are cut into *units*. A unit is one gzip member:
   optionally one chunk of a file's payload, followed by the tar padding and
   the headers of the entries up to the next payload. This is the layout
   the reference writes, so every payload chunk starts a gzip member.
   With a minimum chunk size, the chunks that follow share the member until
   it holds that many compressed bytes (the reference's rule); their TOC
   entries carry the member's offset and an ``innerOffset``. The plan is
   fixed before any compression (the compressed size is estimated by a
   level-1 deflate while planning, ``units._MemberSize``), so units still
   compress in parallel and the output does not depend on the number of
   workers.
3. Units are compressed independently by a thread pool (zlib releases the
   GIL), in bounded batches; the main thread writes them in order, hashing
   the compressed bytes (blob digest), while a thread of its own hashes the
   uncompressed ones (diff_id, ``streamhash.py``).

Because a unit's bytes depend only on the input and the options, the output
is byte-identical for any number of workers.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, BinaryIO

from .._cancel import check_cancelled
from .._exceptions import (
    InvalidInput,
    MissingPrioritizedFiles,
    StorageError,
    TOCError,
    UnsupportedEntry,
)
from .._fsutil import atomic_output
from .._progress import Meter, progress_meter
from .compression import DEFAULT_BACKEND, Backend, get_backend
from .footer import external_toc_footer_bytes, footer_bytes
from .layerinput import open_tar
from .order import Landmark, Planned, dedupe, plan_order
from .streamhash import StreamHash
from .tarstream import index_tar, printable
from .toc import (
    MAX_TOC_JSON_SIZE,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    TOCEntry,
    clean_name,
    encode_entry,
    encode_toc,
)
from .units import (
    READ_SIZE,
    Data,
    Unit,
    entry_header,
    padding,
    plan_units,
    read_payload,
)

DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_LEVEL = 9
#: The most compression threads: each may have three batches of about
#: 1 MiB in flight, so this bounds that memory (768 MiB) and the threads
#: started; more threads than cores gains nothing.
MAX_WORKERS = 256
#: The TOC member is compressed at most at this level. zlib-ng's level 9
#: compresses TOC JSON worse than its level 8 (Debian minbase's 2.05 MB TOC:
#: 349 KB at 9, 313 KB at 8; stdlib zlib: 330 184 at 9, 330 224 at 8), and
#: every lazy pull fetches the TOC before the layer can mount. Payload chunks
#: keep the asked level: there zlib-ng's 9 is 1.7 % smaller than its 8.
TOC_MAX_LEVEL = 8
# Units are batched into tasks of about this much input, to keep the
# per-task overhead small for layers of many tiny files.
_TASK_BYTES = 1 << 20
_TASK_UNITS = 256
# Compressed units larger than this go to a temporary file, not memory.
_SPILL = 16 << 20
# The writer passes output on in pieces of about this size (see _Writer.write).
_WRITE_BYTES = 1 << 20


@dataclass(frozen=True)
class ConvertOptions:
    """Options of a layer conversion (the CLI's flags, one for one)."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    compression_level: int = DEFAULT_LEVEL
    #: Threads compressing in parallel; 0 means one per available core.
    workers: int = 0
    #: Paths to put first, in this order; ``None`` puts nothing first.
    prioritized_files: Sequence[str] | None = None
    #: Warn about (instead of failing on) prioritized paths not in the layer.
    allow_missing: bool = False
    #: Deflate implementation: ``"zlib-ng"`` (default), ``"zlib"`` or ``"isal"``.
    backend: str = DEFAULT_BACKEND
    #: Chunks share a gzip member until it holds this many compressed
    #: bytes, as the reference counts them (0: every chunk starts its own).
    #: Landmarks and prioritized files always start their own.
    min_chunk_size: int = 0
    #: Write the TOC to a separate TOC blob, not into the layer (the
    #: reference's external TOC; ``convert_layer``'s ``toc_dst``).
    external_toc: bool = False
    #: Lossless: the uncompressed layer is the input tar byte for byte, so
    #: the diff_id stays; nothing is reordered and no landmark is added.
    #: Needs ``external_toc`` (the TOC cannot be inside the tar).
    keep_diff_id: bool = False
    #: Output format: ``"estargz"`` or ``"zstd:chunked"`` (see ``zstdchunked.py``).
    format: str = "estargz"
    #: zstd level (1-22) for ``zstd:chunked``; ``compression_level`` is gzip's.
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise InvalidInput(f"chunk size must be positive, not {self.chunk_size}")
        if self.min_chunk_size < 0:
            raise InvalidInput(f"min chunk size must be 0 or more, not {self.min_chunk_size}")
        if self.keep_diff_id and not self.external_toc:
            raise InvalidInput("keep_diff_id needs external_toc: a TOC inside the layer "
                               "would change its uncompressed bytes")
        if self.keep_diff_id and self.prioritized_files:
            raise InvalidInput("keep_diff_id keeps the input's order, so it cannot put "
                               "prioritized files first")
        if not 0 <= self.compression_level <= 9:
            raise InvalidInput(f"compression level must be 0-9, not {self.compression_level}")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise InvalidInput(f"workers must be 0 (all cores) to {MAX_WORKERS}, "
                               f"not {self.workers}")
        if self.format not in FORMATS:
            raise InvalidInput(f"unknown format {self.format!r} (choose from {', '.join(FORMATS)})")
        if self.format != "estargz" and (self.min_chunk_size or self.external_toc
                                         or self.keep_diff_id):
            # Shared gzip members and a gzip TOC blob are eStargz's layout;
            # another format's writer would silently ignore them.
            raise InvalidInput(f"min_chunk_size, external_toc and keep_diff_id are for "
                               f"eStargz; {self.format} has no streams to share or TOC "
                               "to move")
        if not 1 <= self.zstd_level <= 22:
            raise InvalidInput(f"zstd compression level must be 1-22, not {self.zstd_level}")


@dataclass(frozen=True)
class LayerResult:
    """What a manifest needs to describe the converted layer."""

    blob_digest: str
    blob_size: int
    diff_id: str
    toc_digest: str
    uncompressed_size: int
    entries: int
    prioritized: int
    missing: tuple[str, ...] = field(default=())
    seconds: float = 0.0
    #: Compressed bytes before ``.prefetch.landmark``: what the snapshotter
    #: prefetches (0 for a layer converted without prioritized files).
    prefetch_size: int = 0
    #: Compressed bytes of the TOC member and the footer, which a lazy
    #: puller reads before anything else (with an external TOC: the TOC
    #: blob and the footer).
    toc_size: int = 0
    #: With an external TOC: digest and size of the TOC blob.
    toc_blob_digest: str = ""
    toc_blob_size: int = 0
    #: Layer descriptor annotations the format needs besides the TOC digest
    #: (zstd:chunked's ``io.github.containers.zstd-chunked.*``).
    annotations: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["missing"] = list(self.missing)
        if not self.annotations:
            del d["annotations"]
        return d


#: Output formats: name -> writer(fd, planned, out, options) returning the
#: result fields. eStargz is built in; ``zstdchunked.py`` registers itself
#: (it builds on this module, so this module cannot import it).
FORMATS: dict[str, Any] = {"estargz": None}


def register_format(name: str, writer: Any) -> None:
    """Make ``ConvertOptions(format=name)`` write with ``writer``."""
    FORMATS[name] = writer


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def convert_layer(src: str, dst: str, options: ConvertOptions = ConvertOptions(),
                  *, tmpdir: str | None = None, toc_dst: str | None = None) -> LayerResult:
    """Convert the layer at ``src`` (tar, tar+gzip or tar+zstd; ``"-"`` for
    stdin) into an eStargz blob at ``dst``.

    ``dst`` (and ``toc_dst``, the TOC blob, required with
    ``options.external_toc``) appear atomically when the conversion succeeds
    and are left untouched otherwise. Raises :class:`MissingPrioritizedFiles`
    for prioritized paths not in the layer unless ``options.allow_missing``.
    """
    started = time.monotonic()
    if options.external_toc != (toc_dst is not None):
        raise InvalidInput("an external TOC needs a TOC blob destination, and only it")
    backend = get_backend(options.backend, options.compression_level)
    with open_tar(src, tmpdir) as tar:
        indexed = list(index_tar(tar))
        missing: list[str] = []
        if options.keep_diff_id:
            members = indexed
            planned: list[Planned] = list(_lossless_members(indexed))
        else:
            members = dedupe(indexed)
            planned, missing = plan_order(members, options.prioritized_files)
        if missing and not options.allow_missing:
            raise MissingPrioritizedFiles(missing)
        check_toc_fits(planned, options.chunk_size)
        with atomic_output(dst) as out:
            writer = FORMATS[options.format]
            if writer is not None:
                result = writer(tar.fileno(), planned, out, options)
            elif toc_dst is None:
                result = write_estargz(tar.fileno(), planned, out, options, backend)
            else:
                with atomic_output(toc_dst) as toc_out:
                    result = write_estargz(tar.fileno(), planned, out, options, backend,
                                           toc_out=toc_out)
    # A lossless (keep_diff_id) layer has no landmark: nothing is put first.
    landmarks = [i for i, p in enumerate(planned) if isinstance(p, Landmark)]
    return LayerResult(**{**result, "entries": len(members),
                          "prioritized": landmarks[0] if landmarks else 0,
                          "missing": tuple(missing),
                          "seconds": round(time.monotonic() - started, 3)})


def _lossless_members(members: Sequence[tarfile.TarInfo]) -> Iterator[tarfile.TarInfo]:
    """The input's entries as they are, refusing what a lossless layer
    cannot describe: a TOC of its own, a name twice (the TOC could not tell
    them apart), sparse data (stored bytes differ from the file's)."""
    seen: set[str] = set()
    for m in members:
        name = clean_name(m.name)
        if name == TOC_TAR_NAME:
            raise UnsupportedEntry(TOC_TAR_NAME, "is already in the layer; --keep-diff-id "
                                   "cannot replace it without changing the layer")
        if name in seen and not m.isdir():
            raise UnsupportedEntry(printable(m.name), "occurs twice in the layer, which "
                                   "--keep-diff-id cannot record in a TOC")
        if m.sparse:
            raise UnsupportedEntry(printable(m.name), "is a sparse file, whose stored bytes "
                                   "--keep-diff-id cannot keep")
        seen.add(name)
        yield m


# Lower bounds of a TOC entry's JSON: any entry has a name, a type and
# punctuation; a data chunk also a 78-character sha256 chunk digest.
_MIN_ENTRY_JSON = 40
_MIN_CHUNK_JSON = 100


def check_toc_fits(planned: Sequence[Planned], chunk_size: int) -> None:
    """Refuse, before anything is written, a layer whose TOC would exceed
    ``MAX_TOC_JSON_SIZE`` -- a blob every reader (ours, the snapshotter)
    refuses -- judged by a lower bound of its size: a very small chunk size
    on a large layer, or millions of entries."""
    least = 0
    for m in planned:
        if isinstance(m, tarfile.TarInfo) and m.isreg() and m.size:
            least += -(-m.size // chunk_size) * _MIN_CHUNK_JSON
        else:
            least += _MIN_ENTRY_JSON
    if least > MAX_TOC_JSON_SIZE:
        raise InvalidInput(f"the TOC would be over {least} bytes at a chunk size of "
                           f"{chunk_size}, more than the {MAX_TOC_JSON_SIZE} bytes readers "
                           "accept; use a larger chunk size")


class _Compressed:
    """A unit's compressed bytes, in memory or spilled to a temporary file."""

    __slots__ = ("parts", "size", "spill", "chunk_digests", "chunk_sums")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.spill: BinaryIO | None = None
        self.chunk_digests: list[str] = []
        self.chunk_sums: list[int] = []

    def add(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.spill is None and self.size > _SPILL:
            self.spill = tempfile.TemporaryFile()  # noqa: SIM115  (closed in close())
            for p in self.parts:
                self.spill.write(p)
            self.parts = []
        if self.spill is not None:
            self.spill.write(data)
        else:
            self.parts.append(data)

    def chunks(self) -> Iterator[bytes]:
        if self.spill is None:
            yield from self.parts
            return
        self.spill.seek(0)
        while True:
            data = self.spill.read(READ_SIZE)
            if not data:
                break
            yield data
        self.spill.close()


#: A format's checksum of a chunk, as ``sum(data, sum_so_far)`` from 0.
ChunkSum = Callable[[bytes, int], int]


def _compress_task(fd: int, units: list[Unit], backend: Backend,
                   chunk_sum: ChunkSum | None = None) -> list[_Compressed]:
    """Compress ``units``, each chunk's digest (and ``chunk_sum``) taken
    from the same read of its payload."""
    results = []
    for u in units:
        c = _Compressed()
        z = backend.compressobj()
        for p in u.pieces:
            if isinstance(p, Data):
                h = hashlib.sha256()
                total = 0
                for piece in read_payload(fd, p.member, p.start, p.length):
                    check_cancelled()
                    h.update(piece)
                    if chunk_sum is not None:
                        total = chunk_sum(piece, total)
                    c.add(z.compress(piece))
                c.chunk_digests.append("sha256:" + h.hexdigest())
                c.chunk_sums.append(total)
            else:
                c.add(z.compress(bytes(p)))
        c.add(z.flush())
        results.append(c)
    return results


def _batches(units: Iterator[Unit]) -> Iterator[list[Unit]]:
    batch: list[Unit] = []
    size = 0
    for u in units:
        batch.append(u)
        size += u.size
        if size >= _TASK_BYTES or len(batch) >= _TASK_UNITS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _Writer:
    """Writes compressed units in order and keeps the running digests."""

    #: The format's checksum of each chunk, computed by the pool as it
    #: compresses (None: the format has none).
    chunk_sum: ChunkSum | None = None

    def __init__(self, out: BinaryIO, fd: int, diff: StreamHash) -> None:
        self.out = out
        self.fd = fd
        self.offset = 0
        self.blob = hashlib.sha256()
        self._out_parts: list[bytes] = []  # written, not yet passed to out
        self._out_size = 0
        self.diff = diff
        self.usize = 0
        # Each entry's JSON as UTF-8 bytes: no bigger than the text, and
        # encode_toc joins them with a single copy.
        self.toc_parts: list[bytes] = []
        self._held: list[TOCEntry] = []  # entries waiting for a file digest
        self._file_hash: hashlib._Hash | None = None
        self._file_entry: TOCEntry | None = None
        self.landmark_offset = 0

    #: How a TOC entry is written (a format may add fields).
    encode_entry = staticmethod(encode_entry)

    def chunk_summed(self, d: Data, value: int) -> None:
        """Called with each chunk's ``chunk_sum``, in order."""

    def file_done(self, entry: TOCEntry) -> None:
        """Called once the last chunk of ``entry``'s payload is written."""

    def write(self, data: bytes) -> None:
        """Append ``data`` to the blob. Written and hashed in pieces of
        about a MiB: each write and hash releases the GIL, and getting it
        back from the pool's threads is what a write per unit cost (half
        the main thread's time in zstd:chunked, thousands of small frames)."""
        self._out_parts.append(data)
        self._out_size += len(data)
        self.offset += len(data)
        if self._out_size >= _WRITE_BYTES:
            self._flush()

    def _flush(self) -> None:
        data = b"".join(self._out_parts)
        self._out_parts, self._out_size = [], 0
        try:
            self.out.write(data)
        except OSError as e:
            raise StorageError(f"cannot write output: {e.strerror or e}") from None
        self.blob.update(data)

    def blob_digest(self) -> str:
        """The digest of the blob written so far, all of it written out."""
        self._flush()
        return "sha256:" + self.blob.hexdigest()

    def unit(self, u: Unit, c: _Compressed) -> None:
        digests, sums = iter(c.chunk_digests), iter(c.chunk_sums)
        done: list[TOCEntry] = []  # files whose last chunk is in this unit
        for p in u.pieces:
            if isinstance(p, Data):
                file = self._chunk(p, next(digests))
                if self.chunk_sum is not None:
                    self.chunk_summed(p, next(sums))
                if file is not None:
                    done.append(file)
            else:
                self.diff.update(p)
                self.usize += len(p)
        for data in c.chunks():
            self.write(data)
        for file in done:
            self.file_done(file)
        self._held.extend(u.entries)
        if self._file_hash is None:  # every held entry is complete now
            try:
                self.toc_parts.extend(self.encode_entry(e).encode("utf-8")
                                      for e in self._held)
            except UnicodeEncodeError:
                raise TOCError("TOC contains a name that is not valid UTF-8") from None
            self._held.clear()

    def _chunk(self, d: Data, chunk_digest: str) -> TOCEntry | None:
        """Fill in the TOC entry of chunk ``d`` of the unit starting here,
        and hash its payload into the diff_id (and its file's digest).
        Returns the file's entry if this was its last chunk."""
        e = d.entry
        file = e if d.start == 0 else self._file_entry
        e.offset = self.offset
        e.inner_offset = d.inner
        if e.name == PREFETCH_LANDMARK:
            self.landmark_offset = self.offset
        e.chunk_digest = chunk_digest
        size = e.size if e.type == "reg" else 0
        if d.start == 0 and d.length == size:
            e.digest = chunk_digest
        elif d.start == 0:
            self._file_hash, self._file_entry = hashlib.sha256(), e
        self.diff.payload(d.member, d.start, d.length)
        if self._file_hash is not None:  # a file of several chunks, hashed whole
            for piece in read_payload(self.fd, d.member, d.start, d.length):
                self._file_hash.update(piece)
        self.usize += d.length
        entry = self._file_entry
        if self._file_hash is not None and entry is not None \
                and d.start + d.length == entry.size:
            entry.digest = "sha256:" + self._file_hash.hexdigest()
            self._file_hash = self._file_entry = None
        return file if file is not None and d.start + d.length == file.size else None


def write_estargz(fd: int, planned: Sequence[Planned], out: BinaryIO,
                  options: ConvertOptions, backend: Backend,
                  toc_out: BinaryIO | None = None) -> dict[str, Any]:
    """Write the eStargz blob for ``planned`` entries (payloads read from
    ``fd``) to ``out``, and with ``options.external_toc`` its TOC blob to
    ``toc_out``. Returns the digests and sizes as a dict."""
    with StreamHash(fd) as diff:
        return _write_estargz(_Writer(out, fd, diff), planned, options, backend, toc_out)


def _write_estargz(writer: _Writer, planned: Sequence[Planned], options: ConvertOptions,
                   backend: Backend, toc_out: BinaryIO | None) -> dict[str, Any]:
    landmarks = [i for i, p in enumerate(planned) if isinstance(p, Landmark)]
    # An external TOC leaves the layer's tar without its last entry: end it
    # with the two zero blocks every tar reader expects (lossless: the
    # input's own end, read with the headers).
    units = plan_units(planned, options.chunk_size, entry_header, options.min_chunk_size,
                        fresh=landmarks[0] if landmarks else -1,
                        fd=writer.fd, lossless=options.keep_diff_id,
                        trailer=bytes(2 * tarfile.BLOCKSIZE) if options.external_toc else b"")
    write_units(writer, planned, units, backend, options.workers)

    toc_json = encode_toc(writer.toc_parts)
    writer.toc_parts = []
    if len(toc_json) > MAX_TOC_JSON_SIZE:  # over check_toc_fits's lower bound
        raise InvalidInput(f"the TOC is {len(toc_json)} bytes, more than the "
                           f"{MAX_TOC_JSON_SIZE} bytes readers accept; use a larger "
                           "chunk size")
    toc_offset = writer.offset
    toc_header = tarfile.TarInfo(TOC_TAR_NAME)
    toc_header.size = len(toc_json)
    toc_header.mode = 0o644
    # Compressed piece by piece: no second copy of the TOC in memory.
    z = replace(backend, level=min(backend.level, TOC_MAX_LEVEL)).compressobj()
    member = []
    for piece in (toc_header.tobuf(tarfile.USTAR_FORMAT), toc_json,
                  padding(len(toc_json)) + bytes(2 * tarfile.BLOCKSIZE)):
        member.append(z.compress(piece))
        if toc_out is None:
            writer.diff.update(piece)
            writer.usize += len(piece)
    member.append(z.flush())
    toc_blob: dict[str, Any] = {}
    if toc_out is None:
        writer.write(b"".join(member))
        writer.write(footer_bytes(toc_offset))
    else:
        data = b"".join(member)
        try:
            toc_out.write(data)
        except OSError as e:
            raise StorageError(f"cannot write the TOC blob: {e.strerror or e}") from None
        writer.write(external_toc_footer_bytes())
        toc_blob = {"toc_blob_digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                    "toc_blob_size": len(data)}
    return {
        "blob_digest": writer.blob_digest(),
        "blob_size": writer.offset,
        "diff_id": "sha256:" + writer.diff.hexdigest(),
        "toc_digest": "sha256:" + hashlib.sha256(toc_json).hexdigest(),
        "uncompressed_size": writer.usize,
        "prefetch_size": writer.landmark_offset,
        "toc_size": writer.offset - toc_offset + toc_blob.get("toc_blob_size", 0),
        **toc_blob,
    }


def write_units(writer: _Writer, planned: Sequence[Planned], units: Iterator[Unit],
                backend: Backend, workers: int = 0) -> None:
    """Compress ``units`` (cut from ``planned``) in a pool of ``workers``
    threads (0: one per core), a few batches ahead of the writer, and hand
    them to ``writer`` in order: the pipeline of every format."""
    workers = workers or available_cores()
    written = payload_meter(planned)
    pending: deque[tuple[list[Unit], Future[list[_Compressed]]]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="estargz")
    try:
        for batch in _batches(units):
            check_cancelled()
            while len(pending) >= 3 * workers:
                _drain_one(pending, writer, written)
            pending.append((batch, pool.submit(_compress_task, writer.fd, batch, backend,
                                               writer.chunk_sum)))
        while pending:
            _drain_one(pending, writer, written)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _drain_one(pending: deque[tuple[list[Unit], Future[list[_Compressed]]]],
               writer: _Writer, written: Meter) -> None:
    batch, future = pending.popleft()
    for u, c in zip(batch, future.result(), strict=True):
        writer.unit(u, c)
        written.add(sum(p.length for p in u.pieces if isinstance(p, Data)))


def payload_meter(planned: Sequence[Planned]) -> Meter:
    """The ``compress`` phase's meter: payload bytes (landmarks' included)
    against all of them."""
    return progress_meter("compress", sum(
        len(m.contents) if isinstance(m, Landmark) else m.size if m.isreg() else 0
        for m in planned))
