"""Profiling as root, in namespaces that die with us: :func:`profile_as_root`.

The layers are extracted and stacked with overlayfs under a size-limited
upper layer (a tmpfs), and the workload runs under the runtime, as before;
but all of it happens in a helper process (:func:`~profiler.rootless.
userns.call_in_namespaces` without a user namespace) that is PID 1 of a
new PID namespace with a private mount namespace, and that dies with the
caller (PR_SET_PDEATHSIG).  So a SIGKILL of ``estargz optimize`` leaves
no running container and no mount: the kernel kills every process of the
PID namespace, the container's nested one included, and frees the mount
namespace, the overlay and its tmpfs with it.  What stays on disk (the
runtime's state, an emptied cgroup, the work directory) is swept by the
next run (:mod:`profiler.workdir`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from estargz import Descriptor, ImageSource, progress_meter

from .record import Access, map_accesses
from .rootfs import assemble_rootfs, layer_blob, scratch_full_note
from .rootless import call_in_namespaces, send_message
from .sandbox import ProcessSpec, ProfileRun, SandboxOptions, run_profiled


@dataclass(frozen=True)
class _Job:
    """What the namespace side needs (picklable: it crosses a pipe)."""

    blobs: tuple[str, ...]
    keys: tuple[str, ...]
    process: ProcessSpec
    sandbox: SandboxOptions
    scratch: str
    scratch_bytes: int


def profile_as_root(source: ImageSource, layers: Sequence[Descriptor], process: ProcessSpec,
                    options: SandboxOptions, work: str, scratch_bytes: int,
                    emit: Callable[[str], None] | None = None
                    ) -> tuple[list[Access], ProfileRun, list[str]]:
    """Profile ``process`` on the image's layers as root; the accesses mapped
    to layers, the run, and notes for the report (the workload filled the
    ``scratch_bytes`` it may write).  ``work`` is a private directory on
    disk: the layers are extracted into ``work/root``."""
    blobs = [layer_blob(source, desc, i, os.path.join(work, "blobs"))[0]
             for i, desc in enumerate(layers)]
    job = _Job(tuple(blobs), tuple(d.digest for d in layers), process,
               replace(options, output=None, workdir=work), os.path.join(work, "root"),
               scratch_bytes)
    show = emit or options.output or (lambda line: print(line, file=sys.stderr, flush=True))
    progress_meter("profile")  # staged: extraction and the run, no byte counts
    accesses, run, full = call_in_namespaces(_job, job, on_message=show, user_namespace=False)
    return accesses, run, [scratch_full_note(scratch_bytes)] if full else []


def _job(job: _Job) -> tuple[list[Access], ProfileRun, bool]:
    """In the namespaces (PID 1): extract, mount, run, map; and whether the
    workload filled its upper layer."""
    with assemble_rootfs(lambda i: (job.blobs[i], False), job.keys, job.scratch,
                         upper_bytes=job.scratch_bytes) as (root, listings, overlay):
        run = run_profiled(root, job.process, replace(job.sandbox, output=send_message))
        # Before the unmount: what the workload wrote is still there.
        full = overlay.upper_full()
        return map_accesses(run.accesses, listings, root), run, full
