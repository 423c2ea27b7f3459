#!/usr/bin/env python3
"""What making a lazily loadable image costs: SOCI index against eStargz.

For one benchmark image (benchmarks/images.py, an OCI layout in the cache)
it times, from that layout to a new local OCI layout (no registry, no
network):

  soci-convert   `soci convert --standalone --format oci-dir` (soci v0.16.1,
                 scripts/build-go.sh soci): soci's own index, daemonless
  soci-create    `estargz soci create`: our SOCI index (v2), image unchanged
  convert        `estargz convert --oci`: the layers rewritten as eStargz
  optimize       `estargz optimize --oci --wait-on-line READY`: profile, then
                 eStargz with the files read first
  optimize-soci  `estargz optimize --soci --wait-on-line READY`: profile, then
                 our SOCI index with the workload's prefetch artifacts

each --repeat times (fresh output every time), and prints the median wall
time, user + system CPU and peak RSS (GNU time), and the bytes each one
adds to the layout (new blobs only).

    sudo python3 benchmarks/soci_cost.py --image python --repeat 3 --json out/cost.json

Needs root (optimize's sandbox), GNU time (/usr/bin/time), and what
scripts/build-go.sh builds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import images  # noqa: E402  (benchmarks/images.py)
from startup import BenchError, estargz_cli  # noqa: E402

from gobuild import build_go  # noqa: E402

TOOLS = ("soci-convert", "soci-create", "convert", "optimize", "optimize-soci")
TIME = "/usr/bin/time"


def argv_for(tool: str, src: Path, out: Path, ready: str) -> list[str]:
    """The command of ``tool`` from layout ``src`` to a new layout ``out``."""
    est = estargz_cli()
    plain_src = f"oci:{src}:latest"
    if tool == "soci-convert":
        return [str(build_go("soci")), "--root", str(out.with_name("soci-root")),
                "convert", "--standalone", "--format", "oci-dir", str(src), str(out)]
    if tool == "soci-create":
        return [*est, "soci", "create", "-q", plain_src, f"oci:{out}:soci"]
    if tool == "convert":
        return [*est, "convert", "--oci", "-q", plain_src, f"oci:{out}:estargz"]
    profile = ["--period", "60", "--wait-on-line", ready]
    if tool == "optimize":
        return [*est, "optimize", "--oci", "-q", *profile, plain_src, f"oci:{out}:opt"]
    return [*est, "optimize", "--soci", "-q", *profile, plain_src, f"oci:{out}:soci-opt"]


def new_blob_bytes(src: Path, out: Path) -> int:
    """Bytes of the blobs in layout ``out`` that ``src`` does not have."""
    have = {p.name for p in (src / "blobs" / "sha256").iterdir()}
    return sum(p.stat().st_size for p in (out / "blobs" / "sha256").iterdir()
               if p.name not in have)


def measure(tool: str, src: Path, ready: str, work: Path) -> dict:
    """One timed run of ``tool``; wall, cpu (s), peak RSS (MiB), new bytes."""
    base = Path(tempfile.mkdtemp(prefix=f"{tool}-", dir=work))
    try:
        out = base / "layout"
        argv = [TIME, "-f", "%e %U %S %M", "-o", str(base / "time"),
                *argv_for(tool, src, out, ready)]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            tail = " | ".join(p.stderr.strip().splitlines()[-4:])
            raise BenchError(f"{tool} exited {p.returncode}: {tail}")
        wall, user, sys_, rss = (base / "time").read_text().split()[-4:]
        return {"wall": float(wall), "cpu": float(user) + float(sys_),
                "rss_mib": int(rss) / 1024, "new_bytes": new_blob_bytes(src, out)}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="soci_cost.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--image", choices=images.IMAGES, default="python")
    ap.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write every run here")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    src = images.ensure(args.image) / "oci"
    ready = images.READY[args.image]
    work = Path(tempfile.mkdtemp(prefix="soci-cost-"))
    runs: dict[str, list[dict]] = {t: [] for t in args.tools}
    try:
        for _ in range(args.repeat):  # interleaved, as startup.py does
            for tool in args.tools:
                r = measure(tool, src, ready, work)
                runs[tool].append(r)
                print(f"[cost] {args.image} {tool}: {r}", file=sys.stderr, flush=True)
    except BenchError as e:
        print(f"[cost] error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"| {args.image} | wall s | CPU s | peak RSS MiB | bytes added |")
    print("|---|--:|--:|--:|--:|")
    for tool, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"| {tool} | {med['wall']:.1f} | {med['cpu']:.1f} | {med['rss_mib']:.0f} | "
              f"{med['new_bytes'] / 1e6:.2f} MB |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"image": args.image, "repeat": args.repeat,
                                         "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
