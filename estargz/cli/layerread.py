"""``estargz layer verify | toc | ls | extract``: read single layer blobs
(eStargz or zstd:chunked), local files or registry blobs read by HTTP range.
Apart from ``layer convert`` (:mod:`.layer`) so that converting a local
layer does not load the registry client."""

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

from .. import FileSource, RangeSource, atomic_output
from ..image.reference import parse_docker_name
from ..layer.zstdreader import open_layer, verify_layer
from ..registry.client import open_registry_blob
from .base import BOOL, _run
from .image import _creds


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


def _toc_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--toc", "toc_blob", default=None, metavar="TOCBLOB",
        help="The TOC blob of a BLOB whose TOC is external (a file, or "
             "docker://HOST/REPO@sha256:…).")(f)


@contextlib.contextmanager
def _open_layer(blob: str, toc_blob: str | None, remote: dict[str, Any],
                ) -> Iterator[tuple[RangeSource, RangeSource | None]]:
    """The blob's range source and, with ``--toc``, its TOC blob's."""
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(_open_blob(blob, **remote))
        toc = None if toc_blob is None else stack.enter_context(_open_blob(toc_blob, **remote))
        yield src, toc


@click.command("verify")
@_remote_options
@_toc_option
@click.argument("blob")
@click.option("--toc-digest", default=None, metavar="sha256:…",
              help="Expected TOC digest (e.g. from the manifest annotation).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def verify_cmd(blob: str, toc_digest: str | None, toc_blob: str | None, as_json: bool,
               quiet: bool, **remote: Any) -> None:
    """Check every byte of eStargz BLOB: footer, TOC, digests, gzip and tar."""
    def body() -> None:
        started = time.monotonic()
        with _open_layer(blob, toc_blob, remote) as (src, toc):
            report = verify_layer(src, toc_digest, toc_source=toc)
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


@click.command("toc")
@_remote_options
@_toc_option
@click.argument("blob")
@click.option("--digest", is_flag=True, help="Print only the TOC digest.")
def toc_cmd(blob: str, digest: bool, toc_blob: str | None, **remote: Any) -> None:
    """Print the TOC JSON of eStargz BLOB, byte for byte."""
    def body() -> None:
        with _open_layer(blob, toc_blob, remote) as (src, toc):
            reader = open_layer(src, toc_source=toc)
        if digest:
            click.echo(reader.toc_digest)
        else:
            sys.stdout.buffer.write(reader.toc_json)
            sys.stdout.buffer.write(b"\n")
            sys.stdout.flush()
    _run(body)


_MODE_CHAR = {"dir": "d", "reg": "-", "symlink": "l", "hardlink": "h", "char": "c",
              "block": "b", "fifo": "p"}


@click.command("ls")
@_remote_options
@_toc_option
@click.argument("blob")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
def ls_cmd(blob: str, as_json: bool, toc_blob: str | None, **remote: Any) -> None:
    """List the entries of eStargz BLOB (from its TOC)."""
    def body() -> None:
        with _open_layer(blob, toc_blob, remote) as (src, toc):
            reader = open_layer(src, toc_source=toc)
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


@click.command("extract")
@_remote_options
@_toc_option
@click.argument("blob")
@click.argument("path")
@click.option("-o", "--output", default=None, help="Write here instead of standard output.")
def extract_cmd(blob: str, path: str, output: str | None, toc_blob: str | None,
                **remote: Any) -> None:
    """Write file PATH of eStargz BLOB, verified, reading only its chunks."""
    def body() -> None:
        with _open_layer(blob, toc_blob, remote) as (src, toc):
            reader = open_layer(src, toc_source=toc)
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
