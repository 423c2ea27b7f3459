"""``estargz convert``: whole images between transports, and the options
``convert`` and ``optimize`` share."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from .. import (
    BACKENDS,
    DEFAULT_BACKEND,
    ConvertOptions,
    ImageConvertOptions,
    ImageResult,
    LayerReport,
    Platform,
    TransportOptions,
    convert_image,
    read_records,
)
from ..layer.converter import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL
from .base import EXIT_USAGE, _creds, _fail, _read_text_lines, _run, _tls, main
from .layer import check_layout_options

_IMAGE_OPTIONS = [
    # OCI by default: a Docker schema 2 eStargz layer cannot carry the TOC
    # digest annotation, and snapshotters then fall back to a full pull
    # without saying so. --oci stays accepted, as ctr-remote and nerdctl spell it.
    click.option("--oci/--docker-media-types", "oci", default=True,
                 help="Media types of the output: OCI (default; layers carry the TOC "
                      "digest) or, for a Docker schema 2 source, keep Docker's (lazy "
                      "pulling then needs allow_no_verification)."),
    click.option("--platform", "platforms", multiple=True, metavar="OS/ARCH[/VARIANT]",
                 help="Platform to convert from an index (repeatable; default: this host's)."),
    click.option("--all-platforms", is_flag=True, help="Convert every platform of an index."),
    click.option("--reuse", is_flag=True,
                 help="Keep layers that already are eStargz with a verifying TOC digest."),
    click.option("--chunk-size", type=click.IntRange(min=1), default=DEFAULT_CHUNK_SIZE,
                 show_default=True, help="Largest payload chunk, in bytes."),
    click.option("--compression-level", type=click.IntRange(0, 9), default=DEFAULT_LEVEL,
                 show_default=True, help="gzip level."),
    click.option("--workers", type=click.IntRange(min=0), default=0,
                 help="Compression threads per layer (default: cores shared among layers)."),
    click.option("--backend", type=click.Choice(BACKENDS), default=DEFAULT_BACKEND,
                 show_default=True, help="Deflate implementation."),
    click.option("--min-chunk-size", type=click.IntRange(min=0), default=0, metavar="BYTES",
                 help="Chunks share a gzip member until it holds this many bytes "
                      "(smaller layers; 0: one member a chunk)."),
    click.option("--external-toc", is_flag=True,
                 help="Keep each layer's TOC out of it, in a TOC image beside DST "
                      "(tag TAG-esgztoc), as the reference does."),
    click.option("--keep-diff-id", is_flag=True,
                 help="Keep each layer's uncompressed bytes (diff_id); needs --external-toc."),
    click.option("--src-creds", default=None, metavar="USER:PASS",
                 help="Source registry credentials."),
    click.option("--dest-creds", default=None, metavar="USER:PASS",
                 help="Destination registry credentials."),
    click.option("--src-tls-verify", default="true", metavar="BOOL",
                 help="Verify the source registry's TLS certificate (false also allows HTTP)."),
    click.option("--dest-tls-verify", default="true", metavar="BOOL",
                 help="Verify the destination registry's TLS certificate (false also "
                      "allows HTTP)."),
    click.option("--src-cert-dir", "--cert-dir", "cert_dir", default=None, metavar="DIR",
                 help="Directory of CA certificates (*.crt) for the registries."),
    click.option("--authfile", default=None, metavar="FILE",
                 help="Credentials file (containers auth.json format); default "
                      "REGISTRY_AUTH_FILE."),
    click.option("--json", "as_json", is_flag=True, help="Print a JSON summary."),
    click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),
]


def _image_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options ``convert`` and ``optimize`` share."""
    for opt in reversed(_IMAGE_OPTIONS):
        f = opt(f)
    return f


def _image_convert_options(kw: dict[str, Any],
                           records: dict[tuple[str, int], list[str]] | None = None,
                           ) -> ImageConvertOptions:
    """Build ``ImageConvertOptions`` from the shared options (popped from ``kw``)."""
    cert_dir, authfile = kw.pop("cert_dir"), kw.pop("authfile")
    keep_diff_id, external_toc = kw.pop("keep_diff_id"), kw.pop("external_toc")
    check_layout_options(keep_diff_id=keep_diff_id, external_toc=external_toc,
                         prioritized=bool(records), what="--record-in's files",
                         min_chunk_size=kw["min_chunk_size"])
    if external_toc and kw["reuse"]:
        _fail("--reuse cannot go with --external-toc: a reused layer has no TOC blob "
              "for the TOC image", EXIT_USAGE)
    return ImageConvertOptions(
        layer=ConvertOptions(chunk_size=kw.pop("chunk_size"),
                             compression_level=kw.pop("compression_level"),
                             workers=kw.pop("workers"), backend=kw.pop("backend"),
                             min_chunk_size=kw.pop("min_chunk_size"),
                             external_toc=external_toc, keep_diff_id=keep_diff_id),
        oci=kw.pop("oci"), platforms=tuple(Platform.parse(p) for p in kw.pop("platforms")),
        all_platforms=kw.pop("all_platforms"), reuse=kw.pop("reuse"), records=records or {},
        src=TransportOptions(tls_verify=_tls(kw.pop("src_tls_verify")), cert_dir=cert_dir,
                             credentials=_creds(kw.pop("src_creds"), "--src-creds"),
                             auth_file=authfile),
        dst=TransportOptions(tls_verify=_tls(kw.pop("dest_tls_verify")), cert_dir=cert_dir,
                             credentials=_creds(kw.pop("dest_creds"), "--dest-creds"),
                             auth_file=authfile))


def _print_image_result(result: ImageResult, as_json: bool, quiet: bool) -> None:
    if not quiet:
        for w in result.warnings:
            click.echo(f"estargz: warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        dropped = f", dropped {len(result.dropped)} index entries" if result.dropped else ""
        click.echo(f"{result.destination}: {result.digest} "
                   f"({len(result.layers)} layers{dropped}, {result.seconds:.1f}s)")
        if result.toc_image:
            click.echo(f"{result.toc_image}: {result.toc_image_digest} (TOC image)")


@main.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--record-in", type=click.Path(dir_okay=False), default=None,
              help="Prioritized files per layer, as written by ctr-remote optimize "
                   "--record-out (JSON lines).")
@_image_options
def image_convert_cmd(src: str, dst: str, record_in: str | None, **kw: Any) -> None:
    """Convert image SRC to eStargz at DST.

    References as in skopeo: oci:PATH[:TAG] (or a bare PATH), oci-archive:PATH[:TAG],
    docker-archive:PATH[:NAME:TAG], docker://HOST[:PORT]/REPO[:TAG|@DIGEST],
    docker-daemon:NAME[:TAG].
    """
    def body() -> None:
        as_json, quiet = kw.pop("as_json"), kw.pop("quiet")
        records = read_records(_read_text_lines(record_in)) if record_in else {}
        options = _image_convert_options(kw, records)
        show = not quiet and not as_json and sys.stderr.isatty()

        def progress(event: str, report: LayerReport) -> None:
            if show:
                click.echo(f"layer {report.index} {report.old_digest[:19]} "
                           f"{report.old_size:>12,} -> {report.new_size:>12,}  "
                           f"{report.action} {report.seconds:.1f}s", err=True)

        _print_image_result(convert_image(src, dst, options, progress), as_json, quiet)
    _run(body)
