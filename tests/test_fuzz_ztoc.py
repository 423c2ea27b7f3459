"""Mutation fuzzing of zTOCs: nothing but a one-line EstargzError.

The same rules as tests/test_fuzz.py (its byte operators are reused).
Hypothesis draws a seed zTOC and one to four mutations on one target:

* ``bytes``: the zTOC's bytes as they are. The plain-tar seed is nearly all
  flatbuffer structure (its "checkpoints" are a 40-byte flatbuffer); the
  gzip seeds are mostly 32 KiB windows, so
* ``structure``: the gzip seeds' bytes outside the checkpoints blob (vtables,
  offsets, strings, the file table), edited with the blob kept whole;
* ``model``: a field of the model set to a hostile value (a checkpoint's
  offsets or bits, the checkpoint count, ``max_span_id``, a digest, a file's
  offset or size), then marshalled: structure that is valid flatbuffers but
  wrong as a zTOC.

Each mutated zTOC goes through ``unmarshal_ztoc`` and, when it opens, every
span through ``span_range``/``span_uncompressed_start``/``span_of`` and the
checkpoints decoded. Anything but an EstargzError with a one-line message
fails, as does an example longer than HANG_SECONDS. Derandomized; 3 000
examples, a few seconds.

And the builder: 600 mutated layers (the gzip bytes, the tar before
compression, a plain tar layer) go through ``build_ztoc``: refused in one
line, or a zTOC that round-trips.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Spec, build_tar, every_kind_specs, pattern
from estargz import EstargzError
from estargz._exceptions import InvalidInput
from estargz.layer.ztoc import Ztoc, build_ztoc, marshal_ztoc, unmarshal_ztoc
from test_fuzz import BYTE_OP, HANG_SECONDS, apply_byte_op, time_limit


def _tar() -> bytes:
    return build_tar(every_kind_specs() + [Spec("big", data=pattern(200_000, 3))])


@functools.cache
def seed_ztoc(name: str) -> Ztoc:
    if name == "plain":
        return build_ztoc(io.BytesIO(_tar()), span_size=4096, compression="uncompressed")
    span = {"gzip-1-span": 1 << 22, "gzip-3-spans": 65536}[name]
    return build_ztoc(io.BytesIO(gzip.compress(_tar(), 1, mtime=0)), span_size=span)


SEEDS = ["plain", "gzip-1-span", "gzip-3-spans"]
EXAMPLES = {"bytes": 1200, "structure": 1000, "model": 800}
HOSTILE = st.sampled_from([0, 1, 7, 8, 255, -1, -(1 << 31), (1 << 31) - 1, 1 << 40,
                           -(1 << 63), (1 << 63) - 1])
MODEL_OP = st.tuples(
    st.sampled_from(["cp_in", "cp_out", "cp_bits", "cp_count", "cp_span", "max_span",
                     "digest", "file_offset", "file_size", "sizes", "algorithm"]),
    st.integers(0, 1 << 20), HOSTILE)


def apply_model_op(z: Ztoc, op: tuple) -> Ztoc:
    """``z`` with one field set to a hostile value (``op``: what, where, value)."""
    what, where, value = op
    blob = bytearray(z.checkpoints)
    n_cp = (len(blob) - 12) // (17 + 32768) if z.compression_algorithm == "gzip" else 0
    at = 12 + (where % n_cp) * (17 + 32768) if n_cp else 0
    try:
        if what == "cp_in" and n_cp:
            struct.pack_into("<q", blob, at, value)
        elif what == "cp_out" and n_cp:
            struct.pack_into("<q", blob, at + 8, value)
        elif what == "cp_bits" and n_cp:
            blob[at + 16] = value & 0xFF
        elif what == "cp_count" and n_cp:
            struct.pack_into("<i", blob, 0, value)
        elif what == "cp_span" and n_cp:
            struct.pack_into("<q", blob, 4, value)
        elif what == "max_span":
            return dataclasses.replace(z, max_span_id=value)
        elif what == "digest" and z.span_digests:
            digests = list(z.span_digests)
            digests[where % len(digests)] = ["", "sha256:", "sha256:" + "g" * 64,
                                             "sha512:" + "0" * 128][value % 4]
            return dataclasses.replace(z, span_digests=tuple(digests))
        elif what in ("file_offset", "file_size") and z.files:
            files = list(z.files)
            i = where % len(files)
            field = "uncompressed_offset" if what == "file_offset" else "uncompressed_size"
            files[i] = dataclasses.replace(files[i], **{field: value})
            return dataclasses.replace(z, files=tuple(files))
        elif what == "sizes":
            return dataclasses.replace(z, compressed_archive_size=value,
                                       uncompressed_archive_size=value)
        elif what == "algorithm":
            return dataclasses.replace(z, compression_algorithm=(
                "uncompressed" if z.compression_algorithm == "gzip" else "gzip"))
    except struct.error:
        return z  # a value the field cannot hold at all
    return dataclasses.replace(z, checkpoints=bytes(blob))


def marshal_or_none(z: Ztoc) -> bytes | None:
    """The flatbuffer of ``z``, or None when marshal refuses a value that
    does not fit its field (in one line)."""
    try:
        return marshal_ztoc(z)
    except InvalidInput as e:
        assert "\n" not in str(e) and "does not fit" in str(e), str(e)
        return None


def mutate(target: str, seed: str, ops: list) -> bytes | None:
    z = seed_ztoc(seed)
    if target == "model":
        for op in ops:
            z = apply_model_op(z, op)
        return marshal_or_none(z)
    data = marshal_ztoc(z)
    if target == "bytes":
        for op in ops:
            data = apply_byte_op(data, op)
        return data
    start = data.index(z.checkpoints)
    head, tail = data[:start], data[start + len(z.checkpoints):]
    for i, op in enumerate(ops):
        if i % 2:
            tail = apply_byte_op(tail, op)
        else:
            head = apply_byte_op(head, op)
    return head + z.checkpoints + tail


@functools.cache
def seed_layer() -> bytes:
    return gzip.compress(_tar(), 6, mtime=0)


def mutate_layer(target: str, ops: list) -> tuple[bytes, str]:
    """A mutated layer: its gzip bytes, or its tar recompressed, or the tar
    itself as an uncompressed layer."""
    data = seed_layer() if target == "layer-gzip" else _tar()
    for op in ops:
        data = apply_byte_op(data, op)
    if target == "layer-tar":
        return gzip.compress(data, 1, mtime=0), "gzip"
    return data, "uncompressed" if target == "layer-plain" else "gzip"


def exercise_layer(layer: bytes, compression: str) -> None:
    """build_ztoc refuses in one line, or builds a zTOC that round-trips."""
    try:
        z = build_ztoc(io.BytesIO(layer), span_size=8192, compression=compression)
    except EstargzError as e:
        assert "\n" not in str(e), repr(str(e))
        return
    assert unmarshal_ztoc(marshal_ztoc(z)) == z


@pytest.mark.parametrize("target", ["layer-gzip", "layer-tar", "layer-plain"])
def test_mutated_layers_build_or_refuse_in_one_line(target):
    """Hostile layers: build_ztoc (the gzip walk over libz, the tar walk,
    the file table) refuses in one line or writes a zTOC we read back."""
    count = 0

    @settings(max_examples=200, deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    @given(ops=st.lists(BYTE_OP, min_size=1, max_size=3))
    def check(ops):
        nonlocal count
        count += 1
        layer, compression = mutate_layer(target, ops)
        with time_limit(HANG_SECONDS):
            exercise_layer(layer, compression)

    check()
    assert count >= 200


def exercise(data: bytes) -> None:
    try:
        z = unmarshal_ztoc(data)
    except EstargzError as e:
        assert "\n" not in str(e), repr(str(e))
        return
    try:
        assert len(z.decoded_checkpoints) <= z.max_span_id + 1
        for span in range(z.max_span_id + 1):
            z.span_range(span)
            z.span_of(z.span_uncompressed_start(span))
        for f in z.files:
            z.span_of(f.uncompressed_offset + f.uncompressed_size)
    except EstargzError as e:
        assert "\n" not in str(e), repr(str(e))


@pytest.mark.parametrize("target", list(EXAMPLES))
def test_mutated_ztocs_raise_only_estargz_errors(target):
    count = 0
    ops = MODEL_OP if target == "model" else BYTE_OP
    seeds = ["gzip-1-span", "gzip-3-spans"] if target == "structure" else SEEDS

    @settings(max_examples=EXAMPLES[target], deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    @given(seed=st.sampled_from(seeds), ops=st.lists(ops, min_size=1, max_size=4))
    def check(seed, ops):
        nonlocal count
        count += 1
        data = mutate(target, seed, ops)
        if data is not None:
            with time_limit(HANG_SECONDS):
                exercise(data)

    check()
    assert count >= EXAMPLES[target]


def test_seeds_open_and_mutations_are_refused():
    """The seeds open; a few mutations every reader must refuse are refused,
    so the fuzzing above runs on zTOCs that reach the deeper checks."""
    for name in SEEDS:
        z = seed_ztoc(name)
        assert unmarshal_ztoc(marshal_ztoc(z)) == z
    z = seed_ztoc("gzip-3-spans")
    assert z.max_span_id == 2
    for op in [("cp_count", 0, 7), ("cp_bits", 1, 8), ("cp_in", 2, -1), ("max_span", 0, 7),
               ("digest", 1, 2), ("file_offset", 3, 1), ("algorithm", 0, 0)]:
        data = marshal_or_none(apply_model_op(z, op))
        assert data is not None
        with pytest.raises(EstargzError) as e:
            unmarshal_ztoc(data)
        assert str(e.value).startswith("invalid zTOC: "), (op, str(e.value))
    for data in (b"", bytes(8), b"\xff" * 64, marshal_ztoc(z)[:100]):
        with pytest.raises(EstargzError):
            unmarshal_ztoc(data)
