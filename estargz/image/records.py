"""Records of what a workload read: the ``ctr-remote optimize --record-out``
format that ``estargz convert --record-in`` takes, keyed by manifest digest
and layer index."""

from __future__ import annotations

from collections.abc import Iterable

from .._exceptions import InvalidInput
from ..layer.jsondoc import load_json


def read_records(lines: Iterable[str]) -> dict[tuple[str, int], list[str]]:
    """Parse the record format of ``ctr-remote optimize --record-out``: JSON lines
    ``{"path": …, "manifestDigest": …, "layerIndex": …}``, paths kept in order."""
    out: dict[tuple[str, int], list[str]] = {}
    seen: set[tuple[str, int, str]] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = load_json(line, f"record line {n}")
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) \
                or type(rec.get("layerIndex")) is not int \
                or not isinstance(rec.get("manifestDigest"), str):
            raise InvalidInput(f"record line {n} lacks path, manifestDigest or layerIndex")
        key = (rec["manifestDigest"], rec["layerIndex"])
        if (*key, rec["path"]) not in seen:
            seen.add((*key, rec["path"]))
            out.setdefault(key, []).append(rec["path"])
    return out
