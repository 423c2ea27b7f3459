"""``estargz optimize`` (profile a workload, then convert with what it read
first) and ``estargz doctor`` (which profiling modes work here)."""

from __future__ import annotations

import datetime
import io
import json
import os
import sys
from typing import Any

import click

from profiler.capabilities import probe
from profiler.errors import ProfilingError
from profiler.optimize import OptimizeOptions, OptimizeResult, optimize_image
from profiler.record import write_record
from profiler.report import render_text
from profiler.rootfs import SCRATCH_BYTES
from profiler.sandbox import BindMount, parse_http_url

from .. import TransportOptions, reporting_to
from ..image.loadorder import check_workload
from ..image.reference import DockerName, parse_docker_name
from ..layer.order import read_prioritized_list
from ..registry.client import client_for
from ..registry.records import RecordPush, push_record
from .base import EXIT_USAGE, _fail, _json_list, _read_text_lines, _run
from .image import _image_convert_options, _image_options, _print_image_result, _Seconds
from .progress import ProgressDisplay
from .soci import print_soci_result, soci_index_options, soci_options_from

#: The longest ``--period``: a day is longer than any start-up worth
#: profiling, and keeps the deadline arithmetic far from float limits.
MAX_PERIOD = 86400.0


def _http_url(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            parse_http_url(value)
        except ProfilingError as e:
            raise click.BadParameter(str(e)) from None
    return value


def _push_record(result: OptimizeResult, to: DockerName,
                 options: TransportOptions) -> RecordPush:
    """``--record-out docker://…``: the record as an artifact referring to SRC."""
    assert result.source is not None
    text = io.StringIO()
    write_record(result.accesses, result.manifest_digest, text)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with client_for(to.registry, options) as client:
        return push_record(client, to.repository, text.getvalue().encode(), result.source,
                           created=created, tag=to.tag)


@click.command("optimize")
@click.argument("src")
@click.argument("dst", required=False)
@click.option("--period", type=_Seconds(0.1, MAX_PERIOD), default=10.0, show_default=True,
              help="Seconds to profile; the run also ends when the workload exits.")
@click.option("--wait-on-line", default=None, metavar="TEXT",
              help="End the profile when a line of the workload's output contains TEXT.")
@click.option("--wait-on-port", type=click.IntRange(1, 65535), default=None, metavar="PORT",
              help="End the profile when the workload accepts TCP connections on PORT "
                   "(in the sandbox's network).")
@click.option("--wait-on-http", default=None, metavar="URL", callback=_http_url,
              help="End the profile when GET URL (http://, in the sandbox's network) "
                   "answers 2xx.")
@click.option("--wait-on-signal", is_flag=True,
              help="Profile until Ctrl-C (SIGINT) instead of for a period.")
@click.option("--entrypoint", default=None, metavar="JSON",
              help='Entrypoint to run instead of the image\'s, e.g. \'["/bin/sh","-c"]\'.')
@click.option("--args", "args_json", default=None, metavar="JSON",
              help="Arguments instead of the image's Cmd, as a JSON array.")
@click.option("--env", multiple=True, metavar="K=V", help="Environment variable (repeatable).")
@click.option("--env-file", default=None, type=click.Path(dir_okay=False),
              help="File of K=V lines added to the environment.")
@click.option("--user", default=None, help="User (name, uid, name:group) to run as.")
@click.option("--cwd", default=None, help="Working directory in the container.")
@click.option("--mount", "mounts", multiple=True, metavar="type=bind,src=…,dst=…,options=…",
              help="Bind mount into the sandbox (repeatable).")
@click.option("--net-host", is_flag=True, help="Use the host's network (default: loopback only).")
@click.option("--runtime", default="runc", show_default=True, help="OCI runtime: runc or crun.")
@click.option("--scratch-size", type=click.IntRange(min=1, max=1 << 20),
              default=SCRATCH_BYTES >> 20, show_default=True, metavar="MIB",
              help="MiB the workload may write (a tmpfs under the image); past it writes fail"
                   " with ENOSPC and the report says so.")
@click.option("--record-out", default=None, metavar="FILE|docker://HOST/REPO[:TAG]",
              help="Write the access record (ctr-remote's JSON-lines format) to FILE, or "
                   "push it to REPO as an OCI artifact that refers to SRC (found by "
                   "convert --record-from-referrers; credentials and TLS as --dest-*).")
@click.option("--prefetch-list", default=None, type=click.Path(dir_okay=False),
              help="Prefetch these paths and globs (one a line) instead of running anything.")
@click.option("--no-optimize", is_flag=True, help="Profile only; do not convert.")
@click.option("--report", "report_html", default=None, type=click.Path(dir_okay=False),
              help="Write an HTML report.")
@click.option("--soci", is_flag=True,
              help="Leave the image unchanged and write a SOCI index for it instead, whose "
                   "prefetch artifacts hold what the workload read, in that order (DST "
                   "as for soci create; the --chunk-size and format options do not apply).")
@soci_index_options
@click.option("--load-order-out", default=None, type=click.Path(dir_okay=False),
              metavar="FILE",
              help="Write the workload's load-order document (files per layer in "
                   "first-access order; for soci create --load-order).")
@click.option("--workload", default=None, metavar="NAME",
              help="The load-order document's name (default: the entrypoint's file name).")
@_image_options
def optimize_cmd(src: str, dst: str | None, **kw: Any) -> None:
    """Profile image SRC's workload and convert it to eStargz at DST with the
    files it reads at start-up prefetched first."""
    def body() -> None:
        as_json, quiet = kw.pop("as_json"), kw.pop("quiet")
        env = list(kw.pop("env"))
        if kw["env_file"]:
            env += [line.strip() for line in _read_text_lines(kw["env_file"])
                    if line.strip() and not line.lstrip().startswith("#")]
        if kw["keep_diff_id"] and not kw["no_optimize"]:
            _fail("--keep-diff-id keeps each layer's order, so the files the workload "
                  "reads cannot be put first (add --no-optimize to only record)", EXIT_USAGE)
        soci = None
        use_soci = kw.pop("soci")
        if use_soci:
            _refuse_conversion_options(kw)
            soci = soci_options_from(kw)
        else:
            for name in ("span_size", "min_layer_size", "index_version",
                         "build_tool_identifier"):
                kw.pop(name)
        if kw["workload"] is not None:
            check_workload(kw["workload"])
        prefetch = None
        if kw["prefetch_list"]:
            prefetch = tuple(read_prioritized_list(_read_text_lines(kw["prefetch_list"])))
        if kw["wait_on_port"] is not None and kw["wait_on_http"] is not None:
            raise click.UsageError("give --wait-on-port or --wait-on-http, not both")
        record_out, push_to = kw["record_out"], None
        if record_out and record_out.startswith("docker://"):
            push_to = parse_docker_name(record_out.removeprefix("docker://"), default_tag=None)
            if push_to.digest:
                raise click.BadParameter("a record is pushed to docker://HOST/REPO[:TAG], "
                                         "not to a digest", param_hint="--record-out")
            record_out = None
        period = "until Ctrl-C" if kw["wait_on_signal"] else f"{kw['period']:g}s"
        display = ProgressDisplay.for_stderr(quiet=quiet, as_json=as_json,
                                             labels={"profile": f"profile ({period})"})
        options = OptimizeOptions(
            convert=_image_convert_options(kw), runtime=kw["runtime"], period=kw["period"],
            wait_on_line=kw["wait_on_line"], wait_on_signal=kw["wait_on_signal"],
            wait_on_port=kw["wait_on_port"], wait_on_http=kw["wait_on_http"],
            entrypoint=_json_list(kw["entrypoint"], "--entrypoint"),
            args=_json_list(kw["args_json"], "--args"), env=tuple(env), user=kw["user"],
            cwd=kw["cwd"], mounts=tuple(BindMount.parse(m) for m in kw["mounts"]),
            net_host=kw["net_host"], record_out=record_out, prefetch_list=prefetch,
            no_optimize=kw["no_optimize"], report_html=kw["report_html"], quiet=quiet or as_json,
            output=display.echo, progress=display,
            scratch_bytes=kw["scratch_size"] << 20, soci=soci,
            load_order_out=kw["load_order_out"], workload=kw["workload"])
        with display, reporting_to(display.sink("image")):
            result = optimize_image(src, dst, options)
        pushed = _push_record(result, push_to, options.convert.dst) if push_to else None
        if as_json:
            out = {"manifest": result.manifest_digest, "seconds": result.seconds,
                   "stopped_by": result.stopped_by, "profile_seconds": result.report.seconds,
                   "accessed": [a.__dict__ for a in result.accesses], "notes": result.notes,
                   "image": result.image.to_dict() if result.image else None,
                   "soci": result.soci.to_dict() if result.soci else None,
                   "record": pushed.__dict__ if pushed else None}
            click.echo(json.dumps(out, indent=2))
        elif not quiet:
            click.echo(render_text(result.report))
            if result.image:
                _print_image_result(result.image, False, False)
            if result.soci:
                print_soci_result(result.soci, False, False)
            if pushed:
                click.echo(f"record: docker://{pushed.reference} (refers to {pushed.subject}; "
                           f"listed by {pushed.found_by})")
    _run(body)


def _refuse_conversion_options(kw: dict[str, Any]) -> None:
    """``--soci`` converts nothing: a conversion option set is a usage error."""
    given = [flag for flag, key, default in (
        ("--external-toc", "external_toc", False), ("--keep-diff-id", "keep_diff_id", False),
        ("--min-chunk-size", "min_chunk_size", 0)) if kw.get(key) != default]
    if kw.get("layer_format") is not None or kw.get("zstdchunked"):
        given.append("--format")
    if kw.get("compression_level") is not None:
        given.append("--compression-level")
    if given:
        raise click.UsageError(f"--soci leaves the layers as they are: drop {', '.join(given)}")


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the modes as one JSON object.")
@click.option("--require", "require", type=click.Choice(["root", "rootless"]), default=None,
              help="Exit 1 unless this profiling mode is supported.")
def doctor_cmd(as_json: bool, require: str | None) -> None:
    """Check which profiling modes (root, rootless) work here, and why not."""
    modes = probe()
    if as_json:
        click.echo(json.dumps({"modes": [m.to_dict() for m in modes]}, indent=2))
    else:
        for m in modes:
            later = " (what estargz optimize uses for this user)" if m.used_by_optimize else ""
            click.echo(f"{m.name}: {'supported' if m.supported else 'not supported'}{later}")
            for c in m.checks:
                click.echo(f"  [{'ok' if c.ok else 'no'}] {c.name}: {c.detail}")
            for r in m.reasons:
                click.echo(f"  missing: {r}")
    if require is not None:
        mode = next(m for m in modes if m.name == require)
        if not mode.supported:
            hint = "; run as root" if require == "rootless" or os.geteuid() != 0 else ""
            click.echo(f"estargz: error: profiling mode {require} is not supported: "
                       f"{'; '.join(mode.reasons)}{hint}", err=True)
            sys.exit(1)
