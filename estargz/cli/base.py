"""The ``estargz`` command group and what every command shares: the only
place errors become exit codes.

Exit codes: 0 success; 1 invalid input or a blob that fails verification;
2 usage error; 3 a file could not be read or written; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from .._exceptions import EstargzError, StorageError
from .._version import __version__
from ..registry.credentials import parse_creds

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
            # Stays open as stdout until exit: what is still buffered goes nowhere.
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
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


def _creds(text: str | None, option: str) -> tuple[str, str] | None:
    return None if text is None else parse_creds(text, option)


def _tls(value: str) -> bool:
    return value.lower() not in ("false", "0", "no")


def _read_text_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}") from None


def _json_list(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise click.BadParameter(f"{option} takes a JSON array of strings") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise click.BadParameter(f"{option} takes a JSON array of strings")
    return value
