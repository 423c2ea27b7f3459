"""The ``estargz`` command line (click): the top of the tree, imported by
nothing; the only place errors become exit codes. :func:`main` is the
console entry point; it names each command's module, loaded when the
command is used (:class:`~estargz.cli.base.LazyGroup`).
"""

from .base import main

__all__ = ["main"]
