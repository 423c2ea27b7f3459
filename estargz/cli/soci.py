"""``estargz soci``: SOCI indexes for images that must not change, named as
the ``soci`` CLI names its commands (``create``, ``ztoc info``, ``index info``)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import click

from .. import ImageSource, InvalidInput, NotFound, Platform, TransportOptions
from ..image.loadorder import MAX_DOCUMENT_SIZE, parse_load_order
from ..image.socicreate import SociOptions, SociResult, create_soci_index
from ..image.sociindex import (
    DEFAULT_MIN_LAYER_SIZE,
    DEFAULT_SPAN_SIZE,
    LAYER_DIGEST_ANNOTATION,
    SPAN_SIZE_ANNOTATION,
)
from ..image.socilookup import BoundIndex, find_soci_indexes
from ..image.transport import open_source, parse_reference
from ..layer.inputfile import open_input
from ..layer.ztoc import MAX_ZTOC_SIZE, Ztoc, unmarshal_ztoc
from .base import _run
from .image import _creds, connection_options, transport_options
from .layerread import _remote_options
from .progress import ProgressDisplay


@click.group("soci")
def soci_group() -> None:
    """SOCI indexes: lazy loading of unchanged images (the SOCI Snapshotter)."""


def print_soci_result(result: SociResult, as_json: bool, quiet: bool) -> None:
    """``soci create``'s output: a JSON summary, or a line per index and one for DST."""
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    if quiet:
        return
    for note in result.notes:
        click.echo(f"estargz: note: {note}", err=True)
    for index in result.indexes:
        built = [x for x in index.layers if x.action != "skipped"]
        skipped = len(index.layers) - len(built)
        click.echo(f"{index.platform}: SOCI index {index.index} ({len(built)} zTOCs, "
                   f"{skipped} layers skipped) for manifest {index.bound_manifest}")
    how = f", found by {', '.join(sorted(set(result.found_by)))}" if result.found_by else ""
    click.echo(f"{result.destination}: {result.digest} ({result.version}{how}, "
               f"{result.seconds:.1f}s)")


#: The options of a SOCI index, shared by ``soci create`` and ``optimize --soci``.
SOCI_INDEX_OPTIONS = [
    click.option("--span-size", type=click.IntRange(1, 1 << 40), default=DEFAULT_SPAN_SIZE,
                 show_default=True, metavar="BYTES",
                 help="Uncompressed bytes between two zran checkpoints of a layer."),
    click.option("--min-layer-size", type=click.IntRange(0, 1 << 50),
                 default=DEFAULT_MIN_LAYER_SIZE, show_default=True, metavar="BYTES",
                 help="Smaller layers get no zTOC (they are pulled whole)."),
    click.option("--index-version", type=click.Choice(["v2", "v1"]), default="v2",
                 show_default=True,
                 help="v2: a new image index at DST binds manifest and index (what the "
                      "SOCI Snapshotter looks for first); v1: the index refers to the "
                      "unchanged manifest (referrers API or its sha256-HEX tag)."),
    click.option("--build-tool-identifier", default=SociOptions.build_tool,
                 show_default=True,
                 help="Recorded in every zTOC and in the index's annotations."),
]


def soci_index_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``f`` with :data:`SOCI_INDEX_OPTIONS`."""
    for opt in reversed(SOCI_INDEX_OPTIONS):
        f = opt(f)
    return f


def soci_options_from(kw: dict[str, Any], **more: Any) -> SociOptions:
    """:class:`SociOptions` from the :data:`SOCI_INDEX_OPTIONS` (popped from ``kw``)."""
    return SociOptions(span_size=kw.pop("span_size"), min_layer_size=kw.pop("min_layer_size"),
                       version=kw.pop("index_version"),
                       build_tool=kw.pop("build_tool_identifier"), **more)


@soci_group.command("create")
@click.argument("src")
@click.argument("dst", required=False)
@soci_index_options
@click.option("--platform", "platforms", multiple=True, metavar="OS/ARCH[/VARIANT]",
              help="Platform to index from an image index (repeatable; default: this "
                   "host's).")
@click.option("--all-platforms", is_flag=True, help="Index every platform of an image index.")
@click.option("--reuse", is_flag=True,
              help="Take zTOCs of the same layers and span size from SOCI indexes already "
                   "bound to SRC or DST instead of reading those layers.")
@click.option("--load-order", "load_order_file", default=None,
              type=click.Path(dir_okay=False, allow_dash=True), metavar="FILE",
              help="A workload's load-order document (optimize --load-order-out): each "
                   "layer it read from gets a SOCI prefetch artifact of those spans, in "
                   "first-access order.")
@connection_options
def soci_create_cmd(src: str, dst: str | None, load_order_file: str | None,
                    **kw: Any) -> None:
    """Write a SOCI index for image SRC, leaving its layers and config as they are.

    v2 (default) writes a new image index to DST (default: SRC's repository or
    layout, tag TAG-soci); v1 pushes the index beside SRC (or a copy at DST).
    References as in skopeo (docker://, oci:, oci-archive:, docker-archive:,
    docker-daemon:).
    """
    def body() -> None:
        as_json, quiet = kw.pop("as_json"), kw.pop("quiet")
        src_options, dst_options = transport_options(kw)
        load_order = None
        if load_order_file is not None:
            with open_input(load_order_file, "load-order document") as f:
                load_order = parse_load_order(f.read(MAX_DOCUMENT_SIZE + 1), load_order_file)
        options = soci_options_from(
            kw, platforms=tuple(Platform.parse(p) for p in kw.pop("platforms")),
            all_platforms=kw.pop("all_platforms"), reuse=kw.pop("reuse"),
            load_order=load_order, src=src_options, dst=dst_options)
        with ProgressDisplay.for_stderr(quiet=quiet, as_json=as_json) as progress:
            result = create_soci_index(src, dst, options, progress)
        print_soci_result(result, as_json, quiet)
    _run(body)


@soci_group.group("ztoc")
def ztoc_group() -> None:
    """zTOCs: a layer's file table and zran checkpoints."""


