"""The ``estargz`` command line (click): the top of the tree, imported by
nothing; the only place errors become exit codes. :func:`main` is the
console entry point; each command module registers its commands on it.
"""

from . import image, layer, optimize, soci  # noqa: F401  (register their commands)
from .base import main

__all__ = ["main"]
