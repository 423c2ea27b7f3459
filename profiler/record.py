"""Access records: what the workload read, in the reference's record format.

``ctr-remote image optimize --record-out`` writes one JSON object a line,
``{"path": …, "manifestDigest": …, "layerIndex": …}``, paths cleaned (no
leading slash) and in first-access order. We read and write exactly that, so
either tool can take the other's record
(``estargz convert --record-in``, ``ctr-remote … --estargz-record-in``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import IO, Iterable, Optional

from estargz.toc import clean_name


@dataclass(frozen=True)
class Access:
    """One file the workload read, mapped to the layer that provides it."""

    path: str                 # cleaned, relative to the image root
    layer: int                # index into the manifest's layers
    seconds: float = 0.0      # first access, from the workload's start
    size: int = 0             # bytes of the file in its layer
    kind: str = "open"        # open, access, exec, or runtime (read before the entrypoint)


def write_record(accesses: Iterable[Access], manifest_digest: str, out: IO[str]) -> int:
    """Write ``accesses`` as reference record lines; returns the count."""
    n = 0
    for a in accesses:
        out.write(json.dumps({"path": clean_name(a.path), "manifestDigest": manifest_digest,
                              "layerIndex": a.layer}, separators=(",", ":")) + "\n")
        n += 1
    return n


def per_layer(accesses: Iterable[Access], manifest_digest: str,
              ) -> dict[tuple[str, int], list[str]]:
    """Prioritized paths per (manifest digest, layer index), order kept,
    duplicates dropped -- the converter's ``records`` option."""
    out: dict[tuple[str, int], list[str]] = {}
    seen: set[tuple[int, str]] = set()
    for a in accesses:
        key = (a.layer, clean_name(a.path))
        if key not in seen:
            seen.add(key)
            out.setdefault((manifest_digest, a.layer), []).append(key[1])
    return out


def by_path(records: dict[tuple[str, int], list[str]],
            manifest_digest: Optional[str] = None) -> list[str]:
    """Every recorded path (of one manifest, or all), for applying a record
    made on one platform to another platform's layers by path."""
    out: list[str] = []
    for (digest, _), paths in records.items():
        if manifest_digest is None or digest == manifest_digest:
            out.extend(p for p in paths if p not in out)
    return out
