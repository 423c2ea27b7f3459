"""``estargz layer``: the group, and ``layer convert`` (one layer blob to
eStargz or zstd:chunked). The commands that read blobs are in
:mod:`.layerread`, loaded when used."""

from __future__ import annotations

import json
from typing import Any

import click

from .. import BACKENDS, DEFAULT_BACKEND, ConvertOptions, convert_layer, reporting_to
from ..layer.converter import DEFAULT_CHUNK_SIZE, MAX_WORKERS
from ..layer.order import read_prioritized_list
from .base import (
    EXIT_USAGE,
    MIN_CHUNK_SIZE,
    LazyGroup,
    _fail,
    _read_text_lines,
    _run,
    format_options,
    resolve_format,
)
from .progress import ProgressDisplay


@click.group(cls=LazyGroup, lazy={"verify": "layerread:verify_cmd", "toc": "layerread:toc_cmd",
                                  "ls": "layerread:ls_cmd", "extract": "layerread:extract_cmd"})
def layer() -> None:
    """Convert, verify and read single eStargz layer blobs."""


def _emit(result: dict[str, Any], as_json: bool, labels: dict[str, str]) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    width = max(len(v) for v in labels.values())
    for key, label in labels.items():
        click.echo(f"{label + ':':<{width + 1}} {result[key]}")


@layer.command("convert")
@click.argument("src", metavar="IN")
@click.argument("dst", metavar="OUT")
@click.option("--chunk-size", type=click.IntRange(min=MIN_CHUNK_SIZE), default=DEFAULT_CHUNK_SIZE,
              show_default=True, help="Largest payload chunk, in bytes.")
@format_options
@click.option("--workers", type=click.IntRange(0, MAX_WORKERS), default=0,
              help="Compression threads (default: all cores).")
@click.option("--prioritized-files", type=click.Path(dir_okay=False), default=None,
              help="File listing paths to put first, one a line, in order.")
@click.option("--allow-missing", is_flag=True,
              help="Warn about prioritized paths the layer lacks instead of failing.")
@click.option("--backend", type=click.Choice(BACKENDS), default=DEFAULT_BACKEND,
              show_default=True,
              help="Deflate implementation.")
@click.option("--min-chunk-size", type=click.IntRange(min=0), default=0, metavar="BYTES",
              help="Chunks share a gzip member until it holds this many compressed bytes "
                   "(smaller layers; 0: one member a chunk).")
@click.option("--external-toc", "toc_dst", type=click.Path(dir_okay=False), default=None,
              metavar="FILE", help="Write the TOC to this TOC blob, not into OUT.")
@click.option("--keep-diff-id", is_flag=True,
              help="Keep the input tar byte for byte (same diff_id); needs --external-toc.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def convert_cmd(src: str, dst: str, chunk_size: int, workers: int,
                prioritized_files: str | None, allow_missing: bool, backend: str,
                min_chunk_size: int, toc_dst: str | None, keep_diff_id: bool,
                as_json: bool, quiet: bool, **kw: Any) -> None:
    """Convert layer IN (tar, tar+gzip or tar+zstd; - for stdin) to eStargz
    (or zstd:chunked) OUT."""
    fmt = resolve_format(kw)
    check_layout_options(keep_diff_id=keep_diff_id, external_toc=toc_dst is not None,
                         prioritized=prioritized_files is not None,
                         min_chunk_size=min_chunk_size, fmt=fmt["format"])

    def body() -> None:
        prioritized = None
        if prioritized_files is not None:
            prioritized = read_prioritized_list(_read_text_lines(prioritized_files))
        options = ConvertOptions(chunk_size=chunk_size, workers=workers,
                                 prioritized_files=prioritized,
                                 allow_missing=allow_missing, backend=backend,
                                 min_chunk_size=min_chunk_size,
                                 external_toc=toc_dst is not None, keep_diff_id=keep_diff_id,
                                 **fmt)
        with ProgressDisplay.for_stderr(quiet=quiet, as_json=as_json) as progress, \
                reporting_to(progress.sink("layer")):
            result = convert_layer(src, dst, options, toc_dst=toc_dst)
        if result.missing and not quiet:
            click.echo("estargz: warning: prioritized files not in the layer: "
                       + ", ".join(result.missing), err=True)
        if quiet:
            return
        _emit(result.to_dict(), as_json, {
            "blob_digest": "blob digest", "blob_size": "blob size", "diff_id": "diff id",
            "toc_digest": "TOC digest", "uncompressed_size": "uncompressed size",
            "entries": "entries", "prioritized": "prioritized entries",
            **({"toc_blob_digest": "TOC blob digest", "toc_blob_size": "TOC blob size"}
               if toc_dst else {}),
        })
        if result.annotations and not as_json:
            for key, value in result.annotations.items():
                click.echo(f"annotation: {key}={value}")
    _run(body)


def check_layout_options(*, keep_diff_id: bool, external_toc: bool, prioritized: bool,
                         what: str = "--prioritized-files", min_chunk_size: int = 0,
                         fmt: str = "estargz") -> None:
    """Refuse option combinations the layout cannot honour: one line, exit 2.

    ``fmt`` is the output format; the options are eStargz's (gzip members to
    share, a gzip TOC blob), so any other format refuses them.
    """
    used = [name for name, on in (("--min-chunk-size", min_chunk_size),
                                  ("--external-toc", external_toc),
                                  ("--keep-diff-id", keep_diff_id)) if on]
    if fmt != "estargz" and used:
        _fail(f"{used[0]} is for eStargz's gzip members; {fmt} has no streams to share "
              "or TOC to move", EXIT_USAGE)
    if keep_diff_id and not external_toc:
        _fail("--keep-diff-id needs --external-toc: a TOC inside the layer would "
              "change its uncompressed bytes", EXIT_USAGE)
    if keep_diff_id and prioritized:
        _fail(f"--keep-diff-id keeps the layer's order, so {what} cannot be put first",
              EXIT_USAGE)
