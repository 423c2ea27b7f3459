#!/usr/bin/env python3
"""zstd:chunked: our converter against the reference's, side by side.

    python3 benchmarks/zstdchunked.py [--level 3] [--repeat 3] [--layers debian,python]
                                      [--idle-wait 120] [--json FILE] [--check]

Layers: ``debian`` (testdata/build-debian-rootfs.sh, the minbase layer) and
``python`` (the same with python3, ``--with-python3``), cached under
``${ESTARGZ_CACHE:-~/.cache/estargz-dev}/testdata/``. For each, one after the
other and never overlapping, interleaved over ``--repeat`` rounds:

* ours: ``python3 -m estargz layer convert IN OUT --zstdchunked
  --compression-level L --json`` (one worker thread per core);
* the reference: ``goref-v018 convert-zstdchunked IN OUT L`` (stargz-snapshotter's
  estargz v0.18 ``Build`` with its ``zstdchunked.Compressor`` at
  ``zstd.EncoderLevelFromZstd(L)``, what ``ctr-remote``/``nerdctl
  --zstdchunked`` run) with GOMAXPROCS = the number of cores;
* ``zstd -T0 -L`` of the same tar: plain zstd with no per-file frames, the
  floor for any zstd-based format.

Wall time and peak RSS are measured as ``run.py`` measures them (a fork/exec
trampoline, warm page cache, idle machine). Targets (issue 12, point 4):
ours no larger than the reference at the same level and converted at least
as fast (median wall). Exit 0 whatever they say unless ``--check``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import run
from run import (
    CACHE,
    REPO,
    TESTDATA,
    Run,
    compile_bytecode,
    cores,
    last_line,
    log,
    measure,
    wait_for_idle,
    warm,
)


def python_layer() -> Path:
    path = TESTDATA / "debian-bookworm-minbase-python3.tar"
    if not path.exists():
        log("preparing the python layer (testdata/build-debian-rootfs.sh --with-python3)")
        return last_line([str(REPO / "testdata" / "build-debian-rootfs.sh"), "--with-python3"])
    return path


LAYERS = {"debian": run.debian_layer, "python": python_layer}


def goref_v018() -> Path:
    log("building the reference checker (scripts/build-go.sh goref-v018)")
    return last_line(["sh", str(REPO / "scripts" / "build-go.sh"), "goref-v018"])


def tools(level: int, goref: Path) -> dict[str, tuple[list[str], dict, bool]]:
    """name -> (argv with IN and OUT placeholders, env, stdout is the output)."""
    n = str(cores())
    return {
        "ours": ([sys.executable, "-m", "estargz", "layer", "convert", "IN", "OUT",
                  "--zstdchunked", "--compression-level", str(level), "--json"], {}, False),
        "reference": ([str(goref), "convert-zstdchunked", "IN", "OUT", str(level)],
                      {"GOMAXPROCS": n}, False),
        "zstd": (["zstd", f"-T{n}", f"-{level}", "-q", "-c", "IN"], {}, True),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", default="debian,python")
    ap.add_argument("--idle-wait", type=float, default=120)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    goref = goref_v018()
    compile_bytecode()
    cmds = tools(args.level, goref)
    results: dict[str, Any] = {"level": args.level, "repeat": args.repeat, "cores": cores(),
                     "layers": {}}
    ok = True
    CACHE.mkdir(parents=True, exist_ok=True)
    for name in args.layers.split(","):
        layer = LAYERS[name]()
        runs: dict[str, list[Run]] = {t: [] for t in cmds}
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="bench-zstd-") as d:
            work = Path(d)
            for i in range(args.repeat):
                for tool, (template, env, to_stdout) in cmds.items():
                    out = work / f"{tool}.out"
                    argv_ = [str(layer) if a == "IN" else str(out) if a == "OUT" else a
                             for a in template]
                    warm(layer)
                    wait_for_idle(args.idle_wait)
                    r, _ = measure(argv_, out, stdout_to_out=to_stdout, env=env, workdir=work)
                    log(f"{name} {tool} #{i + 1}: {r.wall:.2f} s, {r.size:,} bytes, "
                        f"{r.rss_kib / 1024:.0f} MiB RSS, others {r.foreign:.1f} CPU s")
                    runs[tool].append(r)
                    out.unlink()
        rep: dict[str, Any] = {t: {"wall": statistics.median(r.wall for r in rs),
                   "cpu": statistics.median(r.cpu for r in rs),
                   "size": rs[0].size, "rss_mib": max(r.rss_kib for r in rs) / 1024,
                   "walls": [round(r.wall, 2) for r in rs]} for t, rs in runs.items()}
        size_ratio = rep["ours"]["size"] / rep["reference"]["size"]
        wall_ratio = rep["ours"]["wall"] / rep["reference"]["wall"]
        rep["targets"] = {"size <= reference": [round(size_ratio, 5), size_ratio <= 1],
                          "wall <= reference": [round(wall_ratio, 3), wall_ratio <= 1]}
        ok = ok and size_ratio <= 1 and wall_ratio <= 1
        rep["tar_size"] = layer.stat().st_size
        results["layers"][name] = rep
        print(f"\n{name} ({layer.stat().st_size / 2**20:.1f} MiB tar), level {args.level}, "
              f"median of {args.repeat}:")
        for t in cmds:
            v = rep[t]
            print(f"  {t:<10} {v['wall']:7.2f} s wall {v['cpu']:7.2f} s CPU "
                  f"{v['size']:>13,} bytes {v['rss_mib']:6.0f} MiB RSS  {v['walls']}")
        for k, (ratio, passed) in rep["targets"].items():
            print(f"  {k}: {ratio} {'PASS' if passed else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    sys.exit(main())
