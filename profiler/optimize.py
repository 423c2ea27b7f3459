"""``estargz optimize``: profile the workload, then convert with what it read first.

1. Pick the host platform's manifest and read its config, from a
   :class:`~estargz.StagedSource`: the manifest resolved once and pinned,
   each layer fetched and decompressed once, for steps 2 and 5 alike.
2. Assemble the root filesystem from the layers (``profiler.rootfs``:
   extracted safely, stacked read-only under a throwaway upper layer, a
   tmpfs of ``scratch_bytes``), in mount and PID namespaces that die with
   us (``profiler.rootful``), and run steps 3 and 4 there.  Without root,
   ``profiler.rootless`` flattens them onto a tmpfs in a user namespace
   instead.  The work directory is swept by the next run if we are killed
   (``profiler.workdir``).
3. Run Entrypoint + Cmd in the sandbox (``profiler.sandbox``) while fanotify records
   every file it opens, reads or executes, in first-access order.
4. Map each path, symlinks followed, to the layer that provides it
   (``profiler.record.map_accesses``): that is the record, per layer.
5. Convert the image with those prioritized files (``estargz convert``):
   accessed files precede ``.prefetch.landmark`` in their layers; layers with
   none get ``.no.prefetch.landmark``. Other platforms of an index get the
   same paths by path.
"""

from __future__ import annotations

import fnmatch
import io
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from estargz import (
    INDEX_TYPES,
    MAX_JSON_SIZE,
    Descriptor,
    ImageConvertOptions,
    ImageResult,
    ImageSource,
    InvalidInput,
    LoadOrder,
    PeekableStream,
    ProgressFn,
    SociOptions,
    SociResult,
    StagedSource,
    atomic_output,
    check_member,
    clean_name,
    convert_source,
    dump_load_order,
    host_platform_default,
    iter_headers,
    load_json_object,
    load_order_from_record,
    open_source,
    open_tar,
    parse_reference,
    sha256_digest,
    soci_index_source,
)

from .record import Access, by_path, per_layer, write_record
from .report import Report, write_html
from .rootfs import SCRATCH_BYTES, LayerListing, layer_blob, layer_for
from .rootful import profile_as_root
from .rootless import profile_rootless
from .sandbox import BindMount, ProcessSpec, SandboxOptions
from .workdir import sweep_stale, work_directory


@dataclass(frozen=True)
class OptimizeOptions:
    """The options of ``ctr-remote image optimize``, plus every ``convert`` one."""

    convert: ImageConvertOptions = ImageConvertOptions()
    runtime: str = "runc"
    period: float = 10.0
    wait_on_line: str | None = None
    wait_on_signal: bool = False
    #: End the profile when the workload accepts connections on this port,
    #: or answers this http:// URL with 2xx (in the sandbox's network).
    wait_on_port: int | None = None
    wait_on_http: str | None = None
    entrypoint: list[str] | None = None
    args: list[str] | None = None
    env: tuple[str, ...] = ()
    user: str | None = None
    cwd: str | None = None
    mounts: tuple[BindMount, ...] = ()
    net_host: bool = False
    record_out: str | None = None
    #: Paths and globs to prefetch instead of running the workload.
    prefetch_list: tuple[str, ...] | None = None
    #: Profile (and write the record) but do not convert.
    no_optimize: bool = False
    report_html: str | None = None
    quiet: bool = False
    output: Callable[[str], None] | None = None
    #: Told about the conversion's layers as ``convert_image``'s is; the
    #: staging (fetch, decompress) and the profile (phase ``profile``, no
    #: byte counts) go to the calling thread's sink (``estargz.reporting_to``).
    progress: ProgressFn | None = None
    #: What the workload may write, in bytes (a tmpfs under the overlay as
    #: root; room on the tmpfs rootless).  Writes past it fail with ENOSPC
    #: and the report says so.
    scratch_bytes: int = SCRATCH_BYTES
    #: Instead of converting: a SOCI index for the unchanged image whose
    #: prefetch artifacts hold the spans the workload read, in the order it
    #: read them (``optimize --soci``); ``platforms``, ``all_platforms`` and
    #: ``reuse`` come from ``convert``, and so do the transport options.
    soci: SociOptions | None = None
    #: Write the workload's load-order document (docs/soci.md) here.
    load_order_out: str | None = None
    #: The document's workload name (default: from the entrypoint).
    workload: str | None = None


@dataclass
class OptimizeResult:
    """What ``optimize`` did."""

    manifest_digest: str
    accesses: list[Access]
    report: Report
    image: ImageResult | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: Why the profile ended (exited, period, line, ready, signal); None
    #: without a run (--prefetch-list).
    stopped_by: str | None = None
    #: The source's root manifest or index, as resolved (and pinned): what a
    #: record pushed to a registry refers to.
    source: Descriptor | None = None
    #: ``--soci``: the SOCI index written instead of a converted image.
    soci: SociResult | None = None
    load_order: LoadOrder | None = None


