"""Profiling without root: the image on a tmpfs, in a user namespace of our own.

An ordinary user may not mount overlayfs for the host, nor use fanotify
outside FID mode, nor create a rootful container.  Recent Linux kernels
lets the root of a *user namespace* do what profiling needs, within that
namespace: mount a tmpfs, create a FID-mode fanotify group, and place a
mount mark on a filesystem mounted in the namespace.  So
:func:`profile_rootless` does, as the caller::

    fetch the layer blobs into the work directory (on disk)
    check that the layers fit in memory (a tmpfs is memory)
    a cgroup with memory and pids limits, where cgroups are delegated to
    the user (profiler.rootless.cgroup); else a note says there are none
    call_in_userns(_job)          profiler.rootless.userns: uid 0 inside = the caller
                                  (where /proc is masked, in the caller's PID
                                  namespace, with its /proc: see there)
      mount a tmpfs (size-limited)
      flatten the layers into it  profiler.rootfs.flat: whiteouts and opaque
                                  directories applied as overlayfs would;
                                  overlayfs itself refuses FID mount marks
      run_profiled                the same runc, the same spec as with root
                                  (minus cgroup limits), the same fanotify
                                  events, in FID mode: file handles, named
                                  through a handle table of the tmpfs
      map paths to layers         as with root
    the namespace ends: the tmpfs and every process in it are gone

The cost is memory: the whole root filesystem is held on the tmpfs while
the workload runs.  :func:`check_memory` refuses to start when the layers'
files, plus room for the workload's own writes, exceed the memory
available to us (``MemAvailable``, and our cgroup's limit if it is lower).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from estargz import Descriptor, ImageSource, progress_meter

from ..capabilities import probe_rootless
from ..errors import ProfilingError
from ..linux import MS_NODEV, MS_NOSUID, filesystem_full, mount, own_cgroups
from ..record import Access, map_accesses
from ..rootfs import (
    SCRATCH_BYTES,
    assemble_flat_rootfs,
    layer_blob,
    layer_usage,
    scratch_full_note,
)
from ..sandbox import ProcessSpec, ProfileRun, SandboxOptions, run_profiled
from .cgroup import make_limited_cgroup, remove_cgroups
from .userns import call_in_userns, proc_is_shared, send_message

#: Room on the tmpfs, beyond the image's own files, for what the workload
#: writes (caches, .pyc files, logs), by default.  Writes past it fail with
#: ENOSPC.
WRITE_ROOM = SCRATCH_BYTES
#: pids for the namespace helper and the runtime's threads, on top of the
#: workload's own limit.
_PIDS_HEADROOM = 64

_MIB = 1 << 20


@dataclass(frozen=True)
class _Job:
    """What the namespace side needs (picklable: it crosses a pipe)."""

    blobs: tuple[str, ...]
    process: ProcessSpec
    sandbox: SandboxOptions
    work: str
    tmpfs_bytes: int


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _cgroup_room() -> int | None:
    """Memory our cgroup may still use (limit minus usage), if it has a limit.

    cgroup v2 (``memory.max``) or the v1 memory controller
    (``memory.limit_in_bytes``); every ancestor's limit counts too."""
    room: int | None = None
    for hid, controllers, path in own_cgroups():
        if hid == "0" and not controllers:
            base, limit_file, usage_file = "/sys/fs/cgroup", "memory.max", "memory.current"
        elif "memory" in controllers:
            base, limit_file, usage_file = ("/sys/fs/cgroup/memory", "memory.limit_in_bytes",
                                            "memory.usage_in_bytes")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            d = os.path.join(base, *parts[:depth])
            limit = _read_int(os.path.join(d, limit_file))
            usage = _read_int(os.path.join(d, usage_file))
            # v1 says "no limit" with a huge number (PAGE_COUNTER_MAX pages)
            if limit is None or usage is None or limit >= 1 << 60:
                continue
            left = max(0, limit - usage)
            room = left if room is None else min(room, left)
    return room


def available_memory() -> int | None:
    """Bytes of memory a tmpfs could take now: ``MemAvailable``, or our
    cgroup's remaining allowance if lower.  None if neither can be read."""
    values = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    return min(values) if values else None


