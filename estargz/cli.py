"""The ``estargz`` command line. The only place errors become exit codes.

Exit codes: 0 success; 1 invalid input or a blob that fails verification;
2 usage error; 3 a file could not be read or written; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import sys
import time
from typing import Any, Callable, Iterator, Optional

import click

from . import __version__
from ._exceptions import EstargzError, NotFound, StorageError
from ._fsutil import atomic_output
from .compression import BACKENDS, DEFAULT_BACKEND
from .converter import (DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, ConvertOptions,
                        convert_layer)
from .order import read_prioritized_list
from .reader import LayerReader
from .source import FileSource
from .verify import verify_blob

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int) -> None:
    click.echo(f"estargz: error: {message}", err=True)
    sys.exit(code)


def _run(fn: Callable[[], Any]) -> Any:
    """Run a command body, turning our errors and Ctrl-C into exit codes."""
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return fn()
    except EstargzError as e:
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader of our output went away (``| head``): not our error.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        sys.exit(1)
    except OSError as e:
        name = f" {e.filename}" if e.filename else ""
        _fail(f"cannot access{name}: {e.strerror or e}", StorageError.exit_code)
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="estargz")
def main() -> None:
    """Convert container image layers to eStargz, for lazy pulling."""


def _creds(text: Optional[str], option: str) -> Optional[tuple[str, str]]:
    from .auth import parse_creds
    return None if text is None else parse_creds(text, option)


def _tls(value: str) -> bool:
    return value.lower() not in ("false", "0", "no")


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


def _image_options(f: Callable) -> Callable:
    """The options ``convert`` and ``optimize`` share."""
    for opt in reversed(_IMAGE_OPTIONS):
        f = opt(f)
    return f


def _image_convert_options(kw: dict, records: Optional[dict] = None) -> Any:
    """Build ``ImageConvertOptions`` from the shared options (popped from ``kw``)."""
    from .descriptor import Platform
    from .imageconvert import ImageConvertOptions
    from .imagestore import TransportOptions

    cert_dir, authfile = kw.pop("cert_dir"), kw.pop("authfile")
    return ImageConvertOptions(
        layer=ConvertOptions(chunk_size=kw.pop("chunk_size"),
                             compression_level=kw.pop("compression_level"),
                             workers=kw.pop("workers"), backend=kw.pop("backend")),
        oci=kw.pop("oci"), platforms=tuple(Platform.parse(p) for p in kw.pop("platforms")),
        all_platforms=kw.pop("all_platforms"), reuse=kw.pop("reuse"), records=records or {},
        src=TransportOptions(tls_verify=_tls(kw.pop("src_tls_verify")), cert_dir=cert_dir,
                             credentials=_creds(kw.pop("src_creds"), "--src-creds"),
                             auth_file=authfile),
        dst=TransportOptions(tls_verify=_tls(kw.pop("dest_tls_verify")), cert_dir=cert_dir,
                             credentials=_creds(kw.pop("dest_creds"), "--dest-creds"),
                             auth_file=authfile))


def _print_image_result(result: Any, as_json: bool, quiet: bool) -> None:
    if not quiet:
        for w in result.warnings:
            click.echo(f"estargz: warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        dropped = f", dropped {len(result.dropped)} index entries" if result.dropped else ""
        click.echo(f"{result.destination}: {result.digest} "
                   f"({len(result.layers)} layers{dropped}, {result.seconds:.1f}s)")


def _read_text_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}") from None


@main.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--record-in", type=click.Path(dir_okay=False), default=None,
              help="Prioritized files per layer, as written by ctr-remote optimize "
                   "--record-out (JSON lines).")
@_image_options
def image_convert_cmd(src: str, dst: str, record_in: Optional[str], **kw: Any) -> None:
    """Convert image SRC to eStargz at DST.

    References as in skopeo: oci:PATH[:TAG] (or a bare PATH), oci-archive:PATH[:TAG],
    docker-archive:PATH[:NAME:TAG], docker://HOST[:PORT]/REPO[:TAG|@DIGEST],
    docker-daemon:NAME[:TAG].
    """
    from .imageconvert import convert_image, read_records

    def body() -> None:
        as_json, quiet = kw.pop("as_json"), kw.pop("quiet")
        records = read_records(_read_text_lines(record_in)) if record_in else {}
        options = _image_convert_options(kw, records)
        show = not quiet and not as_json and sys.stderr.isatty()

        def progress(event: str, report: Any) -> None:
            if show:
                click.echo(f"layer {report.index} {report.old_digest[:19]} "
                           f"{report.old_size:>12,} -> {report.new_size:>12,}  "
                           f"{report.action} {report.seconds:.1f}s", err=True)

        _print_image_result(convert_image(src, dst, options, progress), as_json, quiet)
    _run(body)


def _json_list(text: Optional[str], option: str) -> Optional[list[str]]:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise click.BadParameter(f"{option} takes a JSON array of strings") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise click.BadParameter(f"{option} takes a JSON array of strings")
    return value


@main.command("optimize")
@click.argument("src")
@click.argument("dst", required=False)
@click.option("--period", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds to profile; the run also ends when the workload exits.")
@click.option("--wait-on-line", default=None, metavar="TEXT",
              help="End the profile when a line of the workload's output contains TEXT.")
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
@click.option("--record-out", default=None, type=click.Path(dir_okay=False),
              help="Write the access record (ctr-remote's JSON-lines format).")
@click.option("--prefetch-list", default=None, type=click.Path(dir_okay=False),
              help="Prefetch these paths and globs (one a line) instead of running anything.")
@click.option("--no-optimize", is_flag=True, help="Profile only; do not convert.")
@click.option("--report", "report_html", default=None, type=click.Path(dir_okay=False),
              help="Write an HTML report.")
@_image_options
def optimize_cmd(src: str, dst: Optional[str], **kw: Any) -> None:
    """Profile image SRC's workload and convert it to eStargz at DST with the
    files it reads at start-up prefetched first."""
    def body() -> None:
        from profiler.optimize import OptimizeOptions, optimize_image
        from profiler.report import render_text
        from profiler.sandbox import BindMount

        as_json, quiet = kw.pop("as_json"), kw.pop("quiet")
        env = list(kw.pop("env"))
        if kw["env_file"]:
            env += [l.strip() for l in _read_text_lines(kw["env_file"])
                    if l.strip() and not l.lstrip().startswith("#")]
        prefetch = None
        if kw["prefetch_list"]:
            from .order import read_prioritized_list
            prefetch = tuple(read_prioritized_list(_read_text_lines(kw["prefetch_list"])))
        options = OptimizeOptions(
            convert=_image_convert_options(kw), runtime=kw["runtime"], period=kw["period"],
            wait_on_line=kw["wait_on_line"], wait_on_signal=kw["wait_on_signal"],
            entrypoint=_json_list(kw["entrypoint"], "--entrypoint"),
            args=_json_list(kw["args_json"], "--args"), env=tuple(env), user=kw["user"],
            cwd=kw["cwd"], mounts=tuple(BindMount.parse(m) for m in kw["mounts"]),
            net_host=kw["net_host"], record_out=kw["record_out"], prefetch_list=prefetch,
            no_optimize=kw["no_optimize"], report_html=kw["report_html"], quiet=quiet or as_json,
            output=(lambda line: click.echo(line, err=True)))
        result = optimize_image(src, dst, options)
        if as_json:
            out = {"manifest": result.manifest_digest, "seconds": result.seconds,
                   "accessed": [a.__dict__ for a in result.accesses], "notes": result.notes,
                   "image": result.image.to_dict() if result.image else None}
            click.echo(json.dumps(out, indent=2))
        elif not quiet:
            click.echo(render_text(result.report))
            if result.image:
                _print_image_result(result.image, False, False)
    _run(body)



def _remote_options(f: Callable) -> Callable:
    """Options for reading a blob from a registry (``docker://HOST/REPO@DIGEST``)."""
    for opt in reversed([
        click.option("--tls-verify", default="true", metavar="BOOL",
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
def _open_blob(blob: str, tls_verify: str, creds: Optional[str], cert_dir: Optional[str],
               authfile: Optional[str]) -> Iterator[Any]:
    """A range source for a local file or a registry blob.

    A registry blob is read with HTTP range requests only: the footer, the
    TOC and whatever chunks are asked for, never the whole layer unless
    every byte is needed (``verify``).
    """
    if not blob.startswith("docker://"):
        with FileSource(blob) as src:
            yield src
        return
    from .reference import parse_docker_name
    from .registry import RegistryClient

    name = parse_docker_name(blob[len("docker://"):], default_tag=None)
    if not name.digest:
        raise click.BadParameter(f"{blob}: a registry blob is named by digest "
                                 "(docker://HOST/REPO@sha256:…)")
    with RegistryClient(name.registry, tls_verify=_tls(tls_verify), cert_dir=cert_dir,
                        credentials=_creds(creds, "--creds"), auth_file=authfile) as client:
        size = client.head_blob(name.repository, name.digest)
        if size is None:
            raise NotFound(f"blob {name.digest} is not in {name.registry}/{name.repository}")
        yield client.blob_source(name.repository, name.digest, size)


@main.group()
def layer() -> None:
    """Convert, verify and read single eStargz layer blobs."""


def _emit(result: dict, as_json: bool, labels: dict[str, str]) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    width = max(len(v) for v in labels.values())
    for key, label in labels.items():
        click.echo(f"{label + ':':<{width + 1}} {result[key]}")


@layer.command("convert")
@click.argument("src", metavar="IN")
@click.argument("dst", metavar="OUT")
@click.option("--chunk-size", type=click.IntRange(min=1), default=DEFAULT_CHUNK_SIZE,
              show_default=True, help="Largest payload chunk, in bytes.")
@click.option("--compression-level", type=click.IntRange(0, 9), default=DEFAULT_LEVEL,
              show_default=True, help="gzip level.")
@click.option("--workers", type=click.IntRange(min=0), default=0,
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
def convert_cmd(src: str, dst: str, chunk_size: int, compression_level: int, workers: int,
                prioritized_files: Optional[str], allow_missing: bool, backend: str,
                as_json: bool, quiet: bool) -> None:
    """Convert layer IN (tar, tar+gzip or tar+zstd; - for stdin) to eStargz OUT."""
    def body() -> None:
        prioritized = None
        if prioritized_files is not None:
            try:
                with open(prioritized_files, encoding="utf-8") as f:
                    prioritized = read_prioritized_list(f)
            except OSError as e:
                raise StorageError(f"cannot read {prioritized_files}: {e.strerror}") from None
        options = ConvertOptions(chunk_size=chunk_size, compression_level=compression_level,
                                 workers=workers, prioritized_files=prioritized,
                                 allow_missing=allow_missing, backend=backend)
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
    _run(body)


@layer.command("verify")
@_remote_options
@click.argument("blob")
@click.option("--toc-digest", default=None, metavar="sha256:…",
              help="Expected TOC digest (e.g. from the manifest annotation).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def verify_cmd(blob: str, toc_digest: Optional[str], as_json: bool, quiet: bool,
               **remote: Any) -> None:
    """Check every byte of eStargz BLOB: footer, TOC, digests, gzip and tar."""
    def body() -> None:
        started = time.monotonic()
        with _open_blob(blob, **remote) as src:
            report = verify_blob(src, toc_digest)
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
            reader = LayerReader(src)
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
            reader = LayerReader(src)
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
def extract_cmd(blob: str, path: str, output: Optional[str], **remote: Any) -> None:
    """Write file PATH of eStargz BLOB, verified, reading only its chunks."""
    def body() -> None:
        with _open_blob(blob, **remote) as src:
            reader = LayerReader(src)
            if output is None:
                # Verify before printing anything: a file is at most one
                # layer's worth, spooled through a temporary file.
                import tempfile
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



@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the modes as one JSON object.")
@click.option("--require", "require", type=click.Choice(["root", "rootless"]), default=None,
              help="Exit 1 unless this profiling mode is supported.")
def doctor_cmd(as_json: bool, require: Optional[str]) -> None:
    """Check which profiling modes (root, rootless) work here, and why not."""
    from profiler.capabilities import probe

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
