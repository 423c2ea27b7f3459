"""Errors of the workload profiler.

They join the estargz exception tree, so the CLI turns them into one line and
an exit code like every other error::

    EstargzError
    └── ProfilingError      fanotify, the OCI runtime or the sandbox failed
"""

from __future__ import annotations

from estargz import EstargzError


class ProfilingError(EstargzError):
    """Profiling a workload failed: fanotify is unavailable or not permitted,
    the OCI runtime is missing or refused the container, or the sandbox could
    not be set up or torn down.  The message says what is needed."""