def check_memory(layer_bytes: int, available: int | None = None,
                 room: int = WRITE_ROOM) -> int:
    """The tmpfs size for layers needing ``layer_bytes``: that plus
    ``room`` for the workload's writes.  Raises :class:`ProfilingError`
    when it exceeds the memory available (``available``, default
    :func:`available_memory`)."""
    need = layer_bytes + room
    if available is None:
        available = available_memory()
    if available is not None and need > available:
        raise ProfilingError(
            f"rootless profiling holds the root filesystem in memory: it needs"
            f" {_mib(need)} (layers {_mib(layer_bytes)} + {_mib(room)} for the"
            f" workload's writes) but only {_mib(available)} is available; free memory,"
            f" or run as root (overlayfs, nothing copied)")
    return need


def _mib(n: int) -> str:
    return f"{n / _MIB:.0f} MiB" if n >= 10 * _MIB else f"{n / _MIB:.1f} MiB"


def rootless_unavailable() -> str | None:
    """Why rootless profiling cannot work on this machine (one phrase), or None."""
    mode = probe_rootless()
    return None if mode.supported else "; ".join(mode.reasons)


def profile_rootless(source: ImageSource, layers: Sequence[Descriptor], process: ProcessSpec,
                     options: SandboxOptions, work: str,
                     emit: Callable[[str], None] | None = None,
                     scratch_bytes: int = WRITE_ROOM
                     ) -> tuple[list[Access], ProfileRun, list[str]]:
    """Profile ``process`` on the image's layers without root; the accesses
    mapped to layers, the run, and notes for the report (no cgroup limits
    here; the workload filled its ``scratch_bytes`` of room for writes).
    ``work`` is a private directory on disk (blobs, decompressed layers
    while they are read, the runtime's state)."""
    why = rootless_unavailable()
    if why:
        raise ProfilingError(f"cannot profile without root here: {why}; run as root,"
                             " or give --prefetch-list to prioritize files without a run")
    blobs = [layer_blob(source, desc, i, os.path.join(work, "blobs"))[0]
             for i, desc in enumerate(layers)]
    usage = {b: layer_usage(b, spool_dir=work) for b in dict.fromkeys(blobs)}
    # Per occurrence: a layer listed twice is extracted beside its first copy
    # before it replaces it.
    size = check_memory(sum(usage[b] for b in blobs), room=scratch_bytes)
    job = _Job(tuple(blobs), process, replace(options, output=None, workdir=work),
               work, size)
    show = emit or options.output or (lambda line: print(line, file=sys.stderr, flush=True))
    notes: list[str] = []
    # The tmpfs is charged to the cgroup too: the workload's limit plus it.
    memory = None if options.memory_bytes is None else options.memory_bytes + size
    pids = None if options.pids_limit is None else options.pids_limit + _PIDS_HEADROOM
    cgroups, why_none = make_limited_cgroup(os.path.basename(work), memory, pids, work)
    if why_none:
        notes.append(why_none)
    try:
        progress_meter("profile")  # staged: extraction and the run, no byte counts
        accesses, run, full = call_in_userns(_job, job, on_message=show, cgroups=cgroups)
    finally:
        left = remove_cgroups(cgroups)
    if left:
        notes.append(f"cannot remove cgroup {', '.join(left)}; the next run removes it")
    if full:
        notes.append(scratch_full_note(scratch_bytes))
    return accesses, run, notes


def _job(job: _Job) -> tuple[list[Access], ProfileRun, bool]:
    """In the namespace (PID 1, uid 0): tmpfs, flatten, run, map; and
    whether the workload filled the tmpfs."""
    tmpfs = os.path.join(job.work, "tmpfs")
    os.mkdir(tmpfs, 0o700)
    try:
        mount("tmpfs", tmpfs, "tmpfs", MS_NOSUID | MS_NODEV,
              f"mode=0755,size={job.tmpfs_bytes}")
    except OSError as e:
        raise ProfilingError(f"cannot mount a tmpfs in the user namespace: {e.strerror}") from None
    root = os.path.join(tmpfs, "rootfs")
    listings = assemble_flat_rootfs(list(job.blobs), root, os.path.join(tmpfs, "scratch"),
                                    spool_dir=job.work)
    # Where the kernel refused us a new procfs, it refuses the runtime too.
    options = replace(job.sandbox, output=send_message, bind_proc=proc_is_shared())
    run = run_profiled(root, job.process, options)
    return map_accesses(run.accesses, listings, root), run, filesystem_full(tmpfs)
