"""Access records: what the workload read, in the reference's record format.

``ctr-remote image optimize --record-out`` writes one JSON object a line,
``{"path": …, "manifestDigest": …, "layerIndex": …}``, paths cleaned (no
leading slash) and in first-access order. We read and write exactly that, so
either tool can take the other's record
(``estargz convert --record-in``, ``ctr-remote … --estargz-record-in``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO

from estargz import InvalidInput, clean_name

from .rootfs.layermap import LayerListing, layer_for, link_targets, resolve


@dataclass(frozen=True)
class Access:
    """One file the workload read.

    As the sandbox observes it (:attr:`ProfileRun.accesses
    <profiler.sandbox.ProfileRun.accesses>`), ``path`` is absolute in the
    container and ``layer`` is None; :func:`map_accesses` turns that into
    the record's form: the path cleaned and symlinks resolved, the layer
    that provides it, its size."""

    path: str                 # cleaned, relative to the image root (absolute before mapping)
    layer: int | None         # index into the manifest's layers (None: not mapped yet)
    seconds: float = 0.0      # first access, from the workload's start
    size: int = 0             # bytes of the file in its layer
    kind: str = "open"        # open, access, exec, or runtime (read before the entrypoint)


def _layer(a: Access) -> int:
    if a.layer is None:
        raise ValueError(f"access to {a.path!r} is not mapped to a layer")
    return a.layer


def write_record(accesses: Iterable[Access], manifest_digest: str, out: IO[str]) -> int:
    """Write ``accesses`` as reference record lines; returns the count."""
    n = 0
    for a in accesses:
        out.write(json.dumps({"path": clean_name(a.path), "manifestDigest": manifest_digest,
                              "layerIndex": _layer(a)}, separators=(",", ":")) + "\n")
        n += 1
    return n


def per_layer(accesses: Iterable[Access], manifest_digest: str,
              ) -> dict[tuple[str, int], list[str]]:
    """Prioritized paths per (manifest digest, layer index), order kept,
    duplicates dropped -- the converter's ``records`` option."""
    out: dict[tuple[str, int], list[str]] = {}
    seen: set[tuple[int, str]] = set()
    for a in accesses:
        key = (_layer(a), clean_name(a.path))
        if key not in seen:
            seen.add(key)
            out.setdefault((manifest_digest, key[0]), []).append(key[1])
    return out


def by_path(records: dict[tuple[str, int], list[str]],
            manifest_digest: str | None = None) -> list[str]:
    """Every recorded path (of one manifest, or all), for applying a record
    made on one platform to another platform's layers by path."""
    out: list[str] = []
    for (digest, _), paths in records.items():
        if manifest_digest is None or digest == manifest_digest:
            out.extend(p for p in paths if p not in out)
    return out


#: Files the container runtime reads from the image before the entrypoint's
#: first instruction, where fanotify cannot see them (it is armed on the
#: container's root between ``runc create`` and ``runc start``): containerd
#: reads etc/group for the supplementary groups of the image's user (also when
#: the image names none), runc's init reads etc/passwd and etc/group to set up
#: the user. Through a lazy snapshotter each would be fetched on demand, a
#: registry round trip apiece, before the workload could start; recorded first,
#: they are prefetched instead.
RUNTIME_READS = ("etc/passwd", "etc/group")


def map_accesses(run_accesses: Sequence[Access], listings: Sequence[LayerListing],
                 root: str) -> list[Access]:
    """The run's accesses as the record has them: the runtime's own reads
    (:data:`RUNTIME_READS`, where the image has them as regular files) first,
    then the workload's; symlinks resolved inside the image, each file once,
    credited to the layer that provides it; files the layers do not hold
    (written by the workload) are dropped."""
    links = link_targets(listings)
    out: list[Access] = []
    seen: set[str] = set()
    observed = [(a.path, a.seconds, str(getattr(a.kind, "value", a.kind))) for a in run_accesses]
    for path, seconds, kind in [*((p, 0.0, "runtime") for p in RUNTIME_READS), *observed]:
        try:
            real = resolve(path, listings, links)
        except InvalidInput:
            continue
        if not real or real in seen:
            continue
        layer = layer_for(real, listings)
        if layer is None:
            continue  # written by the workload, or not there at all
        if kind == "runtime" and listings[layer].kinds.get(real) not in ("reg", "hardlink"):
            continue
        seen.add(real)
        try:
            size = os.lstat(os.path.join(root, real)).st_size
        except OSError:
            size = 0
        out.append(Access(real, layer, round(seconds, 4), size, kind))
    return out