@ztoc_group.command("info")
@click.argument("ztoc", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--files/--no-files", default=False, help="List every file entry.")
def ztoc_info_cmd(ztoc: str, files: bool) -> None:
    """Print what zTOC file ZTOC holds, as JSON (``-``: stdin)."""
    def body() -> None:
        with open_input(ztoc, "zTOC") as f:
            data = f.read(MAX_ZTOC_SIZE + 1)
        if len(data) > MAX_ZTOC_SIZE:
            raise InvalidInput(f"{ztoc} is larger than a zTOC can plausibly be")
        z = unmarshal_ztoc(data)
        click.echo(json.dumps(_ztoc_summary(z, files), indent=2))
    _run(body)


@soci_group.group("index")
def index_group() -> None:
    """SOCI indexes bound to an image."""


@index_group.command("info")
@click.argument("image")
@click.option("--verify", is_flag=True,
              help="Also fetch and parse every zTOC, and check it is the one the index "
                   "names for an image layer.")
@_remote_options
def index_info_cmd(image: str, verify: bool, tls_verify: bool, creds: str | None,
                   cert_dir: str | None, authfile: str | None) -> None:
    """Print the SOCI indexes bound to IMAGE (v2 entries of its image index,
    v1 referrers), as JSON."""
    def body() -> None:
        options = TransportOptions(tls_verify=tls_verify, cert_dir=cert_dir,
                                   credentials=_creds(creds, "--creds"), auth_file=authfile)
        with open_source(parse_reference(image), options) as source:
            root, media_type = source.root()
            found = find_soci_indexes(source, root, media_type)
            if not found:
                raise NotFound(f"no SOCI index is bound to {source.name}")
            out = [_describe(source, b, verify) for b in found]
        click.echo(json.dumps(out, indent=2))
    _run(body)


def _describe(source: ImageSource, bound: BoundIndex, verify: bool) -> dict[str, Any]:
    ztocs = []
    for z in bound.index.ztocs:
        entry: dict[str, Any] = {
            "layer": z.annotations[LAYER_DIGEST_ANNOTATION], "ztoc": z.digest,
            "size": z.size, "span_size": int(z.annotations[SPAN_SIZE_ANNOTATION])}
        if verify:
            if z.size > MAX_ZTOC_SIZE:
                raise InvalidInput(f"zTOC {z.digest} is {z.size} bytes, more than a zTOC "
                                   "can plausibly be")
            buf = io.BytesIO()
            source.fetch_blob(z, buf)
            parsed = unmarshal_ztoc(buf.getvalue())
            entry.update(files=len(parsed.files), spans=parsed.max_span_id + 1)
        ztocs.append(entry)
    return {"index": bound.descriptor.digest, "version": bound.index.version,
            "platform": str(bound.descriptor.platform or ""),
            "manifest": bound.manifest, "ztocs": ztocs,
            "prefetch": [p.digest for p in bound.index.prefetch],
            "annotations": dict(bound.index.annotations)}


def _ztoc_summary(z: Ztoc, files: bool) -> dict[str, Any]:
    """What ``soci ztoc info`` shows, plus the checkpoints' offsets."""
    out: dict[str, Any] = {
        "version": z.version, "build_tool": z.build_tool_identifier,
        "compression": z.compression_algorithm,
        "compressed_size": z.compressed_archive_size,
        "uncompressed_size": z.uncompressed_archive_size,
        "span_size": z.span_size, "spans": z.max_span_id + 1, "files": len(z.files),
        "checkpoints": [[c.compressed_offset, c.uncompressed_offset]
                        for c in z.decoded_checkpoints]}
    if files:
        out["entries"] = [{"name": f.name, "type": f.type, "offset": f.uncompressed_offset,
                           "size": f.uncompressed_size} for f in z.files]
    return out
