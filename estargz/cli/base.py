"""The ``estargz`` command group and what every command shares: the only
place errors become exit codes.

Exit codes: 0 success; 1 invalid input or a blob that fails verification;
2 usage error; 3 a file could not be read or written; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from .._cancel import interrupt_on_signals
from .._exceptions import Cancelled, EstargzError, InvalidInput, StorageError
from .._version import __version__
from ..layer.inputfile import open_input
from ..layer.jsondoc import load_json

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int) -> None:
    click.echo(f"estargz: error: {message}", err=True)
    sys.exit(code)


def _run(fn: Callable[[], Any]) -> Any:
    """Run a command body, turning our errors and Ctrl-C into exit codes.

    The first SIGINT or SIGTERM cancels the work in every thread
    (:mod:`estargz._cancel`); what was half-written is removed on the way
    out, and a second signal does not cut that short."""
    try:
        with interrupt_on_signals():
            return fn()
    except (KeyboardInterrupt, Cancelled):
        _interrupted()
    except EstargzError as e:
        _fail(str(e), e.exit_code)
    except BrokenPipeError:
        # The reader of our output went away (``| head``): not our error.
        with contextlib.suppress(OSError):
            # Stays open as stdout until exit: what is still buffered goes nowhere.
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        sys.exit(1)
    except OSError as e:
        name = f" {e.filename}" if e.filename else ""
        _fail(f"cannot access{name}: {e.strerror or e}", StorageError.exit_code)


def _interrupted() -> None:
    """Exit 130 now. The outputs are cleaned up by the time we get here; a
    worker thread may still be blocked in a socket read until its timeout,
    and waiting for it (as interpreter exit would) is what Ctrl-C must not do."""
    click.echo("estargz: error: interrupted", err=True)
    if threading.active_count() > 1:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_INTERRUPTED)


#: The smallest ``--chunk-size``. Below one tar block a chunk's TOC entry
#: (about 200 bytes of JSON) and gzip member (18 bytes of framing or more)
#: cost nearly half the chunk itself, and a layer of a few hundred MiB would
#: need a TOC over the 128 MiB readers accept. The reference takes any
#: positive size; the library still does (the format tests use 1 byte).
MIN_CHUNK_SIZE = 512


class _Bool(click.ParamType):
    """A boolean option value, strictly: what Go's strconv.ParseBool takes
    (as skopeo's ``--tls-verify`` does) plus yes/no and on/off. click.BOOL
    also takes the empty string, as false: for ``--tls-verify`` that would
    silently allow plain HTTP."""

    name = "boolean"
    _VALUES = {**dict.fromkeys(("1", "t", "true", "y", "yes", "on"), True),
               **dict.fromkeys(("0", "f", "false", "n", "no", "off"), False)}

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> bool:
        if isinstance(value, bool):
            return value
        found = self._VALUES.get(str(value).strip().lower())
        if found is None:
            self.fail(f"{value!r} is not a boolean (true or false)", param, ctx)
        return found


BOOL = _Bool()


class LazyGroup(click.Group):
    """A command group whose subcommands are loaded when first used.

    ``lazy`` maps a command name to ``"module:attribute"`` within this
    package. A command's module, and what it imports (requests for the
    registry, the profiler, rich), then costs start-up time only for the
    commands that need it: ``layer convert`` starts in half the time
    (docs/benchmarks.md, zstd:chunked). The pattern is click's own
    ("Lazily Loading Subcommands" in its documentation).
    """

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module, attr = self.lazy[cmd_name].split(":")
        command = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.lazy[cmd_name]} is not a click command")
        return command


class _Main(LazyGroup):
    """The ``estargz`` group: usage errors are one line too
    (``estargz: error: ...``, exit 2), like every other error."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        # (click types main() by overloads on a literal standalone_mode)
        if not kwargs.pop("standalone_mode", True):
            return super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[call-overload]
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[call-overload]
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except click.Abort:  # Ctrl-C while the command line is parsed
            _fail("interrupted", EXIT_INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]},
             lazy={"convert": "image:image_convert_cmd", "doctor": "optimize:doctor_cmd",
                   "layer": "layer:layer", "optimize": "optimize:optimize_cmd",
                   "soci": "soci:soci_group"})
@click.version_option(__version__, prog_name="estargz")
def main() -> None:
    """Convert container image layers to eStargz, for lazy pulling."""


def _read_text_lines(path: str) -> list[str]:
    """The lines of a list or record file named by an option; a device, a
    directory or a FIFO without a writer is refused, not read for ever."""
    try:
        with io.TextIOWrapper(open_input(path, "input file"), encoding="utf-8") as f:
            return f.readlines()
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{path} is not UTF-8 text") from None


def _json_list(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    try:
        value = load_json(text, option)
    except InvalidInput as e:
        raise click.BadParameter(f"{option} takes a JSON array of strings ({e})") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise click.BadParameter(f"{option} takes a JSON array of strings")
    return value


# --- the output format, shared by `layer convert`, `convert` and `optimize` ---

FORMAT_CHOICES = ("estargz", "zstd:chunked")
_DEFAULT_LEVELS = {"estargz": 9, "zstd:chunked": 3}
_LEVEL_RANGES = {"estargz": (0, 9), "zstd:chunked": (1, 22)}

FORMAT_OPTIONS = [
    click.option("--format", "layer_format", type=click.Choice(FORMAT_CHOICES),
                 default=None,
                 help="Layer format: estargz (default; gzip) or zstd:chunked (what podman "
                      "and CRI-O pull partially)."),
    click.option("--zstdchunked", is_flag=True,
                 help="Same as --format zstd:chunked (as ctr-remote and nerdctl say it)."),
    click.option("--compression-level", type=int, default=None,
                 help="gzip level 0-9 (default 9) for estargz; zstd level 1-22 "
                      "(default 3, as the reference) for zstd:chunked."),
]


def format_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--format``, ``--zstdchunked`` and ``--compression-level``."""
    for opt in reversed(FORMAT_OPTIONS):
        f = opt(f)
    return f


def resolve_format(kw: dict[str, Any]) -> dict[str, Any]:
    """Pop the format options from ``kw``; return ``ConvertOptions`` fields.

    Bad combinations are usage errors (exit 2) with one line."""
    fmt, alias, level = kw.pop("layer_format"), kw.pop("zstdchunked"), kw.pop("compression_level")
    if alias and fmt not in (None, "zstd:chunked"):
        raise click.UsageError(f"--zstdchunked contradicts --format {fmt}")
    fmt = "zstd:chunked" if alias else (fmt or "estargz")
    lo, hi = _LEVEL_RANGES[fmt]
    if level is None:
        level = _DEFAULT_LEVELS[fmt]
    elif not lo <= level <= hi:
        raise click.BadParameter(f"{level} is not in {lo}-{hi} for {fmt}",
                                 param_hint="'--compression-level'")
    if fmt == "zstd:chunked":
        return {"format": fmt, "zstd_level": level}
    return {"format": fmt, "compression_level": level}
