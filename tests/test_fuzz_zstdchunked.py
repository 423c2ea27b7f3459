"""Mutation fuzzing of zstd:chunked blobs: nothing but an EstargzError.

The same rules as tests/test_fuzz.py for eStargz (its mutation operators are
reused): Hypothesis draws a seed (every entry kind in ``CHUNK``-byte chunks;
small files in 1-byte chunks: a frame per byte), one to four mutations and a
target:

* ``blob``: the blob's bytes as they are (footer, skippable frames, frames);
* ``data``: the frames before the TOC, then every position recomputed, so
  the footer and TOC still open and the mutation reaches the frame decoder,
  the tar parser and the digest checks;
* ``toc``: the TOC as JSON (test_fuzz's JSON operators, plus hostile
  ``endOffset`` and ``tarSplitDigest`` values), recompressed;
* ``tarsplit``: the tar-split data's bytes, recompressed, its digest in the
  TOC updated, so the mutation reaches the tar-split checks.

Each mutated blob goes through ``verify_layer``, ``open_layer`` (every file
read) and ``layer ls``; anything but a one-line EstargzError fails, as does
an example running longer than HANG_SECONDS. Derandomized; 4 200 examples,
under a minute on one busy core.
"""

from __future__ import annotations

import functools
import json

import pytest
import zstandard
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blobcraft
from conftest import CHUNK, Spec, every_kind_specs, pattern
from estargz import BytesSource, EstargzError
from estargz.cli import main
from estargz.layer.zstdreader import open_layer, verify_layer
from test_fuzz import BYTE_OP, HANG_SECONDS, JSON_OP, apply_byte_op, apply_json_op, time_limit
from test_zstdchunked import _pos, _tarsplit, rebuild


@functools.cache
def every_kind_zstd() -> bytes:
    return blobcraft.convert(every_kind_specs(), chunk_size=CHUNK, format="zstd:chunked")


@functools.cache
def tiny_chunks_zstd() -> bytes:
    return blobcraft.convert([Spec("d/a", data=b"hello chunks\n"), Spec("d/b", data=b"xy"),
                              Spec("d/c", data=pattern(40, 5))],
                             chunk_size=1, format="zstd:chunked")


SEEDS = {"every-kind": every_kind_zstd, "1-byte-chunks": tiny_chunks_zstd}
EXAMPLES = {"blob": 1200, "data": 1200, "toc": 1000, "tarsplit": 800}
TOC_OP = JSON_OP | st.tuples(
    st.just("set"), st.integers(0, 1 << 20),
    st.tuples(st.just("endOffset"), st.sampled_from([0, 1, 10, 2**40, -1, "x", None])))
TOP_OP = st.tuples(st.just("top"), st.just("tarSplitDigest"),
                   st.sampled_from(["", "sha256:" + "0" * 64, 5, None, "x"]))


def mutate(target: str, seed: str, ops: list) -> bytes:
    blob = SEEDS[seed]()
    if target == "blob":
        for op in ops:
            blob = apply_byte_op(blob, op)
        return blob
    offset, clen, ulen = _pos(blob)
    if target == "data":
        body = blob[:offset - 8]
        for op in ops:
            body = apply_byte_op(body, op)
        return rebuild(blob, payload=body)
    if target == "toc":
        toc = json.loads(zstandard.ZstdDecompressor().decompress(
            blob[offset:offset + clen], max_output_size=ulen))
        for op in ops:
            apply_json_op(toc, op)
        return rebuild(blob, toc_json=json.dumps(toc, indent="\t").encode())
    data = zstandard.ZstdDecompressor().decompress(_tarsplit(blob), max_output_size=1 << 20)
    for op in ops:
        data = apply_byte_op(data, op)
    return rebuild(blob, tarsplit=zstandard.ZstdCompressor().compress(data))


_runner = CliRunner()


def exercise(blob: bytes, scratch) -> None:
    try:
        verify_layer(BytesSource(blob))
    except EstargzError as e:
        assert "\n" not in str(e), repr(str(e))
    try:
        reader = open_layer(BytesSource(blob))
    except EstargzError as e:
        assert "\n" not in str(e), repr(str(e))
        return
    for entry in reader.entries:
        if entry.type in ("reg", "hardlink"):
            try:
                for _ in reader.iter_file(entry.name):
                    pass
            except EstargzError as e:
                assert "\n" not in str(e), repr(str(e))
    scratch.write_bytes(blob)
    result = _runner.invoke(main, ["layer", "ls", str(scratch)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("target", list(EXAMPLES))
def test_mutated_zstdchunked_blobs_raise_only_estargz_errors(target, tmp_path):
    count = 0
    scratch = tmp_path / "blob.zst"
    ops = {"toc": TOC_OP | TOP_OP}.get(target, BYTE_OP)

    @settings(max_examples=EXAMPLES[target], deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    @given(seed=st.sampled_from(sorted(SEEDS)), ops=st.lists(ops, min_size=1, max_size=4))
    def check(seed, ops):
        nonlocal count
        count += 1
        blob = mutate(target, seed, ops)
        with time_limit(HANG_SECONDS):
            exercise(blob, scratch)

    check()
    assert count >= EXAMPLES[target]


def test_seeds_verify_and_rebuild_faithfully():
    for make in SEEDS.values():
        assert verify_layer(BytesSource(make())).files > 0
        for target in ("data", "toc", "tarsplit"):
            verify_layer(BytesSource(mutate(target, "every-kind", [])))
