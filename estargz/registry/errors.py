"""How registry failures become messages: the two failures that steer the
retry loop, the hints a message carries, and the helpers that turn a
transport error or a registry's JSON error body into one line.

No message ever holds a password or a token.
"""

from __future__ import annotations

import re

from .._exceptions import InvalidInput, RegistryError
from ..layer.jsondoc import load_json

#: How to give credentials (the CLI's options are named here, in one place).
AUTH_HINT = ("give credentials with --src-creds/--dest-creds USER:PASS, run "
             "`docker login {host}`, or name an auth file with --authfile or "
             "REGISTRY_AUTH_FILE")
#: How to fix an untrusted certificate.
TLS_HINT = ("put its CA certificate (*.crt) in a directory and pass it with --cert-dir, "
            "or disable verification with --src-tls-verify=false/--dest-tls-verify=false")


class Transient(RegistryError):
    """A failure worth another attempt (429, 5xx, a dropped connection, a
    timeout). Caught by :meth:`RegistryHTTP._retrying`; should one escape,
    it is still a :class:`RegistryError` with a readable message."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(RegistryError):
    """An operation outlived its deadline (:mod:`.deadline`). Never retried:
    the deadline covers every attempt of the operation."""


class Unreachable(RegistryError):
    """No connection could be made (refused, unknown host, TLS refused).
    Not retried, but the HTTPS-to-HTTP fallback catches it."""


def reason_text(exc: BaseException) -> str:
    """The useful part of a transport error, without the urllib3 wrapping."""
    text = str(exc)
    for pattern in (r"certificate verify failed: ([^(')\"]+)",
                    r"\[SSL: [A-Z0-9_]+\] ([^(')\"]+)",
                    r"\[Errno -?\d+\] ([^'\")\]]+)",
                    r"(Read timed out)", r"(Connection aborted)",
                    r"(Remote end closed connection[^'\")]*)",
                    r"(Connection broken: [^'\"]+?)(?:'|\"|\)|$)"):
        m = re.search(pattern, text)
        if m:
            return m.group(1).strip().rstrip(".,")
    text = re.sub(r"\s+", " ", text).strip()
    return text[:200] if text else type(exc).__name__


def one_line(text: str, limit: int = 300) -> str:
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _error_list(body: bytes) -> list[dict[str, object]]:
    """The ``errors`` of a registry's JSON error body (empty if it has none)."""
    try:
        doc = load_json(body, "error body")
    except InvalidInput:
        return []
    errors = doc.get("errors") if isinstance(doc, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def error_codes(body: bytes) -> frozenset[str]:
    """Every ``code`` in a registry's JSON error body."""
    return frozenset(str(e["code"]) for e in _error_list(body) if e.get("code"))


def error_detail(body: bytes) -> str:
    """``CODE: message`` from a registry's JSON error body, or ``""``."""
    errors = _error_list(body)
    if not errors:
        return ""
    first = errors[0]
    parts = [str(first.get(k)) for k in ("code", "message") if first.get(k)]
    text = ": ".join(parts)
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more)"
    return one_line(text, 200)