def _read_json(source: ImageSource, desc: Descriptor, what: str) -> dict[str, Any]:
    if desc.size > MAX_JSON_SIZE:
        raise InvalidInput(f"{what} {desc.digest} is implausibly large")
    buf = io.BytesIO()
    source.fetch_blob(desc, buf)
    return load_json_object(buf.getvalue(), f"{what} {desc.digest}")


def host_manifest(source: ImageSource) -> tuple[Descriptor, dict[str, Any], dict[str, Any], bool]:
    """The manifest this machine can run: ``(descriptor, manifest, config,
    from_index)``."""
    data, media_type = source.root()
    root = load_json_object(data, "the image's root manifest")
    media_type = media_type or root.get("mediaType", "")
    if media_type in INDEX_TYPES or "manifests" in root:
        host = host_platform_default()
        entries = [Descriptor.from_json(d) for d in root.get("manifests") or []]
        chosen = [d for d in entries if d.platform is not None and host.matches(d.platform)]
        if not chosen:
            have = ", ".join(sorted({str(d.platform) for d in entries if d.platform}))
            raise InvalidInput(f"the image has no manifest for this machine ({host}); only "
                               f"the host's platform can be profiled (platforms: {have})")
        desc = chosen[0]
        manifest = load_json_object(source.get_manifest(desc), f"manifest {desc.digest}")
        from_index = True
    else:
        desc = Descriptor(media_type, sha256_digest(data), len(data))
        manifest, from_index = root, False
    config = _read_json(source, Descriptor.from_json(manifest["config"]), "config")
    return desc, manifest, config, from_index


def process_from_config(config: dict[str, Any], options: OptimizeOptions) -> ProcessSpec:
    """Entrypoint + Cmd, Env, User and WorkingDir of the image, with overrides."""
    c = config.get("config") or {}
    entrypoint = (options.entrypoint if options.entrypoint is not None
                  else (c.get("Entrypoint") or []))
    # As docker run: a new entrypoint drops the image's Cmd.
    if options.args is not None:
        cmd = options.args
    elif options.entrypoint is not None:
        cmd = []
    else:
        cmd = c.get("Cmd") or []
    args = [str(a) for a in [*entrypoint, *cmd]]
    if not args:
        raise InvalidInput("the image has no Entrypoint or Cmd; give --entrypoint or --args")
    env = [str(e) for e in c.get("Env") or []]
    for extra in options.env:
        key = extra.split("=", 1)[0]
        env = [e for e in env if e.split("=", 1)[0] != key] + [extra]
    return ProcessSpec(args=args, env=env,
                       user=options.user if options.user is not None else str(c.get("User") or ""),
                       cwd=options.cwd or str(c.get("WorkingDir") or "/"))


def _list_only(source: ImageSource, layers: list[Descriptor], patterns: tuple[str, ...],
               work: str) -> list[Access]:
    """``--prefetch-list``: match paths and globs against the layers, no run."""
    listings: list[LayerListing] = []
    names_in_order: list[list[str]] = []
    for i, desc in enumerate(layers):
        path, ours = layer_blob(source, desc, i, os.path.join(work, "blobs"))
        listing = LayerListing()
        names: list[str] = []
        with open_tar(path, work) as tar:
            for ti in iter_headers(PeekableStream(tar, seekable=True)):
                check_member(ti)
                name = clean_name(ti.name)
                base = os.path.basename(name)
                if base == ".wh..wh..opq":
                    listing.opaque_dirs.add(os.path.dirname(name))
                elif base.startswith(".wh."):
                    listing.whiteouts.add(os.path.join(os.path.dirname(name), base[4:]))
                else:
                    listing.kinds[name] = "reg" if ti.isreg() else "other"
                    names.append(name)
        if ours:
            os.unlink(path)
        listings.append(listing)
        names_in_order.append(names)
    out: list[Access] = []
    seen: set[str] = set()
    for pattern in patterns:
        pat = clean_name(pattern)
        for i, names in enumerate(names_in_order):
            for name in names:
                if name in seen or listings[i].kinds.get(name) != "reg":
                    continue
                if (name == pat or fnmatch.fnmatchcase(name, pat)) \
                        and layer_for(name, listings) == i:
                    seen.add(name)
                    out.append(Access(name, i))
    return out


