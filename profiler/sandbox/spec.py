"""What the sandbox looks like: the process, the options, the mounts and
devices, and the OCI runtime spec (config.json) built from them.

The defaults are Docker's: its capability set, PATH, standard mounts,
device cgroup rules, masked and read-only paths.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ProfilingError
from .users import ResolvedUser

# --- what the sandbox looks like --------------------------------------------------

#: Docker's default capability set (moby oci/caps/defaults.go), in its order.
DOCKER_DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
    "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)

#: The PATH Docker gives a container whose image sets none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_MEMORY_BYTES = 4 << 30
DEFAULT_PIDS_LIMIT = 4096

#: The standard mounts of Docker and `runc spec`.  Files under them are never
#: part of the image, so accesses below them are never reported.
STANDARD_MOUNTS: tuple[dict[str, Any], ...] = (
    {"destination": "/proc", "type": "proc", "source": "proc",
     "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
     "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
     "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs",
     "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
     "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
)

# What a runtime run by the root of a user namespace mounts instead (as
# `runc spec --rootless`): sysfs needs a network namespace of its own, so /sys
# is the host's, read-only; a cgroup mount needs delegated cgroups; gid 5
# (tty) is not mapped.
_ROOTLESS_MOUNTS: dict[str, dict[str, Any] | None] = {
    "/sys": {"destination": "/sys", "type": "none", "source": "/sys",
             "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]},
    "/sys/fs/cgroup": None,
    "/dev/pts": {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
}

# /proc when the kernel refuses the runtime a new procfs (a masked /proc, see
# profiler.rootless.userns): the caller's, recursively, with Docker's masks
# (locked mounts, which a bind of /proc alone could not leave out: EINVAL).
# runc accepts a bind at /proc whose source is a procfs.
_PROC_BIND: dict[str, Any] = {"destination": "/proc", "type": "bind", "source": "/proc",
                              "options": ["rbind", "nosuid", "noexec", "nodev"]}

# (path, type, major, minor): the devices every container gets in /dev.
_STANDARD_DEVICES: tuple[tuple[str, str, int, int], ...] = (
    ("/dev/null", "c", 1, 3), ("/dev/zero", "c", 1, 5), ("/dev/full", "c", 1, 7),
    ("/dev/random", "c", 1, 8), ("/dev/urandom", "c", 1, 9), ("/dev/tty", "c", 5, 0),
)

# The device cgroup: deny everything, then Docker's default allow list.
_DEVICE_RULES: tuple[dict[str, Any], ...] = (
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "access": "m"},               # mknod of any char device
    {"allow": True, "type": "b", "access": "m"},               # mknod of any block device
    *({"allow": True, "type": t, "major": ma, "minor": mi, "access": "rwm"}
      for _, t, ma, mi in _STANDARD_DEVICES),
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},   # /dev/ptmx
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},             # /dev/pts/*
)

_MASKED_PATHS = ("/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys",
                 "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                 "/proc/sched_debug", "/proc/scsi", "/sys/firmware")
_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


# --- public types -----------------------------------------------------------------

@dataclass(frozen=True)
class BindMount:
    """A host path bind-mounted into the container.  Files read through it are
    not in the image and are never reported."""

    source: str
    destination: str
    options: tuple[str, ...] = ("rbind", "ro")

    @classmethod
    def parse(cls, text: str) -> BindMount:
        """Parse ``type=bind,src=/host,dst=/in/container[,options=ro:rbind]``
        (``source``/``target``/``destination`` are accepted too).  Without
        ``options`` the mount is read-only; ``options=rw`` makes it writable."""
        fields: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise ProfilingError(f"mount {text!r}: {part!r} is not KEY=VALUE")
            fields[key.strip()] = value
        kind = fields.pop("type", "bind")
        if kind != "bind":
            raise ProfilingError(f"mount {text!r}: only type=bind is supported")
        src = fields.pop("src", None) or fields.pop("source", None)
        dst = (fields.pop("dst", None) or fields.pop("destination", None)
               or fields.pop("target", None))
        opts = [o for o in fields.pop("options", "").split(":") if o]
        if fields:
            raise ProfilingError(f"mount {text!r}: unknown field(s) {', '.join(sorted(fields))}")
        if not src or not dst:
            raise ProfilingError(f"mount {text!r}: src= and dst= are required")
        if not any(o in ("bind", "rbind") for o in opts):
            opts.insert(0, "rbind")
        if not any(o in ("ro", "rw") for o in opts):
            opts.append("ro")
        return cls(src, dst, tuple(opts))

    def spec(self) -> dict[str, Any]:
        """This mount as an entry of the OCI spec's ``mounts``."""
        return {"destination": self.destination, "type": "bind",
                "source": os.path.abspath(self.source), "options": list(self.options)}


@dataclass
class ProcessSpec:
    """What to run: the image config's entrypoint+cmd, env, user and working dir.

    ``user`` is what an image config holds: ``""`` (root), a name, a uid, or
    ``user:group`` with names or numbers, resolved with the rootfs's
    /etc/passwd and /etc/group as Docker does."""

    args: list[str]
    env: list[str] = field(default_factory=list)
    user: str = ""
    cwd: str = "/"


