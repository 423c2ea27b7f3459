"""``estargz optimize``: profile the workload, then convert with what it read first.

1. Pick the host platform's manifest and read its config.
2. Assemble the root filesystem from the layers (``rootfs.py``: extracted
   safely, stacked read-only under a throwaway upper layer).  Without root,
   ``rootless.py`` flattens them onto a tmpfs in a user namespace instead,
   and runs steps 3 and 4 there.
3. Run Entrypoint + Cmd in the sandbox (``sandbox.py``) while fanotify records
   every file it opens, reads or executes, in first-access order.
4. Map each path, symlinks followed, to the layer that provides it
   (``layermap.py``): that is the record, per layer.
5. Convert the image with those prioritized files (``estargz convert``):
   accessed files precede ``.prefetch.landmark`` in their layers; layers with
   none get ``.no.prefetch.landmark``. Other platforms of an index get the
   same paths by path.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from estargz._exceptions import InvalidInput
from estargz.descriptor import INDEX_TYPES, Descriptor, sha256_digest
from estargz.imageconvert import (ImageConvertOptions, ImageResult, convert_image,
                                  host_platform_default)
from estargz.imagestore import ImageSource, open_source
from estargz.reference import parse_reference

from .layermap import LayerListing, layer_for, link_targets, resolve
from .record import Access, by_path, per_layer, write_record
from .report import LayerSummary, Report
from .rootfs import assemble_image_rootfs
from .rootless import profile_rootless
from .sandbox import BindMount, ProcessSpec, SandboxOptions, run_profiled


@dataclass(frozen=True)
class OptimizeOptions:
    """The options of ``ctr-remote image optimize``, plus every ``convert`` one."""

    convert: ImageConvertOptions = ImageConvertOptions()
    runtime: str = "runc"
    period: float = 10.0
    wait_on_line: Optional[str] = None
    wait_on_signal: bool = False
    entrypoint: Optional[list[str]] = None
    args: Optional[list[str]] = None
    env: tuple[str, ...] = ()
    user: Optional[str] = None
    cwd: Optional[str] = None
    mounts: tuple[BindMount, ...] = ()
    net_host: bool = False
    record_out: Optional[str] = None
    #: Paths and globs to prefetch instead of running the workload.
    prefetch_list: Optional[tuple[str, ...]] = None
    #: Profile (and write the record) but do not convert.
    no_optimize: bool = False
    report_html: Optional[str] = None
    quiet: bool = False
    output: Optional[Callable[[str], None]] = None


@dataclass
class OptimizeResult:
    """What ``optimize`` did."""

    manifest_digest: str
    accesses: list[Access]
    report: Report
    image: Optional[ImageResult] = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


_MAX_JSON = 16 << 20


def _read_json(source: ImageSource, desc: Descriptor, what: str) -> dict:
    if desc.size > _MAX_JSON:
        raise InvalidInput(f"{what} {desc.digest} is implausibly large")
    buf = io.BytesIO()
    source.fetch_blob(desc, buf)
    try:
        obj = json.loads(buf.getvalue())
    except ValueError as e:
        raise InvalidInput(f"{what} {desc.digest} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"{what} {desc.digest} is not a JSON object")
    return obj


def host_manifest(source: ImageSource) -> tuple[Descriptor, dict, dict, bool]:
    """The manifest this machine can run: ``(descriptor, manifest, config,
    from_index)``."""
    data, media_type = source.root()
    root = json.loads(data)
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
        manifest = json.loads(source.get_manifest(desc))
        from_index = True
    else:
        desc = Descriptor(media_type, sha256_digest(data), len(data))
        manifest, from_index = root, False
    config = _read_json(source, Descriptor.from_json(manifest["config"]), "config")
    return desc, manifest, config, from_index


def process_from_config(config: dict, options: OptimizeOptions) -> ProcessSpec:
    """Entrypoint + Cmd, Env, User and WorkingDir of the image, with overrides."""
    c = config.get("config") or {}
    entrypoint = options.entrypoint if options.entrypoint is not None else (c.get("Entrypoint") or [])
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


#: Files the container runtime reads from the image before the entrypoint's
#: first instruction, where fanotify cannot see them (it is armed on the
#: container's root between ``runc create`` and ``runc start``): containerd
#: reads etc/group for the supplementary groups of the image's user (also when
#: the image names none), runc's init reads etc/passwd and etc/group to set up
#: the user. Through a lazy snapshotter each would be fetched on demand, a
#: registry round trip apiece, before the workload could start; recorded first,
#: they are prefetched instead.
RUNTIME_READS = ("etc/passwd", "etc/group")


def map_accesses(run_accesses, listings: list[LayerListing], root: str) -> list[Access]:
    """The run's accesses as the record has them: the runtime's own reads
    (:data:`RUNTIME_READS`, where the image has them as regular files) first,
    then the workload's; symlinks resolved inside the image, each file once,
    credited to the layer that provides it; files the layers do not hold
    (written by the workload) are dropped."""
    links = link_targets(listings)
    out: list[Access] = []
    seen: set[str] = set()
    observed = [(a.path, a.time, str(getattr(a.kind, "value", a.kind))) for a in run_accesses]
    for path, seconds, kind in [*((p, 0.0, "runtime") for p in RUNTIME_READS), *observed]:
        try:
            real = resolve(path, listings, links)
        except InvalidInput:
            continue
        if not real or real in seen:
            continue
        layer = layer_for(real, listings)
        if layer is None:
            continue  # written by the workload, or not there at all
        if kind == "runtime" and listings[layer].kinds.get(real) not in ("reg", "hardlink"):
            continue
        seen.add(real)
        try:
            size = os.lstat(os.path.join(root, real)).st_size
        except OSError:
            size = 0
        out.append(Access(real, layer, round(seconds, 4), size, kind))
    return out


def _list_only(source: ImageSource, layers: list[Descriptor], patterns: tuple[str, ...],
               work: str) -> list[Access]:
    """``--prefetch-list``: match paths and globs against the layers, no run."""
    from estargz._tarstream import PeekableStream, iter_headers
    from estargz.layerinput import open_tar
    from estargz.toc import clean_name

    listings: list[LayerListing] = []
    names_in_order: list[list[str]] = []
    for desc in layers:
        path = source.local_blob_path(desc)
        tmp = None
        if path is None:
            fd, tmp = tempfile.mkstemp(dir=work)
            with os.fdopen(fd, "wb") as f:
                source.fetch_blob(desc, f)
            path = tmp
        listing = LayerListing()
        names: list[str] = []
        with open_tar(path, work) as tar:
            for ti in iter_headers(PeekableStream(tar, seekable=True)):
                name = clean_name(ti.name)
                base = os.path.basename(name)
                if base == ".wh..wh..opq":
                    listing.opaque_dirs.add(os.path.dirname(name))
                elif base.startswith(".wh."):
                    listing.whiteouts.add(os.path.join(os.path.dirname(name), base[4:]))
                else:
                    listing.kinds[name] = "reg" if ti.isreg() else "other"
                    names.append(name)
        if tmp:
            os.unlink(tmp)
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
                if (name == pat or fnmatch.fnmatchcase(name, pat)) and layer_for(name, listings) == i:
                    seen.add(name)
                    out.append(Access(name, i))
    return out


def optimize_image(src: str, dst: Optional[str],
                   options: OptimizeOptions = OptimizeOptions()) -> OptimizeResult:
    """Profile image ``src`` and write the optimized eStargz image to ``dst``."""
    started = time.monotonic()
    notes: list[str] = []
    sref = parse_reference(src)
    run = None
    with tempfile.TemporaryDirectory(prefix="estargz-optimize-") as work, \
            open_source(sref, options.convert.src) as source:
        desc, manifest, config, from_index = host_manifest(source)
        layers = [Descriptor.from_json(l) for l in manifest.get("layers") or []]
        if options.prefetch_list is not None:
            accesses = _list_only(source, layers, options.prefetch_list, work)
            workload = ["(prefetch list)"]
        else:
            process = process_from_config(config, options)
            workload = process.args
            sandbox = SandboxOptions(
                runtime=options.runtime, period=options.period,
                wait_on_line=options.wait_on_line, wait_on_signal=options.wait_on_signal,
                net_host=options.net_host, mounts=list(options.mounts), quiet=options.quiet,
                output=options.output, workdir=work)
            if os.geteuid() == 0:
                with assemble_image_rootfs(source, layers, os.path.join(work, "root")) \
                        as (root, listings):
                    run = run_profiled(root, process, sandbox)
                    accesses = map_accesses(run.accesses, listings, root)
            else:
                accesses, run = profile_rootless(source, layers, process, sandbox, work)
            if run.overflowed:
                notes.append("the fanotify queue overflowed: the record may be incomplete")
    records = per_layer(accesses, desc.digest)
    if options.record_out:
        from estargz._fsutil import atomic_output
        with atomic_output(options.record_out) as f:
            text = io.StringIO()
            write_record(accesses, desc.digest, text)
            f.write(text.getvalue().encode())
    image = None
    if not options.no_optimize:
        if dst is None:
            raise InvalidInput("optimize needs a destination unless --no-optimize")
        convert = replace(options.convert, records=records,
                          fallback_paths=tuple(by_path(records)))
        if from_index and (convert.all_platforms or len(convert.platforms) > 1):
            notes.append("only this machine's platform was profiled; other platforms get "
                         "the same files prioritized by path")
        image = convert_image(src, dst, convert)
    layer_reports = [l for l in (image.layers if image else []) if l.manifest == desc.digest]
    counts: dict[int, int] = {}
    for a in accesses:
        counts[a.layer] = counts.get(a.layer, 0) + 1
    summaries = [LayerSummary(l.index, l.new_digest, l.new_size, l.prefetch_size, l.toc_size,
                              counts.get(l.index, 0)) for l in layer_reports]
    report = Report(image=str(sref), workload=list(workload), accesses=accesses,
                    layers=summaries, seconds=round(run.duration if run else 0.0, 2),
                    exit_status=run.exit_code if run else None,
                    timed_out=bool(run and run.timed_out), notes=notes)
    if options.report_html:
        from .report import write_html
        write_html(report, options.report_html)
    return OptimizeResult(desc.digest, accesses, report, image, notes,
                          round(time.monotonic() - started, 3))
