"""Snapshot a directory tree's full state and list the differences of two.

Used to show that a root filesystem served one way (a lazily pulled image:
FUSE snapshots stacked by overlayfs) equals the same image unpacked another
way (containerd's overlayfs snapshotter, ``umoci unpack``).  Everything a tar
layer can say about an entry is captured: type, permission bits including
setuid/setgid/sticky, owner, contents (sha256), link target, device numbers,
xattrs, mtime (nanoseconds) and which paths share an inode (hardlinks).

    a = snapshot_tree(Path("/mnt/lazy"), skip=RUNTIME_PATHS)
    b = snapshot_tree(Path("/mnt/overlayfs"), skip=RUNTIME_PATHS)
    assert_same_tree(a, b, mtime_tolerance_ns=5 * 10**8)

Paths are relative POSIX strings without a leading ``./`` (``etc/motd``).
The walk never follows a symlink and, unless told to, never descends into a
mount point below ``root`` (each mount point found in /proc/self/mountinfo
is left out with everything below it), so a container's /proc or a bind
mount cannot leak into the comparison.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fnmatch
import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from profiler.linux import mounts_under

# xattrs the kernel makes or interprets itself rather than the image:
# overlayfs keeps its whiteout/opaque/redirect/origin state in
# trusted.overlay.* (user.overlay.* with the userxattr option); listxattr on a
# merged overlayfs hides them, but a single-layer bind mount shows them.
DEFAULT_XATTR_EXCLUDE: tuple[str, ...] = ("trusted.overlay.", "user.overlay.")

# xattrs a security module may put on one side only (an SELinux host labels
# the files it creates); diff_trees ignores them when only one side has them.
DEFAULT_ONE_SIDED_XATTRS: tuple[str, ...] = ("security.selinux",)

# What a container runtime adds to or mounts over an image's root filesystem
# (runc creates the mount points, containerd's CRI writes the files); pass
# as ``skip=`` when comparing the rootfs of a container that has run.  Globs:
# the directories themselves stay compared, what runc puts in them does not.
RUNTIME_PATHS: tuple[str, ...] = ("dev/*", "proc/*", "sys/*", "run/*", "etc/hosts",
                                  "etc/hostname", "etc/resolv.conf", "etc/mtab")

# What a plain consumer (umoci, containerd's overlayfs applier, tar) of an
# eStargz layer writes in addition to the original layer's files: the TOC and
# the prefetch landmark are tar members at the layer's root.  A lazy puller
# (the Stargz Snapshotter) does not show them.
ESTARGZ_FILES: tuple[str, ...] = ("stargz.index.json", ".prefetch.landmark",
                                  ".no.prefetch.landmark")

# Field names used by diff_trees, also usable in its ``ignore`` argument
# either alone ("mtime") or for one kind only ("symlink.mtime").
FIELDS: tuple[str, ...] = ("kind", "mode", "uid", "gid", "size", "sha256", "link_target",
                           "device", "xattrs", "mtime", "hardlinks")


@dataclasses.dataclass(frozen=True)
class EntryState:
    """Everything compared about one directory entry.

    ``kind`` is one of dir, file, symlink, char, block, fifo, socket.
    ``mode`` holds the permission bits with setuid, setgid and sticky
    (``stat.S_IMODE``).  ``size`` and ``sha256`` are set for regular files
    only (a directory's size depends on the filesystem); ``link_target`` for
    symlinks; ``device`` (major, minor) for char and block devices.
    ``xattrs`` is a sorted tuple of (name, value).  ``mtime_ns`` is the
    modification time in nanoseconds since the epoch.  ``hardlinks`` is, for
    a non-directory whose inode has more than one name inside the snapshot,
    all those names sorted (itself included); empty otherwise."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None = None
    sha256: str | None = None
    link_target: str | None = None
    device: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    mtime_ns: int = 0
    hardlinks: tuple[str, ...] = ()


_KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket"}


def _skipped(rel: str, patterns: tuple[str, ...]) -> bool:
    return any(rel == p or fnmatch.fnmatchcase(rel, p) for p in patterns)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    # O_NOFOLLOW: the entry was lstat'ed as a regular file; never read
    # through a symlink swapped in since.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _xattrs(path: str, exclude: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):  # no xattr support: none to compare
            return ()
        raise
    out = []
    for name in names:
        if name.startswith(exclude):
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as e:
            raise OSError(e.errno, f"reading xattr {name} of {path}: {e.strerror}") from None
    return tuple(sorted(out))


def snapshot_tree(root: Path, *, skip: Iterable[str] = (), cross_mounts: bool = False,
                  include_root: bool = False,
                  xattr_exclude: tuple[str, ...] = DEFAULT_XATTR_EXCLUDE
                  ) -> dict[str, EntryState]:
    """Return path -> :class:`EntryState` for everything below ``root``.

    ``skip``: relative paths or fnmatch globs (``*`` also matches ``/``);
    a matching entry is left out together with everything below it.
    ``cross_mounts``: also walk into mount points below ``root`` (by default
    each one is left out with its contents; ``root`` itself may be a mount).
    ``include_root``: add ``root`` itself as ``"."`` (off by default: a
    snapshotter makes the mount's root directory, not the image).
    ``xattr_exclude``: name prefixes of xattrs not to record.
    Symlinks are never followed; FIFOs and devices are never opened."""
    root_s = os.path.realpath(root)
    patterns = tuple(p.strip("/") for p in skip)
    mounts = set() if cross_mounts else {m for m in mounts_under(root_s) if m != root_s}
    states: dict[str, EntryState] = {}
    inodes: dict[tuple[int, int], list[str]] = {}

    def record(path: str, rel: str) -> None:
        st = os.lstat(path)
        fmt = stat.S_IFMT(st.st_mode)
        kind = _KINDS.get(fmt)
        if kind is None:
            raise ValueError(f"{path}: unknown file type {fmt:o}")
        fields: dict = {}
        if kind == "file":
            fields.update(size=st.st_size, sha256=_file_sha256(path))
        elif kind == "symlink":
            fields["link_target"] = os.readlink(path)
        elif kind in ("char", "block"):
            fields["device"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind != "dir" and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        states[rel] = EntryState(kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid,
                                 gid=st.st_gid, xattrs=_xattrs(path, xattr_exclude),
                                 mtime_ns=st.st_mtime_ns, **fields)

    if include_root:
        record(root_s, ".")
    # os.walk with followlinks=False lists a symlink to a directory among the
    # directories but does not descend into it.
    for dirpath, dirnames, filenames in os.walk(root_s, onerror=_raise):
        rel_dir = os.path.relpath(dirpath, root_s)
        keep = []
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if path in mounts or _skipped(rel, patterns):
                continue
            record(path, rel)
            if name in dirnames and states[rel].kind == "dir":
                keep.append(name)
        dirnames[:] = keep
    for names in inodes.values():
        if len(names) > 1:
            group = tuple(sorted(names))
            for n in names:
                states[n] = dataclasses.replace(states[n], hardlinks=group)
    return states


def _raise(e: OSError) -> None:
    raise e




def _fmt_time(ns: int) -> str:
    t = datetime.datetime.fromtimestamp(ns // 10**9, datetime.timezone.utc)
    return f"{t:%Y-%m-%dT%H:%M:%S}.{ns % 10**9:09d}Z"


def _fmt(field: str, value) -> str:
    if value is None:
        return "-"
    if field == "mode":
        return f"{value:04o}"
    if field == "sha256":
        return value[:16]
    if field == "device":
        return f"{value[0]}:{value[1]}"
    if field == "hardlinks":
        return "[" + ", ".join(value) + "]"
    return str(value)


def diff_trees(a: dict[str, EntryState], b: dict[str, EntryState], *,
               mtime_tolerance_ns: int = 0, ignore: Iterable[str] = (),
               one_sided_xattrs: tuple[str, ...] = DEFAULT_ONE_SIDED_XATTRS) -> list[str]:
    """Human-readable differences between two snapshots, sorted by path;
    empty when they are equal.  Lines read ``PATH: FIELD A != B``, e.g.
    ``etc/motd: mode 0644 != 0600``, or ``PATH: only in a (file)``.

    ``mtime_tolerance_ns``: mtimes within this many nanoseconds count as
    equal.  Use ``5 * 10**8`` where one side can only keep whole seconds:
    the eStargz TOC stores ``modtime`` rounded to the nearest second (RFC
    3339), so a FUSE snapshotter serving it (Stargz Snapshotter 0.12 and
    0.18 alike) reports e.g. ``02:00:00`` for a tar mtime of ``02:00:00.25``
    (lazy-kinds' ``data/times/subsecond``).
    ``ignore``: names from :data:`FIELDS` not to compare, alone (``mtime``)
    or for one kind (``symlink.mtime``).
    ``one_sided_xattrs``: xattr names ignored when only one side has them
    (a differing value on both sides is still reported)."""
    ignored = set(ignore)
    unknown = {i for i in ignored if i.rsplit(".", 1)[-1] not in FIELDS}
    if unknown:
        raise ValueError(f"unknown fields to ignore: {sorted(unknown)}")
    out: list[str] = []
    for path in sorted(a.keys() | b.keys()):
        x, y = a.get(path), b.get(path)
        if x is None or y is None:
            side, s = ("a", x) if y is None else ("b", y)
            assert s is not None  # not both: the path came from one of them
            out.append(f"{path}: only in {side} ({s.kind})")
            continue

        def skip(field: str, kind: str = x.kind) -> bool:
            return field in ignored or f"{kind}.{field}" in ignored

        if x.kind != y.kind:
            out.append(f"{path}: kind {x.kind} != {y.kind}")
            continue
        for field in ("mode", "uid", "gid", "size", "sha256", "link_target", "device",
                      "hardlinks"):
            u, v = getattr(x, field), getattr(y, field)
            if u != v and not skip(field):
                out.append(f"{path}: {field} {_fmt(field, u)} != {_fmt(field, v)}")
        if not skip("xattrs"):
            xa, xb = dict(x.xattrs), dict(y.xattrs)
            for name in sorted(xa.keys() | xb.keys()):
                if name in xa and name in xb:
                    if xa[name] != xb[name]:
                        out.append(f"{path}: xattr {name} {xa[name]!r} != {xb[name]!r}")
                elif name not in one_sided_xattrs:
                    out.append(f"{path}: xattr {name} only in {'a' if name in xa else 'b'}")
        if not skip("mtime") and abs(x.mtime_ns - y.mtime_ns) > mtime_tolerance_ns:
            out.append(f"{path}: mtime {_fmt_time(x.mtime_ns)} != {_fmt_time(y.mtime_ns)}")
    return out


def assert_same_tree(a: dict[str, EntryState], b: dict[str, EntryState], *,
                     limit: int = 40, **options) -> None:
    """Raise AssertionError listing (up to ``limit``) differences of
    :func:`diff_trees` (``options`` go to it); also if both are empty."""
    if not a and not b:
        raise AssertionError("both trees are empty: nothing was compared")
    diffs = diff_trees(a, b, **options)
    if diffs:
        more = f"\n... and {len(diffs) - limit} more" if len(diffs) > limit else ""
        raise AssertionError(f"{len(diffs)} differences:\n" + "\n".join(diffs[:limit]) + more)


# --- getting a tree to compare: a containerd snapshot, mounted --------------------

def chain_id(diff_ids: list[str]) -> str:
    """The OCI ChainID of a layer stack: the name containerd's snapshotters
    give the committed snapshot of an image's layers ``diff_ids``."""
    chain = diff_ids[0]
    for d in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
    return chain


@contextlib.contextmanager
def mounted_view(ctr: Callable[..., subprocess.CompletedProcess], snapshotter: str,
                 parent: str, key: str, target: Path) -> Iterator[Path]:
    """Mount a read-only view of containerd snapshot ``parent`` at ``target``.

    ``ctr`` is e.g. ``Containerd.ctr`` (``ctr(*args)`` runs ctr against the
    daemon and raises on failure).  Runs ``ctr snapshots --snapshotter S view
    --mounts KEY PARENT``, labels the view a GC root (ctr holds no lease, so
    containerd's garbage collector would remove it at its next run, e.g.
    after a container is deleted), mounts what it printed with ``ro`` added,
    and on exit unmounts and removes the view.  The garbage collector can
    still win the race between ``view`` and ``label`` (a container deleted by
    another test at that moment): the mount is unaffected, since it names only
    the parent's committed, image-held snapshots, so a view already gone is
    not an error, neither when labelling nor when removing it."""
    snap = ("snapshots", "--snapshotter", snapshotter)
    out = ctr(*snap, "view", "--mounts", key, parent).stdout
    try:
        ctr(*snap, "label", key, "containerd.io/gc.root=treecompare", check=False)
        mounts = json.loads(out)
        if len(mounts) != 1:
            raise AssertionError(f"expected one mount for view {key}, got {out!r}")
        m = mounts[0]
        # "bind" for a one-layer parent, "overlay" (lowerdirs only) otherwise
        subprocess.run(["mount", "-t", m["Type"], m["Source"], str(target),
                        "-o", ",".join(["ro", *m.get("Options", [])])],
                       check=True, capture_output=True)
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], check=True, capture_output=True)
    finally:
        ctr(*snap, "rm", key, check=False)
