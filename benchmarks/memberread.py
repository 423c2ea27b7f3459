#!/usr/bin/env python3
"""What a shared gzip member costs a lazy read, by --min-chunk-size (no network).

    python3 benchmarks/memberread.py [--layer TAR] [--min-chunk-sizes 0,16384,65536,262144]
                                     [--max-size 65536] [--every 7]

The Debian rootfs layer (testdata/build-debian-rootfs.sh) unless ``--layer``,
converted by this checkout's ``estargz layer convert --min-chunk-size M
--external-toc`` for each M. For every regular file of 1 to ``--max-size``
bytes, from the TOC: the compressed bytes a lazy reader fetches for it (its
gzip member, ``[offset, next member)``) and the bytes it inflates
(``innerOffset`` plus the file's). Every ``--every``-th of those files is then
read whole through ``estargz.LayerReader`` from the page cache, and timed:
the inflating and checking a reader does, without the network (the
snapshotter's reads are benchmarks/filelatency.py). Also the members: how many
hold data and the median compressed and uncompressed bytes of a shared one.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import estargz

REPO = Path(__file__).resolve().parent.parent


def pct(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def convert(tar: Path, out: Path, m: int) -> tuple[Path, Path]:
    blob, toc = out / f"{m}.esgz", out / f"{m}.toc"
    subprocess.run([sys.executable, "-m", "estargz", "layer", "convert", str(tar), str(blob),
                    "--min-chunk-size", str(m), "--external-toc", str(toc)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return blob, toc


def measure(blob: Path, toc: Path, max_size: int, every: int) -> dict[str, float]:
    r = estargz.LayerReader(estargz.FileSource(str(blob)),
                            toc_source=estargz.FileSource(str(toc)))
    starts = sorted({e.offset for e in r.entries if e.offset})
    ends = dict(zip(starts, starts[1:] + [r.payload_end], strict=True))
    members: dict[int, list[estargz.TOCEntry]] = {}
    for e in r.entries:
        if e.type in ("reg", "chunk") and e.offset:
            members.setdefault(e.offset, []).append(e)
    shared = [g for g in members.values() if len(g) > 1]
    files = [e for e in r.entries if e.type == "reg" and 0 < e.size <= max_size]
    seconds = []
    for e in files[::every]:
        started = time.perf_counter()
        for _ in r.iter_file(e.name):
            pass
        seconds.append(time.perf_counter() - started)
    fetched = [ends[e.offset] - e.offset for e in files]
    inflated = [e.inner_offset + e.size for e in files]
    return {
        "members": len(members), "shared": len(shared),
        "shared_compressed": statistics.median(ends[g[0].offset] - g[0].offset
                                               for g in shared) if shared else 0,
        "shared_uncompressed": statistics.median(
            g[-1].inner_offset + (g[-1].chunk_size or g[-1].size - g[-1].chunk_offset)
            for g in shared) if shared else 0,
        "files": len(files),
        "fetched_median": pct(fetched, .5), "fetched_p90": pct(fetched, .9),
        "inflated_median": pct(inflated, .5), "inflated_p90": pct(inflated, .9),
        "read_median_ms": pct(seconds, .5) * 1e3, "read_p90_ms": pct(seconds, .9) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", type=Path)
    ap.add_argument("--min-chunk-sizes", default="0,16384,65536,262144")
    ap.add_argument("--max-size", type=int, default=65536)
    ap.add_argument("--every", type=int, default=7)
    a = ap.parse_args(argv)
    tar = a.layer or Path(subprocess.run(
        [str(REPO / "testdata" / "build-debian-rootfs.sh")], capture_output=True, text=True,
        check=True).stdout.split()[-1])
    print("| --min-chunk-size | data members (shared) | shared member, median: compressed "
          "/ tar bytes | compressed bytes fetched, median / p90 | bytes inflated, median / "
          "p90 | read, median / p90 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="estargz-memberread-") as tmp:
        for m in (int(s) for s in a.min_chunk_sizes.split(",")):
            r = measure(*convert(tar, Path(tmp), m), a.max_size, a.every)
            print(f"| {m} | {r['members']:,} ({r['shared']:,}) | {r['shared_compressed']:,.0f} "
                  f"/ {r['shared_uncompressed']:,.0f} | {r['fetched_median']:,} / "
                  f"{r['fetched_p90']:,} | {r['inflated_median']:,} / {r['inflated_p90']:,} "
                  f"| {r['read_median_ms']:.2f} / {r['read_p90_ms']:.2f} ms |", flush=True)
            print(f"files of 1 B-{a.max_size} B: {r['files']:,}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
