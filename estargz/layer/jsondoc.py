"""The one parser for JSON that comes from outside: registry manifests,
indexes and token responses, an OCI layout's ``index.json``, an archive's
``manifest.json``, image configs, a blob's TOC, record files, auth files.

``json.loads`` recurses once per nested array or object, so a document of a
few thousand ``[`` ends in ``RecursionError`` (a traceback), and whatever
parsed a deep document would fail again re-serialising it. No real document
nests deeper than a handful of levels: a TOC, an OCI index with platforms
and annotations, a config with its health check, ``docker save``'s
``manifest.json`` all stay within 5. :data:`MAX_DEPTH` (64) leaves room for
any extension while staying far below the interpreter's recursion limit
(1000 frames), which ``json.loads`` and ``json.dumps`` share with whoever
calls them. The depth is measured before parsing, by a linear scan of the
brackets outside strings, so a hostile document costs one pass, not a stack.

Documents are UTF-8 (``json.loads`` on bytes would also take UTF-16 and
UTF-32, which no registry, layout or TOC uses), and ``NaN``/``Infinity``,
which are not JSON, are refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from .._exceptions import EstargzError, InvalidInput

#: Deepest nesting of arrays and objects accepted (see the module docstring).
MAX_DEPTH = 64
#: Default size limit: 4 times the 4 MiB distribution caps a manifest at;
#: callers reading larger documents (a TOC) pass their own.
MAX_JSON_SIZE = 16 << 20

# The scan keeps only what decides the depth: an escape hides the character
# after its backslash, the remaining quotes delimit strings, and brackets
# outside strings nest. Each step runs in C.
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{}')
_STRING = re.compile(rb'"[^"]*"')
_OPEN = frozenset(b"[{")


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        # 1e400: json.dumps would write it back as Infinity, which is not JSON.
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def too_deep(data: bytes) -> bool:
    """True if JSON text ``data`` nests arrays and objects deeper than
    :data:`MAX_DEPTH` (brackets inside strings not counted); linear in
    ``len(data)``."""
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return False  # the usual case costs two counts
    if b"\\" in data:
        data = _ESCAPE.sub(b"", data)
    # An unterminated string leaves its quote, and its brackets are counted:
    # such a document is not JSON anyway.
    brackets = _STRING.sub(b"", data.translate(None, _NOT_STRUCTURE)).replace(b'"', b"")
    depth = 0
    for c in brackets:
        if c in _OPEN:
            depth += 1
            if depth > MAX_DEPTH:
                return True
        else:
            depth -= 1
    return False


def load_json(data: bytes | str, what: str, *, max_size: int = MAX_JSON_SIZE,
              error: Callable[[str], EstargzError] = InvalidInput) -> Any:
    """Parse JSON document ``data`` (``what`` names it in messages).

    Raises ``error`` (:class:`InvalidInput` unless given) with one line for
    a document over ``max_size`` bytes, nested deeper than
    :data:`MAX_DEPTH`, not UTF-8 or not JSON -- never ``RecursionError``.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > max_size:
        raise error(f"{what} of {len(raw)} bytes exceeds the {max_size}-byte limit")
    if too_deep(raw):
        raise error(f"{what} is nested deeper than {MAX_DEPTH} levels")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} is not valid JSON: not UTF-8 at byte {e.start}") from None
    try:
        return json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except (ValueError, RecursionError) as e:
        # RecursionError only if called with almost no stack left.
        raise error(f"{what} is not valid JSON: {e}") from None


def load_json_object(data: bytes | str, what: str, *, max_size: int = MAX_JSON_SIZE,
                     error: Callable[[str], EstargzError] = InvalidInput) -> dict[str, Any]:
    """:func:`load_json` of a document that must be a JSON object."""
    obj = load_json(data, what, max_size=max_size, error=error)
    if not isinstance(obj, dict):
        raise error(f"{what} is not a JSON object")
    return obj
