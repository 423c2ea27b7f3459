"""The workload's user: an image config's ``User`` resolved to numeric ids
with the image's own /etc/passwd and /etc/group, as Docker does."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ..errors import ProfilingError


@dataclass(frozen=True)
class ResolvedUser:
    """Numeric ids for the OCI spec, and the home directory for $HOME."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


def path_in_root(root: str, path: str) -> str:
    """``path`` inside ``root``, following symlinks as if ``root`` were ``/``.

    An image's /etc/passwd may be a symlink, even an absolute one; following it
    on the host would read the host's file.  This resolves every component
    under ``root``, so ``..`` and absolute links never leave it."""
    parts = [p for p in path.split("/") if p]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            done.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 40:
                raise ProfilingError(f"{path}: too many levels of symbolic links in the rootfs")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        done.append(part)
    return os.path.join(root, *done)


def _read_db(rootfs: str, name: str) -> list[list[str]]:
    """The colon-separated records of /etc/passwd or /etc/group (none if absent)."""
    try:
        with open(path_in_root(rootfs, name), encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f
                    if line.strip() and not line.startswith("#")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def resolve_user(rootfs: str, user: str) -> ResolvedUser:
    """Numeric ids for an image config's ``User``, the way Docker resolves it.

    ``""`` is root.  A name must be in /etc/passwd; a number need not be (its
    group is then 0).  ``:group`` overrides the passwd group, by name (must be
    in /etc/group) or number.  Supplementary groups are those of /etc/group
    that list the user's name."""
    passwd = [r for r in _read_db(rootfs, "/etc/passwd") if len(r) >= 7]
    groups = [r for r in _read_db(rootfs, "/etc/group") if len(r) >= 4]
    user_part, _, group_part = (user or "0").partition(":")
    entry = None
    for r in passwd:
        if r[0] == user_part or (user_part.isdigit() and r[2] == user_part):
            entry = r
            break
    if entry is not None:
        uid, gid, name, home = int(entry[2]), int(entry[3]), entry[0], entry[5] or "/"
    elif user_part.isdigit():
        uid, gid, name, home = int(user_part), 0, None, "/"
    else:
        raise ProfilingError(f"user {user_part!r}: no matching entry in the image's /etc/passwd")
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            match = [r for r in groups if r[0] == group_part]
            if not match:
                raise ProfilingError(f"group {group_part!r}: no matching entry in the image's"
                                     " /etc/group")
            gid = int(match[0][2])
    extra: list[int] = []
    if name is not None:
        for r in groups:
            if name in r[3].split(",") and r[2].isdigit() and int(r[2]) != gid:
                extra.append(int(r[2]))
    return ResolvedUser(uid, gid, tuple(sorted(set(extra))), home)


def check_mapped(user: ResolvedUser) -> None:
    """In a rootless run only root is mapped into the user namespace."""
    ids = {user.uid, user.gid, *user.additional_gids}
    if ids != {0}:
        who = f"uid {user.uid}, gid {user.gid}" + (
            f", groups {','.join(map(str, user.additional_gids))}" if user.additional_gids else "")
        raise ProfilingError(f"the workload runs as {who}, but without root only root can be"
                             " mapped into the sandbox's user namespace; run as root, or"
                             " give --user 0")
