"""``estargz layer``: convert, verify and read single eStargz layer blobs,
local files or registry blobs read by HTTP range."""

from __future__ import annotations

import contextlib
import json
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import click

from .. import (
    BACKENDS,
    DEFAULT_BACKEND,
    ConvertOptions,
    FileSource,
    RangeSource,
    atomic_output,
    convert_layer,
    reporting_to,
)
from ..image.reference import parse_docker_name
from ..layer.converter import DEFAULT_CHUNK_SIZE, MAX_WORKERS
from ..layer.order import read_prioritized_list
from ..layer.zstdreader import open_layer, verify_layer
from ..registry.client import open_registry_blob
from .base import (
    BOOL,
    MIN_CHUNK_SIZE,
    _creds,
    _read_text_lines,
    _run,
    format_options,
    main,
    resolve_format,
)
from .progress import ProgressDisplay


def _remote_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options for reading a blob from a registry (``docker://HOST/REPO@DIGEST``)."""
    for opt in reversed([
        click.option("--tls-verify", type=BOOL, default=True, metavar="BOOL",
                     help="For docker:// blobs: verify TLS (false also allows HTTP)."),
        click.option("--creds", default=None, metavar="USER:PASS",
                     help="For docker:// blobs: registry credentials."),
        click.option("--cert-dir", default=None, metavar="DIR",
                     help="For docker:// blobs: directory of CA certificates (*.crt)."),
        click.option("--authfile", default=None, metavar="FILE",
                     help="For docker:// blobs: credentials file (auth.json format)."),
    ]):
        f = opt(f)
    return f


@contextlib.contextmanager
def _open_blob(blob: str, tls_verify: bool, creds: str | None, cert_dir: str | None,
               authfile: str | None) -> Iterator[RangeSource]:
    """A range source for a local file or a registry blob.

    A registry blob is read with HTTP range requests only: the footer, the
    TOC and whatever chunks are asked for, never the whole layer unless
    every byte is needed (``verify``).
    """
    if not blob.startswith("docker://"):
        with FileSource(blob) as src:
            yield src
        return
    name = parse_docker_name(blob[len("docker://"):], default_tag=None)
    if not name.digest:
        raise click.BadParameter(f"{blob}: a registry blob is named by digest "
                                 "(docker://HOST/REPO@sha256:…)")
    with open_registry_blob(name, tls_verify=tls_verify, cert_dir=cert_dir,
                            credentials=_creds(creds, "--creds"), auth_file=authfile) as src:
        yield src


@main.group()
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
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def convert_cmd(src: str, dst: str, chunk_size: int, workers: int,
                prioritized_files: str | None, allow_missing: bool, backend: str,
                as_json: bool, quiet: bool, **kw: Any) -> None:
    """Convert layer IN (tar, tar+gzip or tar+zstd; - for stdin) to eStargz
    (or zstd:chunked) OUT."""
    fmt = resolve_format(kw)

    def body() -> None:
        prioritized = None
        if prioritized_files is not None:
            prioritized = read_prioritized_list(_read_text_lines(prioritized_files))
        options = ConvertOptions(chunk_size=chunk_size, workers=workers,
                                 prioritized_files=prioritized,
                                 allow_missing=allow_missing, backend=backend, **fmt)
        with ProgressDisplay.for_stderr(quiet=quiet, as_json=as_json) as progress, \
                reporting_to(progress.sink("layer")):
            result = convert_layer(src, dst, options)
        if result.missing and not quiet:
            click.echo("estargz: warning: prioritized files not in the layer: "
                       + ", ".join(result.missing), err=True)
        if quiet:
            return
        _emit(result.to_dict(), as_json, {
            "blob_digest": "blob digest", "blob_size": "blob size", "diff_id": "diff id",
            "toc_digest": "TOC digest", "uncompressed_size": "uncompressed size",
            "entries": "entries", "prioritized": "prioritized entries",
        })
        if result.annotations and not as_json:
            for key, value in result.annotations.items():
                click.echo(f"annotation: {key}={value}")
    _run(body)


@layer.command("verify")
@_remote_options
@click.argument("blob")
@click.option("--toc-digest", default=None, metavar="sha256:…",
              help="Expected TOC digest (e.g. from the manifest annotation).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def verify_cmd(blob: str, toc_digest: str | None, as_json: bool, quiet: bool,
               **remote: Any) -> None:
    """Check every byte of eStargz BLOB: footer, TOC, digests, gzip and tar."""
    def body() -> None:
        started = time.monotonic()
        with _open_blob(blob, **remote) as src:
            report = verify_layer(src, toc_digest)
        if quiet:
            return
        result = {"ok": True, "toc_digest": report.toc_digest, "entries": report.entries,
                  "files": report.files, "chunks": report.chunks,
                  "gzip_members": report.gzip_members,
                  "uncompressed_size": report.uncompressed_size,
                  "seconds": round(time.monotonic() - started, 3)}
        if as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            click.echo(f"{blob}: OK ({report.entries} entries, {report.files} files, "
                       f"{report.chunks} chunks, TOC {report.toc_digest})")
    _run(body)


@layer.command("toc")
@_remote_options
@click.argument("blob")
@click.option("--digest", is_flag=True, help="Print only the TOC digest.")
def toc_cmd(blob: str, digest: bool, **remote: Any) -> None:
    """Print the TOC JSON of eStargz BLOB, byte for byte."""
    def body() -> None:
        with _open_blob(blob, **remote) as src:
            reader = open_layer(src)
        if digest:
            click.echo(reader.toc_digest)
        else:
            sys.stdout.buffer.write(reader.toc_json)
            sys.stdout.buffer.write(b"\n")
            sys.stdout.flush()
    _run(body)


_MODE_CHAR = {"dir": "d", "reg": "-", "symlink": "l", "hardlink": "h", "char": "c",
              "block": "b", "fifo": "p"}


@layer.command("ls")
@_remote_options
@click.argument("blob")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
def ls_cmd(blob: str, as_json: bool, **remote: Any) -> None:
    """List the entries of eStargz BLOB (from its TOC)."""
    def body() -> None:
        with _open_blob(blob, **remote) as src:
            reader = open_layer(src)
        for e in reader.entries:
            if e.type == "chunk":
                continue
            if as_json:
                click.echo(json.dumps({
                    "name": e.name, "type": e.type, "size": e.size, "mode": e.mode,
                    "uid": e.uid, "gid": e.gid, "modtime": e.modtime,
                    "linkName": e.link_name}, ensure_ascii=False))
                continue
            perms = stat.filemode(e.mode & 0o7777)[1:]
            target = f" -> {e.link_name}" if e.type == "symlink" else (
                f" link to {e.link_name}" if e.type == "hardlink" else "")
            click.echo(f"{_MODE_CHAR[e.type]}{perms} {e.uid}/{e.gid} {e.size:>10} "
                       f"{e.modtime or '-':<20} {e.name}{target}")
    _run(body)


@layer.command("extract")
@_remote_options
@click.argument("blob")
@click.argument("path")
@click.option("-o", "--output", default=None, help="Write here instead of standard output.")
def extract_cmd(blob: str, path: str, output: str | None, **remote: Any) -> None:
    """Write file PATH of eStargz BLOB, verified, reading only its chunks."""
    def body() -> None:
        with _open_blob(blob, **remote) as src:
            reader = open_layer(src)
            if output is None:
                # Verify before printing anything: a file is at most one
                # layer's worth, spooled through a temporary file.
                with tempfile.TemporaryFile() as tmp:
                    for piece in reader.iter_file(path):
                        tmp.write(piece)
                    tmp.seek(0)
                    while piece := tmp.read(1 << 20):
                        sys.stdout.buffer.write(piece)
                sys.stdout.flush()
            else:
                with atomic_output(output) as out:
                    for piece in reader.iter_file(path):
                        out.write(piece)
    _run(body)
