"""``estargz convert``: whole images between transports, and the options
``convert`` and ``optimize`` share."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from typing import Any

import click

from .. import (
    BACKENDS,
    DEFAULT_BACKEND,
    ConvertOptions,
    ImageConvertOptions,
    ImageResult,
    Platform,
    TransportOptions,
    convert_image,
    read_records,
)
from ..image.descriptor import INDEX_TYPES, MANIFEST_TYPES
from ..image.reference import parse_docker_name
from ..layer.converter import DEFAULT_CHUNK_SIZE, MAX_WORKERS
from ..registry.client import client_for
from ..registry.credentials import parse_creds
from ..registry.http import DEFAULT_MIN_RATE, DEFAULT_READ_TIMEOUT, DEFAULT_TIMEOUT, MAX_TIMEOUT
from ..registry.records import fetch_record, find_record
from .base import (
    BOOL,
    EXIT_USAGE,
    FORMAT_OPTIONS,
    MIN_CHUNK_SIZE,
    _fail,
    _read_text_lines,
    _run,
    resolve_format,
)
from .layer import check_layout_options
from .progress import ProgressDisplay


class _Seconds(click.ParamType):
    """A finite number of seconds above 0 (or at least ``minimum``), at most
    ``maximum`` (``MAX_TIMEOUT`` unless given). Not click.FloatRange, which
    takes nan and inf."""

    name = "seconds"

    def __init__(self, minimum: float = 0.0, maximum: float = MAX_TIMEOUT) -> None:
        self.minimum, self.maximum = minimum, maximum

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not (math.isfinite(seconds) and seconds <= self.maximum
                and (seconds >= self.minimum if self.minimum else seconds > 0)):
            low = f"at least {self.minimum:g}" if self.minimum else "above 0"
            self.fail(f"{value} is not a number of seconds {low} and at most "
                      f"{self.maximum:.0f}", param, ctx)
        return seconds


class _Rate(click.ParamType):
    """Bytes per second, at least 1, with an optional k, M or G (binary)."""

    name = "rate"
    _UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            value = str(value)
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmg]?)(?:i?b)?(?:/s)?\s*", str(value), re.I)
        rate = float(m.group(1)) * self._UNITS[m.group(2).lower()] if m else math.nan
        if not (math.isfinite(rate) and rate >= 1):
            self.fail(f"{value!r} is not a rate of at least 1 byte per second "
                      f"(e.g. 512, 64k, 1M)", param, ctx)
        return rate

ROOT_TYPES = (*INDEX_TYPES, *MANIFEST_TYPES)

#: Registry connection and output options of every command that reads an
#: image from one transport and writes to another.
_CONNECTION_OPTIONS = [
    click.option("--src-creds", default=None, metavar="USER:PASS",
                 help="Source registry credentials."),
    click.option("--dest-creds", default=None, metavar="USER:PASS",
                 help="Destination registry credentials."),
    click.option("--src-tls-verify", type=BOOL, default=True, metavar="BOOL",
                 help="Verify the source registry's TLS certificate (false also allows HTTP)."),
    click.option("--dest-tls-verify", type=BOOL, default=True, metavar="BOOL",
                 help="Verify the destination registry's TLS certificate (false also "
                      "allows HTTP)."),
    click.option("--src-cert-dir", "--cert-dir", "cert_dir", default=None, metavar="DIR",
                 help="Directory of CA certificates (*.crt) for the registries."),
    click.option("--authfile", default=None, metavar="FILE",
                 help="Credentials file (containers auth.json format); default "
                      "REGISTRY_AUTH_FILE."),
    # Named as wget names them: --timeout is the whole request (ctr's
    # --timeout is whole too), --read-timeout each wait for bytes.
    click.option("--timeout", type=_Seconds(), default=DEFAULT_TIMEOUT, show_default=True,
                 metavar="SECONDS",
                 help="Deadline of each registry request (manifest, token, HEAD), its "
                      "retries included; a blob transfer gets this plus its size at "
                      "--min-transfer-rate."),
    click.option("--read-timeout", type=_Seconds(), default=DEFAULT_READ_TIMEOUT,
                 show_default=True, metavar="SECONDS",
                 help="Longest wait to connect or for the next bytes from a registry; "
                      "an attempt that waits longer is retried within the deadline."),
    click.option("--min-transfer-rate", type=_Rate(), default=f"{DEFAULT_MIN_RATE >> 10}k",
                 show_default=True, metavar="BYTES/S",
                 help="Slowest average rate a blob transfer may have before its "
                      "deadline cuts it (k, M, G suffixes)."),
    click.option("--json", "as_json", is_flag=True, help="Print a JSON summary."),
    click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),
]


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
    click.option("--chunk-size", type=click.IntRange(min=MIN_CHUNK_SIZE),
                 default=DEFAULT_CHUNK_SIZE, show_default=True,
                 help="Largest payload chunk, in bytes."),
    *FORMAT_OPTIONS,
    click.option("--workers", type=click.IntRange(0, MAX_WORKERS), default=0,
                 help="Compression threads per layer (default: cores shared among layers)."),
    click.option("--backend", type=click.Choice(BACKENDS), default=DEFAULT_BACKEND,
                 show_default=True, help="Deflate implementation."),
    click.option("--min-chunk-size", type=click.IntRange(min=0), default=0, metavar="BYTES",
                 help="Chunks share a gzip member until it holds this many compressed bytes "
                      "(smaller layers; 0: one member a chunk)."),
    click.option("--external-toc", is_flag=True,
                 help="Keep each layer's TOC out of it, in a TOC image beside DST "
                      "(tag TAG-esgztoc), as the reference does."),
    click.option("--keep-diff-id", is_flag=True,
                 help="Keep each layer's uncompressed bytes (diff_id); needs --external-toc."),
    *_CONNECTION_OPTIONS,
]


def _image_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options ``convert`` and ``optimize`` share."""
    for opt in reversed(_IMAGE_OPTIONS):
        f = opt(f)
    return f


