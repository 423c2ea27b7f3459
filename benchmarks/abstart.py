#!/usr/bin/env python3
"""Alternating cold starts of two (or more) eStargz images through the Stargz
Snapshotter, with a per-request timeline: how issue 9 point 7 (our
unoptimized python image against the reference's) was found and settled.

    sudo python3 benchmarks/abstart.py --runs 6 ours=oci:/tmp/ours:latest ref=oci:/tmp/ref:ref

Each NAME=OCI-LAYOUT-REFERENCE is pushed to a private registry (Debian's
docker-registry on 127.0.0.1) and run in turn, each run on a fresh snapshotter
and containerd (tests/lazypull.py), through the proxy of tests/shapingproxy.py (unshaped
unless --bandwidth/--latency). The workload is the python benchmark image's import
(it prints its own CPU time and import time). Per run it prints: pull and
run seconds, the snapshotter's CPU seconds during the run, the workload's
output, the number of registry requests, the seconds the requests took at
the proxy (net) and the seconds between them (gaps); then the medians.

``--nagle`` puts back the proxy's old behaviour (no TCP_NODELAY), to
reproduce the ~45 ms stall per request that point 7 turned out to be.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import services  # noqa: E402
from daemons import _env  # noqa: E402
from lazypull import SNAPSHOTTER, LazyPuller, SnapshotterConfig, build_snapshotter  # noqa: E402
from services import running_registry  # noqa: E402
from shapingproxy import ShapingProxy  # noqa: E402

WORKLOAD = ["python3", "-c", "import os, time; t = time.monotonic(); "
            "import json, email, http.client; "
            "print('ready', os.times()[:2], round(time.monotonic() - t, 3), flush=True)"]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(name: str, ref: str, index: int, binary: Path, proxy: ShapingProxy, work: Path,
        workload: list[str]) -> dict:
    base = Path(tempfile.mkdtemp(dir=work))
    puller = LazyPuller(base, "v0.18", SnapshotterConfig(prefetch_timeout_sec=10), binary)
    puller.start()
    try:
        proxy.reset()
        t0 = time.monotonic()
        puller.rpull(ref)
        t1 = time.monotonic()
        c = puller.containerd
        c.ctr("containers", "create", "--snapshotter", SNAPSHOTTER, ref, "ab", "--", *workload)
        assert puller.snapshotter.proc is not None
        pid = puller.snapshotter.proc.pid
        cpu0, t2 = cpu_seconds(pid), time.monotonic()
        out = subprocess.run([c.ctr_binary, "--address", c.address, "--namespace", c.namespace,
                              "tasks", "start", "--fifo-dir", str(c.fifo_dir), "ab"],
                             capture_output=True, text=True, env=_env(), timeout=300)
        t3, cpu1 = time.monotonic(), cpu_seconds(pid)
        reqs = [r for r in proxy.requests() if r.start >= t2]
        c.ctr("tasks", "delete", "ab", check=False)
        c.ctr("containers", "delete", "ab", check=False)
    finally:
        puller.stop()
        shutil.rmtree(base, ignore_errors=True)
    return {"name": name, "index": index, "pull": round(t1 - t0, 3), "run": round(t3 - t2, 3),
            "snapshotter_cpu": round(cpu1 - cpu0, 2), "output": out.stdout.strip(),
            "requests": len(reqs), "net": round(sum(r.end - r.start for r in reqs), 3),
            "gaps": round(sum(b.start - a.end for a, b in itertools.pairwise(reqs)), 3),
            "timeline": [(round(r.start - t2, 4), round(r.end - r.start, 4), r.range, r.sent)
                         for r in reqs]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", metavar="NAME=oci:LAYOUT:TAG")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bandwidth", type=float, default=None, metavar="MBIT",
                    help="shape to this many Mbit/s (default: unshaped)")
    ap.add_argument("--latency", type=float, default=0.0, metavar="MS",
                    help="add this many ms per request")
    ap.add_argument("--nagle", action="store_true",
                    help="the proxy without TCP_NODELAY (the old artifact)")
    ap.add_argument("--json", type=Path, help="write every run, with its timeline")
    ap.add_argument("--workload", type=json.loads, default=WORKLOAD, metavar="JSON",
                    help="the container's command, a JSON array (default: the python import)")
    args = ap.parse_args(argv)
    images = dict(item.split("=", 1) for item in args.images)
    services.ProxyHandler.disable_nagle_algorithm = not args.nagle
    binary = build_snapshotter("v0.18")
    work = Path(tempfile.mkdtemp(prefix="abstart-"))
    runs = []
    try:
        with running_registry(work / "registry") as reg, ShapingProxy(
                reg.host, bandwidth=args.bandwidth * 1e6 if args.bandwidth else None,
                latency=args.latency / 1000) as proxy:
            for name, src in images.items():
                subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", src,
                                f"docker://{reg.host}/ab:{name}"], check=True)
            for i in range(args.runs):
                for name in images:
                    r = one(name, f"{proxy.host}/ab:{name}", i, binary, proxy, work, args.workload)
                    runs.append(r)
                    print(json.dumps({k: v for k, v in r.items() if k != "timeline"}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name in images:
        rs = [r for r in runs if r["name"] == name]
        print(name, {k: statistics.median(r[k] for r in rs)
                     for k in ("pull", "run", "snapshotter_cpu", "requests", "net", "gaps")})
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
