"""Memory and pids limits without root, where the system delegates cgroups.

Root's sandbox gets its limits from the runtime (the spec's ``resources``).
A user namespace cannot create cgroups unless some were delegated to the
user, so rootless profiling makes its own, where it may, and moves the
namespace helper into it before the helper starts anything: the helper,
the runtime, the container and the tmpfs pages they write are all charged
to it.  Where it may:

* **cgroup v2**: our own cgroup, or its parent, writable by us (directory
  and ``cgroup.procs``: moving a process needs write access to the common
  ancestor's ``cgroup.procs``) with ``memory`` and ``pids`` in its
  ``cgroup.subtree_control``, as systemd's ``Delegate=yes`` leaves
  ``user@UID.service``;
* **cgroup v1**: our own cgroup in both the ``memory`` and the ``pids``
  hierarchy, writable by us, as ``cgcreate -a USER -t USER`` leaves one.

Elsewhere :func:`make_limited_cgroup` says why there are no limits, in
one phrase, for the report's notes.  Each cgroup made is named after the
run's work directory and listed in it (``cgroups``), so that the next run
removes what a killed one left (:func:`remove_stale_cgroups`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from ..linux import cgroup_mounts, own_cgroups

#: The file in the work directory listing the cgroups a run made.
CGROUPS_FILE = "cgroups"
_CONTROLLERS = ("memory", "pids")


def _v2_parent(mounts: list[tuple[str, str, list[str]]],
               own: list[tuple[str, list[str], str]]) -> str | None:
    mount = next((mp for mp, fs, _ in mounts if fs == "cgroup2"), None)
    path = next((p for hid, _, p in own if hid == "0"), None)
    if mount is None or path is None:
        return None
    own_dir = os.path.join(mount, path.lstrip("/"))
    for d in (own_dir, os.path.dirname(own_dir)):
        if not (d == mount or d.startswith(mount + "/")):
            continue
        try:
            with open(os.path.join(d, "cgroup.subtree_control")) as f:
                enabled = f.read().split()
        except OSError:
            continue
        if all(c in enabled for c in _CONTROLLERS) and os.access(d, os.W_OK | os.X_OK) \
                and os.access(os.path.join(d, "cgroup.procs"), os.W_OK):
            return d
    return None


def _v1_parents(mounts: list[tuple[str, str, list[str]]],
                own: list[tuple[str, list[str], str]]) -> dict[str, str] | None:
    found = {}
    for controller in _CONTROLLERS:
        mount = next((mp for mp, fs, opts in mounts if fs == "cgroup" and controller in opts),
                     None)
        path = next((p for _, cs, p in own if controller in cs), None)
        if mount is None or path is None:
            return None
        d = os.path.join(mount, path.lstrip("/"))
        if not os.access(d, os.W_OK | os.X_OK):
            return None
        found[controller] = d
    return found


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def make_limited_cgroup(name: str, memory_bytes: int | None, pids: int | None,
                        record_in: str) -> tuple[list[str], str | None]:
    """Make cgroup(s) ``name`` limited to ``memory_bytes`` and ``pids``
    (None: unlimited) where we may, listed in ``record_in/cgroups``;
    ``(directories, None)``, or ``([], why there are no limits)``."""
    mounts, own = cgroup_mounts(), own_cgroups()
    v2 = _v2_parent(mounts, own)
    pids_max = "max" if pids is None else str(pids)
    plan: list[tuple[str, dict[str, str]]]
    if v2 is not None:
        plan = [(v2, {"memory.max": "max" if memory_bytes is None else str(memory_bytes),
                      "pids.max": pids_max})]
    elif (v1 := _v1_parents(mounts, own)) is not None:
        plan = [(v1["memory"], {"memory.limit_in_bytes":
                                "-1" if memory_bytes is None else str(memory_bytes)}),
                (v1["pids"], {"pids.max": pids_max})]
    else:
        kinds = {fs for _, fs, _ in mounts}
        where = ("cgroup v2: neither our cgroup nor its parent is writable with the memory and"
                 " pids controllers enabled" if "cgroup2" in kinds and "cgroup" not in kinds
                 else "our memory and pids cgroups are not writable, and no cgroup v2 one"
                 " is delegated")
        return [], (f"no memory or pids limit on the workload: cgroups are not delegated to"
                    f" this user ({where})")
    made: list[str] = []
    try:
        for parent, limits in plan:
            d = os.path.join(parent, name)
            os.mkdir(d)
            made.append(d)
            # Listed before it is used: a kill from here on leaves it listed.
            _write(os.path.join(record_in, CGROUPS_FILE), "".join(m + "\n" for m in made))
            for key, value in limits.items():
                _write(os.path.join(d, key), value)
    except OSError as e:
        remove_cgroups(made)
        return [], (f"no memory or pids limit on the workload: cannot set up cgroup"
                    f" {e.filename}: {e.strerror}")
    return made, None


def remove_cgroups(dirs: Sequence[str], timeout: float = 5.0) -> list[str]:
    """rmdir each cgroup, and the cgroups below it (the runtime nests the
    container's in ours where it may), once their last process is gone
    (exiting processes leave a little after they die); the ones that would
    not go."""
    left: list[str] = []
    for d in dirs:
        # Deepest first; a cgroup's only subdirectories are its children.
        left.extend(os.path.join(top, sub) for top, subs, _ in os.walk(d, topdown=False)
                    for sub in subs)
        left.append(d)
    limit = time.monotonic() + timeout
    while left:
        for d in list(left):
            try:
                os.rmdir(d)
                left.remove(d)
            except FileNotFoundError:
                left.remove(d)
            except OSError:
                pass
        if not left or time.monotonic() >= limit:
            break
        time.sleep(0.05)
    return left


def remove_stale_cgroups(workdir: str) -> list[str]:
    """Remove the cgroups a killed run listed in ``workdir``; the ones left.
    (Their processes died with that run's PID namespace.)"""
    try:
        with open(os.path.join(workdir, CGROUPS_FILE)) as f:
            dirs = [line for line in f.read().splitlines() if line]
    except OSError:
        return []
    return remove_cgroups(dirs)
