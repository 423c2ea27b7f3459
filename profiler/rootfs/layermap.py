"""Which layer of an image provides each path of its root filesystem.

Pure logic over :class:`LayerListing` records (what one layer holds, as
:func:`profiler.rootfs.extract_layer` reports it); no I/O. Layers are indexed
bottom to top, as in the manifest.

The rules are overlayfs's, which are also the OCI image spec's:

* the top-most layer that holds a path provides it;
* a layer hides everything below it at a path it whites out (``.wh.NAME``),
  and below every path *under* one it whites out;
* an opaque directory (``DIR/.wh..wh..opq``) hides what lower layers hold
  under it, at any depth;
* a layer that holds a path's ancestor as something other than a directory
  (a file or a symlink replacing a directory) hides the lower layers' path.

The reference (containerd's ``estargz`` optimizer) checks whiteouts and
opacity of the immediate parent only; a whiteout of ``usr`` in a higher layer
must hide ``usr/lib/x`` of a lower one too, and here it does.

A workload that opens ``/bin/sh`` reads whatever ``bin`` and ``sh`` point to:
:func:`resolve` follows symlinks the way the kernel does, inside the image,
so that :func:`prioritized_lists` credits the layer that holds the bytes.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from estargz import InvalidInput

#: Linux's limit on symlinks followed in one path lookup (ELOOP past it).
MAX_SYMLINK_HOPS = 40

#: Entry kinds, named as in the eStargz TOC.
DIR, REG, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO = (
    "dir", "reg", "symlink", "hardlink", "char", "block", "fifo")


@dataclass
class LayerListing:
    """What one layer holds, by normalised path (``usr/bin/env``: relative,
    no ``./``, no trailing ``/``; the root directory itself is never listed).
    """

    #: Every path the layer provides, and its kind (``dir``, ``reg``,
    #: ``symlink``, ``hardlink``, ``char``, ``block``, ``fifo``).
    kinds: dict[str, str] = field(default_factory=dict)
    #: Paths the layer deletes from the layers below (``.wh.NAME`` entries,
    #: and character devices 0/0, which overlayfs reads as whiteouts too).
    whiteouts: set[str] = field(default_factory=set)
    #: Directories whose lower-layer contents the layer hides. ``""`` is the
    #: root (an opaque marker at the top of the layer hides every lower layer).
    opaque_dirs: set[str] = field(default_factory=set)
    #: Symlink path -> target, exactly as stored in the tar.
    symlinks: dict[str, str] = field(default_factory=dict)
    #: Hardlink path -> normalised path of the file it links to.
    hardlinks: dict[str, str] = field(default_factory=dict)
    #: Directories the layer has no entry for but needs as parents of its
    #: entries (diff layers leave unchanged parents out). They do not count as
    #: provided: they merge with the lower directory, which keeps its metadata.
    implicit_dirs: set[str] = field(default_factory=set)
    #: ``(path, xattr name, why)`` for extended attributes not applied.
    skipped_xattrs: list[tuple[str, str, str]] = field(default_factory=list)
    #: Oddities worth a line in a log (no effect on correctness).
    warnings: list[str] = field(default_factory=list)

    def provides(self, path: str) -> bool:
        return normalize(path) in self.kinds


def normalize(path: str) -> str:
    """``/a/./b/`` -> ``a/b``, lexically, ``..`` clamped at the root; the root
    is ``""``. For paths already resolved (see :func:`resolve` for paths that
    may pass through symlinks, where ``..`` is not lexical)."""
    parts: list[str] = []
    for c in path.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            if parts:
                parts.pop()
        else:
            parts.append(c)
    return "/".join(parts)


def _ancestors(path: str) -> list[str]:
    """``a/b/c`` -> ``["a", "a/b"]``."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _hides(listing: LayerListing, path: str, ancestors: Sequence[str]) -> bool:
    """True if ``listing`` (which does not provide ``path``) hides ``path``
    of every layer below it."""
    if path in listing.whiteouts or "" in listing.opaque_dirs:
        return True
    for a in ancestors:
        if a in listing.whiteouts or a in listing.opaque_dirs:
            return True
        kind = listing.kinds.get(a)
        if kind is not None and kind != DIR:
            return True
    return False