def optimize_image(src: str, dst: str | None,
                   options: OptimizeOptions = OptimizeOptions()) -> OptimizeResult:
    """Profile image ``src`` and write the optimized eStargz image to ``dst``."""
    # Over 60 lines: the steps of optimize in order (sweep, stage, profile,
    # record, convert), each one call, inside the cleanup that must span them.
    started = time.monotonic()
    if options.scratch_bytes < 1 << 20:  # a tmpfs of size 0 would have no limit at all
        raise InvalidInput(f"the scratch size must be at least 1 MiB, not "
                           f"{options.scratch_bytes} bytes")
    # What killed runs left: their directories, containers, cgroups.
    notes = [f"left by an earlier run: {p}" for p in sweep_stale()]
    sref = parse_reference(src)
    run = None
    image = None
    soci_result = None
    # One pass over the source: the manifest is resolved once and pinned,
    # each layer fetched and decompressed once into work/staged; the root
    # filesystem and the converter both read those copies.
    with work_directory() as work, \
            open_source(sref, options.convert.src) as inner, \
            StagedSource(inner, os.path.join(work, "staged"),
                         keep_compressed=options.soci is not None) as source:
        desc, manifest, config, from_index = host_manifest(source)
        root_data, root_type = source.root()
        source_root = Descriptor(
            root_type or str(load_json_object(root_data, "the image's root manifest")
                             .get("mediaType", "")),
            sha256_digest(root_data), len(root_data))
        layers = [Descriptor.from_json(d) for d in manifest.get("layers") or []]
        if options.prefetch_list is not None:
            accesses = _list_only(source, layers, options.prefetch_list, work)
            workload = ["(prefetch list)"]
        else:
            process = process_from_config(config, options)
            workload = process.args
            sandbox = SandboxOptions(
                runtime=options.runtime, period=options.period,
                wait_on_line=options.wait_on_line, wait_on_signal=options.wait_on_signal,
                wait_on_port=options.wait_on_port, wait_on_http=options.wait_on_http,
                net_host=options.net_host, mounts=list(options.mounts), quiet=options.quiet,
                output=options.output, workdir=work)
            if os.geteuid() == 0:
                accesses, run, more = profile_as_root(source, layers, process, sandbox, work,
                                                      options.scratch_bytes)
            else:
                accesses, run, more = profile_rootless(source, layers, process, sandbox, work,
                                                       scratch_bytes=options.scratch_bytes)
            notes.extend(more)
            if run.not_ready:
                notes.append(run.not_ready)
            if run.overflowed:
                notes.append("the fanotify queue overflowed: the record may be incomplete")
        records = per_layer(accesses, desc.digest)
        if options.record_out:
            with atomic_output(options.record_out) as f:
                text = io.StringIO()
                write_record(accesses, desc.digest, text)
                f.write(text.getvalue().encode())
        load_order = None
        if options.load_order_out or options.soci is not None:
            load_order = _load_order(records, desc.digest, layers,
                                     options.workload or _workload_name(workload))
        if options.load_order_out and load_order is not None:
            with atomic_output(options.load_order_out) as f:
                f.write(dump_load_order(load_order))
        if not options.no_optimize and options.soci is not None:
            soci = replace(options.soci, load_order=load_order,
                           platforms=options.convert.platforms,
                           all_platforms=options.convert.all_platforms,
                           reuse=options.convert.reuse, src=options.convert.src,
                           dst=options.convert.dst)
            soci_result = soci_index_source(source, sref, dst, soci, options.progress)
        elif not options.no_optimize:
            if dst is None:
                raise InvalidInput("optimize needs a destination unless --no-optimize")
            convert = replace(options.convert, records=records,
                              fallback_paths=tuple(by_path(records)))
            if from_index and (convert.all_platforms or len(convert.platforms) > 1):
                notes.append("only this machine's platform was profiled; other platforms get "
                             "the same files prioritized by path")
            image = convert_source(source, dst, convert, options.progress,
                                   source_name=str(sref))
    layer_reports = [r for r in (image.layers if image else []) if r.manifest == desc.digest]
    report = Report(image=str(sref), workload=list(workload), accesses=accesses,
                    layers=layer_reports, seconds=round(run.duration if run else 0.0, 2),
                    exit_status=run.exit_code if run else None,
                    timed_out=bool(run and run.timed_out), notes=notes)
    if options.report_html:
        write_html(report, options.report_html)
    return OptimizeResult(desc.digest, accesses, report, image, notes,
                          round(time.monotonic() - started, 3),
                          run.stopped_by.value if run else None, source_root,
                          soci_result, load_order)


def _workload_name(args: list[str]) -> str:
    """A load-order document's default name: the program's file name."""
    base = os.path.basename(args[0]) if args else ""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", base).lstrip("._-")[:128]
    return name or "workload"


def _load_order(records: dict[tuple[str, int], list[str]], manifest: str,
                layers: list[Descriptor], workload: str) -> LoadOrder:
    """The workload's load-order document; an empty one when it read nothing
    from the image."""
    if not any(digest == manifest for digest, _ in records):
        return LoadOrder(workload, manifest, ())
    return load_order_from_record(records, manifest, [x.digest for x in layers], workload)
