#!/usr/bin/env python3
"""Layer size with ``--min-chunk-size`` and ``--external-toc``, side by side.

    python3 benchmarks/size.py [--layers debian,python] [--min-chunk-sizes 0,16384,65536,262144]
                               [--level 9] [--json FILE] [--markdown FILE] [--check]

For the Debian rootfs layer (testdata/build-debian-rootfs.sh) and the python
layer (layer 2 of testdata/images/build.py's debian-python3: what installing
python3 adds), in one run, each tool a child process one after the other:

* ``gzip -9`` of the same uncompressed tar: the plain layer to beat;
* ours, ``estargz layer convert --min-chunk-size M --external-toc TOC``, for
  each M (M = 0: one gzip member a chunk, as without the option), and with
  ``--keep-diff-id`` at the largest M;
* the reference v0.18 with the same options (``goref-v018
  build-v018``: estargz.Build with WithMinChunkSize and externaltoc's
  compressor, or AppendTarLossLess for keep-diff-id), built through the Go
  module proxy by ``scripts/build-go.sh goref-v018``;
* ours and the reference with neither option, for the baseline.

Sizes are of the layer blob (what a full pull downloads and what the
manifest lists) and, separately, of the TOC blob (the "TOC image" a lazy
puller fetches instead of a TOC inside the layer). Wall seconds are printed
for orientation only: this is not the speed benchmark (benchmarks/run.py).

Targets (issue 12, point 4): at every M > 0 our layer blob is no larger than
the reference's with the same options, and at most 1.01 x gzip -9. Exit 0
unless ``--check`` is given and a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_VS_GZIP = 1.01


def log(msg: str) -> None:
    print(f"[size] {msg}", file=sys.stderr, flush=True)


def last_line(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"size: {' '.join(cmd)} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    return p.stdout.strip().splitlines()[-1]


def debian_layer(_: Path) -> Path:
    log("preparing the Debian rootfs layer (testdata/build-debian-rootfs.sh)")
    return Path(last_line([str(REPO / "testdata" / "build-debian-rootfs.sh")]))


def python_layer(work: Path) -> Path:
    """The python layer of debian-python3, decompressed: every tool reads the same tar."""
    log("preparing the debian-python3 image (testdata/images/build.py)")
    image = Path(last_line([sys.executable, str(REPO / "testdata" / "images" / "build.py"),
                            "debian-python3"]))
    layout = image / "oci" if (image / "oci").is_dir() else image
    index = json.loads((layout / "index.json").read_text())
    blob = layout / "blobs" / "sha256"
    manifest = json.loads((blob / index["manifests"][0]["digest"][7:]).read_bytes())
    layer = blob / manifest["layers"][1]["digest"][7:]
    out = work / "python-layer.tar"
    with open(layer, "rb") as src, open(out, "wb") as dst:
        d = zlib.decompressobj(31)
        while piece := src.read(1 << 20):
            dst.write(d.decompress(piece))
        dst.write(d.flush())
    return out


LAYERS = {"debian": debian_layer, "python": python_layer}


def run(argv: list[str]) -> tuple[dict, float]:
    started = time.monotonic()
    # From the repository, so ``-m estargz`` is this checkout's.
    p = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    seconds = time.monotonic() - started
    if p.returncode != 0:
        sys.exit(f"size: {' '.join(argv)} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    return (json.loads(p.stdout) if p.stdout.strip() else {}), seconds


def gzip9(tar: Path, work: Path) -> dict:
    out = work / "gzip9.gz"
    started = time.monotonic()
    with open(out, "wb") as f:
        subprocess.run(["gzip", "-9", "-n", "-c", str(tar)], stdout=f, check=True)
    return {"tool": "gzip -9", "min_chunk_size": None, "blob": out.stat().st_size, "toc": 0,
            "seconds": round(time.monotonic() - started, 2)}


def ours(tar: Path, work: Path, level: int, m: int | None, external: bool,
         keep: bool = False) -> dict:
    out, toc = work / "ours.esgz", work / "ours.toc"
    argv = [sys.executable, "-m", "estargz", "layer", "convert", str(tar), str(out), "--json",
            "--compression-level", str(level)]
    if m is not None:
        argv += ["--min-chunk-size", str(m)]
    if external:
        argv += ["--external-toc", str(toc)]
    if keep:
        argv.append("--keep-diff-id")
    res, seconds = run(argv)
    return {"tool": "ours", "min_chunk_size": m, "external_toc": external, "keep_diff_id": keep,
            "blob": res["blob_size"], "toc": res.get("toc_blob_size", 0),
            "seconds": round(seconds, 2)}


def reference(goref: str, tar: Path, work: Path, level: int, m: int | None, external: bool,
              keep: bool = False) -> dict:
    out, toc = work / "ref.esgz", work / "ref.toc"
    argv = [goref, "build-v018", str(tar), str(out), "--level", str(level)]
    if m:
        argv += ["--min-chunk-size", str(m)]
    if external:
        argv += ["--external-toc", str(toc)]
    if keep:
        argv.append("--keep-diff-id")
    res, seconds = run(argv)
    return {"tool": "reference v0.18", "min_chunk_size": m, "external_toc": external,
            "keep_diff_id": keep, "blob": res["blobSize"], "toc": res.get("tocBlobSize", 0),
            "seconds": round(seconds, 2)}


def measure_layer(name: str, tar: Path, work: Path, goref: str, level: int,
                  sizes: list[int]) -> dict:
    rows = [gzip9(tar, work)]
    log(f"{name}: gzip -9 {rows[0]['blob']:,}")
    for tool in (ours, lambda *a: reference(goref, *a)):
        rows.append(tool(tar, work, level, None, False))
        for m in sizes:
            rows.append(tool(tar, work, level, m, True))
        rows.append(tool(tar, work, level, max(sizes), True, True))
        for r in rows[-len(sizes) - 2:]:
            log(f"{name}: {r['tool']} min={r['min_chunk_size']} ext={r['external_toc']} "
                f"keep={r['keep_diff_id']}: {r['blob']:,} + TOC {r['toc']:,} "
                f"({r['seconds']} s)")
    return {"layer": name, "tar_size": tar.stat().st_size, "rows": rows}


def key(r: dict) -> tuple:
    return r["min_chunk_size"], r.get("external_toc"), r.get("keep_diff_id")


def table(rep: dict) -> list[str]:
    gz = rep["rows"][0]["blob"]
    ref = {key(r): r for r in rep["rows"] if r["tool"] == "reference v0.18"}
    lines = [f"#### {rep['layer']} ({rep['tar_size'] / 2**20:,.2f} MiB tar, gzip -9 {gz:,} B)",
             "",
             "| options | ours: layer | TOC blob | x gzip -9 | reference: layer | TOC blob "
             "| x gzip -9 | ours / reference |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rep["rows"]:
        if r["tool"] != "ours":
            continue
        f = ref[key(r)]
        opts = ("none (TOC inside)" if r["min_chunk_size"] is None else
                f"--min-chunk-size {r['min_chunk_size']} --external-toc"
                + (" --keep-diff-id" if r["keep_diff_id"] else ""))
        lines.append(f"| {opts} | {r['blob']:,} | {r['toc']:,} | {r['blob'] / gz:.4f} "
                     f"| {f['blob']:,} | {f['toc']:,} | {f['blob'] / gz:.4f} "
                     f"| {r['blob'] / f['blob']:.4f} |")
    return lines


def misses(rep: dict) -> list[str]:
    gz = rep["rows"][0]["blob"]
    ref = {key(r): r for r in rep["rows"] if r["tool"] == "reference v0.18"}
    out = []
    for r in rep["rows"]:
        if r["tool"] != "ours" or not r["min_chunk_size"] or r["keep_diff_id"]:
            continue
        if r["blob"] > ref[key(r)]["blob"]:
            out.append(f"{rep['layer']} min {r['min_chunk_size']}: larger than the reference")
        if r["blob"] > TARGET_VS_GZIP * gz:
            out.append(f"{rep['layer']} min {r['min_chunk_size']}: "
                       f"{r['blob'] / gz:.4f} x gzip -9")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="debian,python")
    ap.add_argument("--min-chunk-sizes", default="0,16384,65536,262144")
    ap.add_argument("--level", type=int, default=9)
    ap.add_argument("--json", dest="json_out", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.min_chunk_sizes.split(",")]
    goref = last_line([str(REPO / "scripts" / "build-go.sh"), "goref-v018"])
    env = {"cores": len(os.sched_getaffinity(0)), "level": a.level}
    reports = []
    with tempfile.TemporaryDirectory(prefix="estargz-size-") as tmp:
        work = Path(tmp)
        for name in a.layers.split(","):
            reports.append(measure_layer(name, LAYERS[name](work), work, goref, a.level, sizes))
    lines = []
    for rep in reports:
        lines += table(rep) + [""]
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        a.markdown.write_text(text)
    if a.json_out:
        a.json_out.write_text(json.dumps({"environment": env, "layers": reports}, indent=2))
    bad = [m for rep in reports for m in misses(rep)]
    for m in bad:
        print(f"target missed: {m}", file=sys.stderr)
    return 1 if bad and a.check else 0


if __name__ == "__main__":
    sys.exit(main())