def layer_for(path: str, listings: Sequence[LayerListing]) -> int | None:
    """Index of the top-most layer whose ``path`` is visible in the merged
    root filesystem, or ``None`` (no layer holds it, or a higher layer hides
    it). ``path`` is taken literally (no symlinks followed); the root gives
    ``None``."""
    p = normalize(path)
    if not p:
        return None
    ancestors = _ancestors(p)
    dir_above = False
    for i in range(len(listings) - 1, -1, -1):
        listing = listings[i]
        kind = listing.kinds.get(p)
        if kind is not None:
            # overlayfs merges a directory only with directories below it:
            # a file or symlink under an (implicit) directory is hidden.
            return None if dir_above and kind != DIR else i
        if _hides(listing, p, ancestors):
            return None
        dir_above = dir_above or p in listing.implicit_dirs
    return None


LinkTargetOf = Callable[[str], str | None]


def link_targets(listings: Sequence[LayerListing]) -> LinkTargetOf:
    """``path -> symlink target`` in the merged view (``None`` if ``path`` is
    not a visible symlink), from the listings alone; memoised."""

    @functools.lru_cache(maxsize=65536)
    def target_of(path: str) -> str | None:
        i = layer_for(path, listings)
        return None if i is None else listings[i].symlinks.get(path)

    return target_of


def resolve(path: str, listings: Sequence[LayerListing],
            link_target_of: LinkTargetOf | None = None) -> str:
    """The path, relative to the image root, that an access to ``path``
    reaches: every symlink on the way followed, the last one included.

    As the kernel does inside a chroot: absolute targets start again at the
    image root, ``..`` applies to the directory actually reached (not to the
    text) and stops at the root, and more than :data:`MAX_SYMLINK_HOPS`
    symlinks raise :class:`~estargz.InvalidInput` (ELOOP). A component no
    layer holds ends resolution of symlinks there and the rest is kept as is.
    ``link_target_of`` defaults to :func:`link_targets` of ``listings``.
    """
    if link_target_of is None:
        link_target_of = link_targets(listings)
    todo = deque(c for c in path.split("/") if c not in ("", "."))
    done: list[str] = []
    hops = 0
    while todo:
        c = todo.popleft()
        if c == "..":
            if done:
                done.pop()
            continue
        candidate = "/".join([*done, c])
        target = link_target_of(candidate)
        if not target:  # not a symlink (an empty target cannot be followed)
            done.append(c)
            continue
        hops += 1
        if hops > MAX_SYMLINK_HOPS:
            raise InvalidInput(f"too many levels of symbolic links resolving {path!r}")
        if target.startswith("/"):
            done = []
        todo.extendleft(reversed([t for t in target.split("/") if t not in ("", ".")]))
    return "/".join(done)


def prioritized_lists(accessed_paths: Iterable[str], listings: Sequence[LayerListing],
                      link_target_of: LinkTargetOf | None = None,
                      ) -> dict[int, list[str]]:
    """Split the paths a workload accessed, in access order, by layer.

    Each path is resolved (:func:`resolve`) and credited to the layer that
    provides the result (:func:`layer_for`), as a relative path, once, at its
    first access. Paths no layer provides (files the workload wrote, paths
    that did not exist, symlink loops) are dropped. Layers with nothing
    accessed are absent from the result.
    """
    if link_target_of is None:
        link_target_of = link_targets(listings)
    out: dict[int, list[str]] = {}
    seen: set[str] = set()
    for path in accessed_paths:
        try:
            real = resolve(path, listings, link_target_of)
        except InvalidInput:
            continue  # the kernel gave the workload ELOOP: nothing was read
        if not real or real in seen:
            continue
        i = layer_for(real, listings)
        if i is None:
            continue
        seen.add(real)
        out.setdefault(i, []).append(real)
    return out
