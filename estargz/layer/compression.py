"""Deflate back-ends: zlib-ng (default), the standard library's zlib, or ISA-L.

Each back-end makes gzip-wrapped (``wbits=31``) compressors with the same
``compress``/``flush`` verbs as :func:`zlib.compressobj`. Output differs
between back-ends (and between library versions), so byte-identical results
need the same back-end; the benchmarks in docs/benchmarks.md compare them.
"""

from __future__ import annotations

import importlib
import zlib
from dataclasses import dataclass
from typing import Any

from .._exceptions import InvalidInput

# name -> (module providing a zlib-compatible API, highest level it supports)
_BACKENDS = {
    "zlib": ("zlib", 9),
    "zlib-ng": ("zlib_ng.zlib_ng", 9),
    "isal": ("isal.isal_zlib", 3),
}
BACKENDS = tuple(_BACKENDS)
#: zlib-ng at level 9 compresses as well as zlib (within 0.01 %) in half the
#: time, and its wheel bundles the library, so output does not vary with the
#: machine's zlib version. See docs/benchmarks.md.
DEFAULT_BACKEND = "zlib-ng"


@dataclass(frozen=True)
class Backend:
    """A deflate implementation at one compression level."""

    name: str
    level: int
    module: Any

    def compressobj(self) -> Any:
        return self.module.compressobj(self.level, zlib.DEFLATED, 31)


def get_backend(name: str, level: int) -> Backend:
    """Return back-end ``name`` at ``level`` (0-9).

    ISA-L knows levels 0-3 only: 4-9 map to its best, 3.
    """
    if name not in _BACKENDS:
        raise InvalidInput(f"unknown compression backend {name!r} "
                           f"(choose from {', '.join(_BACKENDS)})")
    module_name, top = _BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = module_name.split(".")[0].replace("_", "-")
        raise InvalidInput(f"compression backend {name!r} needs the Python package "
                           f"{package!r} (pip install {package})") from None
    return Backend(name, min(level, top), module)