@dataclass
class SandboxOptions:
    """How to run and when to stop.

    The profile ends when the workload exits, or after ``period`` seconds, or
    (if set) as soon as a line of its output contains ``wait_on_line``, or
    it is ready on ``wait_on_port`` / ``wait_on_http``.  With
    ``wait_on_signal`` the period is ignored and the profile ends on SIGINT
    (KeyboardInterrupt), which then returns a result instead of propagating.
    """

    runtime: str = "runc"
    period: float = 10.0
    wait_on_line: str | None = None
    wait_on_signal: bool = False
    #: Also end the profile once the workload accepts TCP connections on this
    #: port, or answers an HTTP GET of this ``http://`` URL with 2xx, probed
    #: in the sandbox's network namespace (:mod:`.readiness`).
    wait_on_port: int | None = None
    wait_on_http: str | None = None
    #: Share the host's network namespace; otherwise only a loopback (up).
    net_host: bool = False
    mounts: list[BindMount] = field(default_factory=list)
    #: cgroup limits; None leaves the limit unset.
    memory_bytes: int | None = DEFAULT_MEMORY_BYTES
    pids_limit: int | None = DEFAULT_PIDS_LIMIT
    hostname: str = "estargz-profile"
    #: Hide the workload's output (it is still read, and still matched
    #: against ``wait_on_line``).
    quiet: bool = False
    #: Receives each output line, prefixed "workload: ".  Default: stderr.
    output: Callable[[str], None] | None = None
    #: Where the temporary bundle and runtime state go (default: $TMPDIR).
    workdir: str | None = None
    #: Bind the caller's /proc (recursively) instead of mounting a new
    #: procfs: set by the rootless path where the kernel refuses a new one
    #: (:func:`profiler.rootless.userns.proc_is_shared`).  The workload then
    #: sees the caller's PID namespace in /proc.
    bind_proc: bool = False


# --- the OCI spec -------------------------------------------------------------------

def build_spec(rootfs: str, process: ProcessSpec, options: SandboxOptions,
               user: ResolvedUser, cgroups_path: str, rootless: bool = False) -> dict[str, Any]:
    """The OCI runtime spec (config.json) for one profiling run.

    ``rootless``: for a runtime run by the root of a user namespace (see
    :mod:`profiler.rootless`), as ``runc spec --rootless`` makes it: no
    cgroup limits (a user namespace may not create cgroups unless they were
    delegated to it), and the mounts of ``_ROOTLESS_MOUNTS``.  With
    ``options.bind_proc``, /proc is a bind of the caller's."""
    # Over 60 lines because the spec is written out as one literal, in the
    # order of the OCI runtime spec: split, it would no longer read as one.
    env = list(process.env)
    if not any(e.startswith("PATH=") for e in env):
        env.append(f"PATH={DEFAULT_PATH}")
    if not any(e.startswith("HOME=") for e in env):
        env.append(f"HOME={user.home}")  # as Docker does, from the passwd entry
    caps = list(DOCKER_DEFAULT_CAPABILITIES)
    proc_user: dict[str, Any] = {"uid": user.uid, "gid": user.gid}
    if user.additional_gids:
        proc_user["additionalGids"] = list(user.additional_gids)
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if not options.net_host:
        # A new network namespace starts with `lo` down; runc and crun both
        # bring it up for a namespace they create (a "loopback" network).
        namespaces.append({"type": "network"})
    mounts = []
    for m in STANDARD_MOUNTS:
        if options.bind_proc and m["destination"] == "/proc":
            m = _PROC_BIND
        elif rootless and m["destination"] in _ROOTLESS_MOUNTS:
            m = _ROOTLESS_MOUNTS[m["destination"]]  # type: ignore[assignment]
            if m is None:
                continue
        mounts.append(dict(m, options=list(m["options"])))
    linux: dict[str, Any] = {"namespaces": namespaces}
    if not rootless:
        resources: dict[str, Any] = {"devices": [dict(r) for r in _DEVICE_RULES]}
        if options.memory_bytes is not None:
            resources["memory"] = {"limit": int(options.memory_bytes)}
        if options.pids_limit is not None:
            resources["pids"] = {"limit": int(options.pids_limit)}
        # Relative: runc nests it under our own cgroup in each hierarchy.
        linux.update(cgroupsPath=cgroups_path, resources=resources)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": proc_user,
            "args": list(process.args),
            "env": env,
            "cwd": process.cwd,
            # Not inheritable nor ambient: a non-root user gets no capability
            # after execve, as with Docker since 20.10.
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": True,
        },
        "root": {"path": os.path.realpath(rootfs), "readonly": False},
        "hostname": options.hostname,
        "mounts": mounts + [m.spec() for m in options.mounts],
        "linux": {
            **linux,
            "devices": [{"path": p, "type": t, "major": ma, "minor": mi,
                         "fileMode": 0o666, "uid": 0, "gid": 0}
                        for p, t, ma, mi in _STANDARD_DEVICES],
            "maskedPaths": list(_MASKED_PATHS),
            "readonlyPaths": list(_READONLY_PATHS),
        },
    }
