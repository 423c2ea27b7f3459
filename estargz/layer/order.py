"""Which entries go first: de-duplication, prioritized files and landmarks.

Pure logic over tar member records (anything with ``name``, ``type`` and
``linkname``, as ``tarfile.TarInfo``); no I/O. The output order is what the
snapshotter prefetches: prioritized entries, then ``.prefetch.landmark``,
then the rest in their original order -- or, with nothing prioritized,
``.no.prefetch.landmark`` first.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .toc import (
    LANDMARK_CONTENTS,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    clean_name,
)

# Entries an existing eStargz layer carries that conversion writes anew.
_REPLACED = frozenset({TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
_MAX_SYMLINK_HOPS = 40  # as Linux's ELOOP limit


@dataclass(frozen=True)
class Landmark:
    """A landmark file the converter writes (one byte, ``0x0f``)."""

    name: str
    contents: bytes = LANDMARK_CONTENTS


Planned = tarfile.TarInfo | Landmark


def read_prioritized_list(lines: Iterable[str]) -> list[str]:
    """Parse a prioritized-files list: one path a line, ``#`` lines ignored."""
    out = []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        out.append(line)
    return out


def dedupe(members: Iterable[tarfile.TarInfo]) -> list[tarfile.TarInfo]:
    """Drop replaced entries and earlier duplicates: the later entry wins,
    in the later entry's position (as the reference does)."""
    kept: list[tarfile.TarInfo | None] = []
    where: dict[str, int] = {}
    for m in members:
        name = clean_name(m.name)
        if name in _REPLACED:
            continue
        old = where.get(name)
        if old is not None:
            kept[old] = None
        where[name] = len(kept)
        kept.append(m)
    return [m for m in kept if m is not None]


class _Layer:
    """Name lookups and symlink resolution inside one layer."""

    def __init__(self, members: Sequence[tarfile.TarInfo]) -> None:
        self.members = members
        self.index = {clean_name(m.name): i for i, m in enumerate(members)}

    def get(self, name: str) -> tarfile.TarInfo | None:
        i = self.index.get(name)
        return None if i is None else self.members[i]

    def resolve(self, path: str) -> tuple[str | None, list[str]]:
        """Resolve symlinks in ``path``'s directories within this layer.

        Returns ``(resolved, links)``: the path with every directory symlink
        replaced by its target (``None`` past too many hops), and the names
        of the symlink entries passed through, which a reader needs as well.
        """
        links: list[str] = []
        parts = clean_name(path).split("/") if clean_name(path) else []
        hops = 0
        i = 0
        cur = ""
        while i < len(parts):
            nxt = f"{cur}/{parts[i]}" if cur else parts[i]
            m = self.get(nxt)
            if m is not None and m.issym() and i < len(parts) - 1:
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    return None, links
                links.append(nxt)
                base = "" if m.linkname.startswith("/") else cur
                target = clean_name(posixpath.join("/" + base, m.linkname))
                parts = (target.split("/") if target else []) + parts[i + 1:]
                i, cur = 0, ""
                continue
            cur = nxt
            i += 1
        return cur, links


def plan_order(members: Sequence[tarfile.TarInfo],
               prioritized: Sequence[str] | None = None,
               ) -> tuple[list[Planned], list[str]]:
    """Order de-duplicated ``members`` for output.

    Returns ``(planned, missing)``: the output order including the landmark,
    and the prioritized paths the layer does not hold. Each prioritized entry
    is preceded by those of its parent directories the layer holds (none are
    invented), by the symlinks its path passes through, and by its hardlink
    target; a symlink named directly brings its target along.
    """
    layer = _Layer(members)
    moved: set[int] = set()
    front: list[Planned] = []
    missing: list[str] = []

    def move(name: str, depth: int = 0) -> None:
        i = layer.index.get(name)
        if i is None or i in moved or depth > _MAX_SYMLINK_HOPS:
            return
        parent = posixpath.dirname(name)
        if name:
            move(parent, depth + 1)
        m = members[i]
        if m.islnk():
            move(clean_name(m.linkname), depth + 1)
        if i not in moved:
            moved.add(i)
            front.append(m)

    for path in prioritized or ():
        resolved, links = layer.resolve(path)
        if resolved is None or resolved not in layer.index:
            missing.append(path)
            continue
        for link in links:
            move(link)
        move(resolved)
        # A symlink named directly: its target is what the workload reads.
        m = layer.get(resolved)
        hops = 0
        while m is not None and m.issym() and hops < _MAX_SYMLINK_HOPS:
            hops += 1
            base = "" if m.linkname.startswith("/") else posixpath.dirname(resolved)
            target, more = layer.resolve(posixpath.join("/" + base, m.linkname))
            for link in more:
                move(link)
            if target is None:
                break
            move(target)
            resolved, m = target, layer.get(target)

    if prioritized:
        landmark = Landmark(PREFETCH_LANDMARK)
        planned: list[Planned] = [*front, landmark]
    else:
        planned = [Landmark(NO_PREFETCH_LANDMARK)]
    planned.extend(m for i, m in enumerate(members) if i not in moved)
    return planned, missing
