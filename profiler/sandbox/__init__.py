"""The profiling sandbox: run a workload with an OCI runtime (runc, crun)
and record, with fanotify, the files it reads.

* :mod:`.spec`: the process, the options and the OCI runtime spec;
* :mod:`.users`: the image's ``User`` resolved with its own /etc/passwd;
* :mod:`.container`: one container's life through the runtime
  (:class:`Container`), torn down whatever happens;
* :mod:`.readiness`: a server's readiness (port, HTTP), probed from the
  container's network namespace (:class:`ReadinessProbe`);
* :mod:`.profile`: :func:`run_profiled`, the recording loop and its result
  (:class:`ProfileRun`).
"""

from .container import Container, find_runtime, remove_stale_containers
from .profile import (
                      ProfileRun,
                      StopReason,
                      accesses_from_events,
                      interrupt_on_sigterm,
                      run_profiled,
)
from .readiness import ReadinessProbe, check_port, parse_http_url
from .spec import (
                      DEFAULT_MEMORY_BYTES,
                      DEFAULT_PATH,
                      DEFAULT_PIDS_LIMIT,
                      DOCKER_DEFAULT_CAPABILITIES,
                      STANDARD_MOUNTS,
                      BindMount,
                      ProcessSpec,
                      SandboxOptions,
                      build_spec,
)
from .users import ResolvedUser, check_mapped, path_in_root, resolve_user

__all__ = [
    "DEFAULT_MEMORY_BYTES", "DEFAULT_PATH", "DEFAULT_PIDS_LIMIT", "DOCKER_DEFAULT_CAPABILITIES",
    "STANDARD_MOUNTS", "BindMount", "Container", "ProcessSpec", "ProfileRun", "ResolvedUser",
    "ReadinessProbe", "SandboxOptions", "StopReason", "accesses_from_events", "build_spec",
    "check_mapped", "check_port", "find_runtime", "interrupt_on_sigterm", "parse_http_url",
    "path_in_root", "remove_stale_containers", "resolve_user", "run_profiled",
]