def connection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The registry connection options and ``--json``/``--quiet``, as
    ``convert`` spells them."""
    for opt in reversed(_CONNECTION_OPTIONS):
        f = opt(f)
    return f


def _image_convert_options(kw: dict[str, Any],
                           records: dict[tuple[str, int], list[str]] | None = None,
                           *, from_record: bool = False) -> ImageConvertOptions:
    """Build ``ImageConvertOptions`` from the shared options (popped from
    ``kw``). ``from_record``: a record will put files first (it is read
    later, so a bad combination is refused before any network work)."""
    cert_dir, authfile = kw.pop("cert_dir"), kw.pop("authfile")
    fmt, oci = resolve_format(kw), kw.pop("oci")
    if fmt["format"] == "zstd:chunked" and not oci:
        raise click.UsageError("zstd:chunked layers need OCI media types "
                               "(Docker's have no zstd); drop --docker-media-types")
    keep_diff_id, external_toc = kw.pop("keep_diff_id"), kw.pop("external_toc")
    check_layout_options(keep_diff_id=keep_diff_id, external_toc=external_toc,
                         prioritized=bool(records) or from_record, what="the record's files",
                         min_chunk_size=kw["min_chunk_size"], fmt=fmt["format"])
    if external_toc and kw["reuse"]:
        _fail("--reuse cannot go with --external-toc: a reused layer has no TOC blob "
              "for the TOC image", EXIT_USAGE)
    src, dst = transport_options(kw, cert_dir, authfile)
    return ImageConvertOptions(
        layer=ConvertOptions(chunk_size=kw.pop("chunk_size"), **fmt,
                             workers=kw.pop("workers"), backend=kw.pop("backend"),
                             min_chunk_size=kw.pop("min_chunk_size"),
                             external_toc=external_toc, keep_diff_id=keep_diff_id),
        oci=oci, platforms=tuple(Platform.parse(p) for p in kw.pop("platforms")),
        all_platforms=kw.pop("all_platforms"), reuse=kw.pop("reuse"), records=records or {},
        src=src, dst=dst)


def _creds(text: str | None, option: str) -> tuple[str, str] | None:
    return None if text is None else parse_creds(text, option)


def transport_options(kw: dict[str, Any], cert_dir: str | None = None,
                      authfile: str | None = None) -> tuple[TransportOptions, TransportOptions]:
    """``(source, destination)`` options from the shared connection options (popped
    from ``kw``; ``cert_dir`` and ``authfile`` if already popped)."""
    cert_dir = kw.pop("cert_dir", cert_dir)
    authfile = kw.pop("authfile", authfile)
    limits = {"timeout": kw.pop("timeout"), "read_timeout": kw.pop("read_timeout"),
              "min_transfer_rate": kw.pop("min_transfer_rate")}
    return (TransportOptions(tls_verify=kw.pop("src_tls_verify"), cert_dir=cert_dir,
                             credentials=_creds(kw.pop("src_creds"), "--src-creds"),
                             auth_file=authfile, **limits),
            TransportOptions(tls_verify=kw.pop("dest_tls_verify"), cert_dir=cert_dir,
                             credentials=_creds(kw.pop("dest_creds"), "--dest-creds"),
                             auth_file=authfile, **limits))


def _record_text(src: str, record_in: str | None, from_referrers: bool,
                 options: TransportOptions) -> tuple[str | None, list[str]]:
    """The record ``--record-in`` or ``--record-from-referrers`` names, as
    text, with notes on how it was chosen."""
    if record_in and record_in.startswith("docker://"):
        name = parse_docker_name(record_in.removeprefix("docker://"))
        with client_for(name.registry, options) as client:
            return fetch_record(client, name.repository, name.reference).decode(
                "utf-8", "replace"), []
    if record_in:
        return "".join(_read_text_lines(record_in)), []
    if not from_referrers:
        return None, []
    if not src.startswith("docker://"):
        raise click.UsageError("--record-from-referrers needs a docker:// SRC; give "
                               "--record-in docker://HOST/REPO@DIGEST for another source")
    name = parse_docker_name(src.removeprefix("docker://"))
    with client_for(name.registry, options) as client:
        _, _, digest = client.get_manifest(name.repository, name.reference, ROOT_TYPES)
        data, artifact, notes = find_record(client, name.repository, digest)
    notes.append(f"record {artifact} (refers to {digest})")
    return data.decode("utf-8", "replace"), notes


def _record_file(_ctx: click.Context, _param: click.Parameter, value: str | None,
                 ) -> str | None:
    # A directory is a usage error, as click.Path(dir_okay=False) makes it
    # for every other file option (a docker:// value is no path).
    if value is not None and not value.startswith("docker://") and os.path.isdir(value):
        raise click.BadParameter(f"file {value!r} is a directory")
    return value


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


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--record-in", default=None, metavar="FILE|docker://HOST/REPO@DIGEST",
              callback=_record_file,
              help="Prioritized files per layer, as written by ctr-remote optimize "
                   "--record-out (JSON lines); or the record artifact in a registry "
                   "(estargz optimize --record-out docker://…).")
@click.option("--record-from-referrers", is_flag=True,
              help="Use the record that refers to SRC in SRC's repository (OCI referrers "
                   "API, or its sha256-HEX tag fallback).")
@_image_options
def image_convert_cmd(src: str, dst: str, record_in: str | None, record_from_referrers: bool,
                      **kw: Any) -> None:
    """Convert image SRC to eStargz at DST.

    References as in skopeo: oci:PATH[:TAG] (or a bare PATH), oci-archive:PATH[:TAG],
    docker-archive:PATH[:NAME:TAG], docker://HOST[:PORT]/REPO[:TAG|@DIGEST],
    docker-daemon:NAME[:TAG].
    """
    def body() -> None:
        as_json, quiet = kw.pop("as_json"), kw.pop("quiet")
        if record_in and record_from_referrers:
            raise click.UsageError("give --record-in or --record-from-referrers, not both")
        options = _image_convert_options(
            kw, from_record=bool(record_in or record_from_referrers))
        text, notes = _record_text(src, record_in, record_from_referrers, options.src)
        records = read_records(text.splitlines()) if text is not None else {}
        options = dataclasses.replace(options, records=records)
        if not quiet:
            for note in notes:
                click.echo(f"estargz: note: {note}", err=True)
        with ProgressDisplay.for_stderr(quiet=quiet, as_json=as_json) as progress:
            result = convert_image(src, dst, options, progress)
        _print_image_result(result, as_json, quiet)
    _run(body)
