"""The whole exception tree of estargz, in one place.

Every error the library raises on purpose derives from :class:`EstargzError`,
so a caller (and the CLI, which turns them into exit codes) needs to catch
only that one::

    EstargzError
    ├── InvalidInput            the input tar / options cannot be converted
    │   ├── UnsupportedEntry    a tar entry kind eStargz cannot represent
    │   └── MissingPrioritizedFiles
    ├── InvalidBlob             an eStargz blob is malformed (reader, verifier)
    │   ├── FooterError         the footer cannot locate a TOC
    │   ├── TOCError            the TOC entry or its JSON is wrong
    │   └── DigestMismatch      content or TOC does not match its digest
    ├── NotFound                a path, image, tag or blob does not exist
    ├── StorageError            reading or writing the filesystem failed
    ├── RegistryError           a registry or daemon refused or failed a request
    │   └── AuthenticationError 401/403: credentials missing or refused
    └── Cancelled               SIGINT/SIGTERM asked the run to stop (estargz._cancel)

Errors carry a one-line message meant for people; ``InvalidBlob`` subclasses
also carry the ``entry`` name and blob ``offset`` where known.
"""

from __future__ import annotations


class EstargzError(Exception):
    """Base of every error raised by estargz on purpose."""

    #: Process exit code the CLI uses for this kind of error.
    exit_code = 1


class InvalidInput(EstargzError):
    """The input layer or the options given cannot be converted."""


class UnsupportedEntry(InvalidInput):
    """A tar entry has a kind (or a name) that eStargz cannot represent."""

    def __init__(self, entry: str, why: str) -> None:
        super().__init__(f"'{entry}': {why}")
        self.entry = entry


class MissingPrioritizedFiles(InvalidInput):
    """Prioritized paths that the layer does not contain."""

    def __init__(self, paths: list[str]) -> None:
        shown = ", ".join(repr(p) for p in paths[:5])
        more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
        super().__init__(
            f"prioritized file not in the layer: {shown}{more}"
            " (use --allow-missing to skip missing files)")
        self.paths = paths


class InvalidBlob(EstargzError):
    """An eStargz blob is malformed. ``entry``/``offset`` locate the problem."""

    def __init__(self, message: str, *, entry: str | None = None,
                 offset: int | None = None) -> None:
        where = []
        if entry is not None:
            where.append(f"entry {entry!r}")
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.entry = entry
        self.offset = offset


class FooterError(InvalidBlob):
    """The footer is missing or does not locate a TOC inside the blob."""


class TOCError(InvalidBlob):
    """The TOC tar entry or its JSON is malformed or inconsistent."""


class DigestMismatch(InvalidBlob):
    """Content (a chunk, a file, the TOC, a blob) does not match its digest."""


class NotFound(EstargzError):
    """A path asked for is not in the layer."""


class StorageError(EstargzError):
    """Reading an input or writing an output failed (missing file, full disk)."""

    exit_code = 3


class RegistryError(EstargzError):
    """A registry (or the Docker daemon) refused or failed a request."""

    exit_code = 4


class AuthenticationError(RegistryError):
    """The registry answered 401 or 403: credentials are missing or refused."""


class Cancelled(EstargzError):
    """The run was asked to stop (SIGINT or SIGTERM; see :mod:`estargz._cancel`).

    Raised by the work in progress, in whichever thread notices first."""

    exit_code = 130

    def __init__(self, message: str = "interrupted") -> None:
        super().__init__(message)
